#!/usr/bin/env bash
# Copy the small outputs of a comparison (no checkpoints, no models, no Lightning logs) into the
# repository, so that notebooks and `smp-cbam report` can rebuild everything from them:
#   experiments/collect_results.sh runs/camvid experiments/results/camvid
# Safe to run again while the study goes on: finished runs are copied, running ones too (their
# history and log so far; result.json only once it exists).
set -euo pipefail
src=${1:?usage: collect_results.sh SOURCE_OUTPUT DESTINATION}
dst=${2:?usage: collect_results.sh SOURCE_OUTPUT DESTINATION}
[ -f "$src/config.yaml" ] || { echo "collect_results.sh: $src/config.yaml not found: not a comparison's output" >&2; exit 2; }
mkdir -p "$dst/plots" "$dst/runs"
cp "$src/config.yaml" "$dst/"
for f in results.csv summary.md summary.csv differences.csv costs.csv; do
    if [ -f "$src/$f" ]; then cp "$src/$f" "$dst/"; fi
done
if compgen -G "$src/plots/*.png" > /dev/null; then cp "$src"/plots/*.png "$dst/plots/"; fi
for run in "$src"/runs/*/; do
    name=$(basename "$run")
    mkdir -p "$dst/runs/$name"
    for f in history.csv log.txt result.json per_image.csv; do
        if [ -f "$run/$f" ]; then cp "$run/$f" "$dst/runs/$name/"; fi
    done
done
echo "copied $(ls -d "$src"/runs/*/ | wc -l) runs from $src to $dst"
