"""The results notebook runs against fresh demo outputs, so it cannot rot."""

from __future__ import annotations

from pathlib import Path

import nbclient
import nbformat
import pytest

from pipeline import cli

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(("demo", "figures"), [
    ("demo.yaml", 3),  # the grid, the histograms, the costs
    ("demo-labels.yaml", 5),  # ... and the label distribution, the images per label
    ("demo-batch.yaml", 4),  # the first three, and what the batch rows cost beside online
])
def test_explore_results_notebook_runs_on_a_demo_output_and_draws_its_figures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, demo: str, figures: int
) -> None:
    out = tmp_path / "demo"
    assert cli.main(["run", str(REPO / "configs" / demo), "-q", "-o", str(out),
                     "--set", f"input.manifest={REPO / 'configs' / 'demo' / 'manifest.csv'}"]) == 0
    monkeypatch.setenv("ANNOTATE_OUTPUT", str(out))
    notebook = nbformat.read(REPO / "notebooks" / "explore_results.ipynb", as_version=4)

    nbclient.NotebookClient(notebook, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()

    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) == figures
