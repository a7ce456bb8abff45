"""notebooks/quickstart.ipynb: committed without outputs, and executed top to bottom on the CPU
with the demo model (no network: the repository is this checkout, nothing is installed)."""

import os

import nbformat

from tests.conftest import ROOT, xla_flags
from benchmarks.serving import free_port

NOTEBOOK = os.path.join(ROOT, "notebooks", "quickstart.ipynb")


def test_the_notebook_is_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    assert "parameters" in code[0].metadata.get("tags", [])


def _text(cell) -> str:
    out = []
    for o in cell.get("outputs", []):
        if o.output_type == "stream":
            out.append(o.text)
        elif o.output_type in ("execute_result", "display_data"):
            out.append(o.data.get("text/plain", ""))
        elif o.output_type == "error":
            out.append("\n".join(o.traceback))
    return "".join(out)


def test_the_notebook_runs_top_to_bottom_on_cpu(demo_home, tmp_path, monkeypatch):
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    first = next(i for i, c in enumerate(nb.cells) if c.cell_type == "code")
    # As papermill does: a cell after the parameters cell sets the suite's values.
    nb.cells.insert(first + 1, nbformat.v4.new_code_cell(
        f"DEMO = True\nINSTALL = False\nREPO_DIR = {ROOT!r}\nWORK_DIR = {str(tmp_path)!r}\n"
        f"PORT = {free_port()}\nLORA_STEPS = 10"))
    # The kernel (and the server it starts) inherit this environment: one CPU device, and the
    # demo model the suite trained once, under HOME.
    monkeypatch.setenv("HOME", str(demo_home))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("XLA_FLAGS", xla_flags())
    monkeypatch.setenv("PYTHONPATH", ROOT)
    client = NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    texts = [_text(c) for c in nb.cells if c.cell_type == "code"]
    everything = "\n".join(texts)
    assert " 7b chat: " in everything and " 70b chat: " in everything, everything[:3000]
    assert "per device" in everything  # the plan's table
    assert os.path.isfile(os.path.join(tmp_path, "model", "llama2_jax.json"))
    assert "> Count to five.\n1, 2, 3, 4, 5." in everything, everything
    assert os.path.isdir(os.path.join(tmp_path, "lora", "final"))
    assert "1, 2, 3, 4, 5" in texts[-1] and "server exit status 0" in texts[-1], texts[-1]
