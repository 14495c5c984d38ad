#!/usr/bin/env bash
# Copy the small outputs of a comparison (no checkpoints) into the repository:
#   experiments/collect_results.sh runs/camvid experiments/results/camvid
set -euo pipefail
src=$1 dst=$2
mkdir -p "$dst/plots" "$dst/runs"
cp "$src"/{config.yaml,results.csv,summary.md,summary.csv} "$dst/"
cp "$src"/plots/*.png "$dst/plots/"
for run in "$src"/runs/*/; do
    name=$(basename "$run")
    mkdir -p "$dst/runs/$name"
    cp "$run"/{history.csv,result.json,log.txt} "$dst/runs/$name/"
done
