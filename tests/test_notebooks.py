from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from smp_cbam.training.runner import compare, load_config
from smp_cbam.training.synthetic import CLASS_NAMES

pytestmark = pytest.mark.slow  # each notebook trains or runs a comparison in a kernel

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ["compare_results.ipynb", "attention_maps.ipynb"]
# none, scse and cbam with two seeds: paired differences vs both baselines with intervals
TINY = {
    "grid": {"archs": ["unet"], "attentions": ["none", "scse", "cbam"], "seeds": [0, 1], "jobs": 1},
    "data": {"dataset": "synthetic", "batch_size": 8, "synthetic": {"size": 64, "n_train": 8, "n_val": 8, "n_test": 8}},
    "model": {"encoder": "mobilenet_v2", "encoder_depth": 5, "decoder_channels": [32, 16, 16, 16, 16]},
    "train": {"stop": "fixed", "max_epochs": 2},
}


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("results")
    compare(load_config(overrides={**TINY, "output": str(output)}))
    return output


def execute(name: str) -> nbformat.NotebookNode:
    """Run the notebook headless in a python3 kernel from the notebooks folder; raises on a cell error."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(nb, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    return nb


def outputs(nb: nbformat.NotebookNode) -> list[dict]:
    return [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]


def figures(nb: nbformat.NotebookNode) -> int:
    return sum("image/png" in o.get("data", {}) for o in outputs(nb))


def text(nb: nbformat.NotebookNode, kind: str) -> str:
    """All stdout, or all ``text/<kind>`` display data, joined."""
    if kind == "stdout":
        return "".join(o["text"] for o in outputs(nb) if o.get("name") == "stdout")
    return "".join(o["data"][f"text/{kind}"] for o in outputs(nb) if f"text/{kind}" in o.get("data", {}))


def test_compare_results_notebook_reads_the_given_results(results_dir: Path, monkeypatch) -> None:
    monkeypatch.setenv("SMP_CBAM_RESULTS", str(results_dir))
    nb = execute("compare_results.ipynb")
    assert f"6 runs in {results_dir.resolve()}; compared on test_miou" in text(nb, "stdout")
    assert figures(nb) >= 5  # mIoU, paired differences, per-class IoU, learning curves, cost
    summary = text(nb, "markdown")
    assert "`cbam`" in summary and "Δ vs none" in summary and "Δ vs scse" in summary
    tables = text(nb, "html")
    for column in ["ci_low", f"iou_{CLASS_NAMES[-1]}", "params_vs_none_%", "unet-cbam-s1"]:
        assert column in tables


def test_attention_maps_notebook_trains_and_shows_both_models(monkeypatch) -> None:
    monkeypatch.setenv("SMP_CBAM_NB_QUICK", "1")
    nb = execute("attention_maps.ipynb")
    printed = text(nb, "stdout")
    assert "cbam: val mIoU" in printed and "scse: val mIoU" in printed
    assert "decoder.blocks.4.attention2" in printed
    assert figures(nb) >= 3  # predictions, spatial maps, channel weights
    assert "max |warm - cool|" in text(nb, "html")


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebooks_have_no_outputs(name: str) -> None:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code and all(cell.outputs == [] and cell.execution_count is None for cell in code)
