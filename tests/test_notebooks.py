"""Every notebook in notebooks/ runs top to bottom, in fast mode (GRADFLOW_FAST=1).

Each one is executed with nbclient in a fresh kernel (the same Python as the
tests), in a temporary directory; the committed file is not modified. A cell
that raises fails the test with the cell's traceback.
"""

import importlib.util
import os
import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
# Seconds per cell: fast mode takes well under a minute per notebook on two cores.
CELL_TIMEOUT = 600
NEEDS = {"04_cross_framework_parity.ipynb": ("torch",)}


def test_the_notebooks_are_there():
    names = [path.name for path in NOTEBOOKS]
    assert names == [
        "01_quickstart.ipynb",
        "02_mixed_precision.ipynb",
        "03_multi_network_rl.ipynb",
        "04_cross_framework_parity.ipynb",
        "05_persistent_thresholds.ipynb",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_runs_in_fast_mode(path, tmp_path):
    for module in ("flax", "matplotlib", "ipykernel", *NEEDS.get(path.name, ())):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{path.name} needs {module}")
    notebook = nbformat.read(path, as_version=4)
    # The notebooks import the examples (examples/auction.py) from the repository root.
    root = str(NOTEBOOKS[0].parents[1])
    pythonpath = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, GRADFLOW_FAST="1", PYTHONPATH=pythonpath)
    client = nbclient.NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute(env=env)
    errors = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
        if output.get("output_type") == "error"
    ]
    assert not errors
    # Fast mode says so in the notebook's own output.
    text = "".join(
        output.get("text", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
        if output.get("output_type") == "stream"
    )
    assert "fast mode" in text
