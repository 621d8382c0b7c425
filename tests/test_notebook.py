"""notebooks/enchtable_colab.ipynb executes top to bottom on CPU with nbclient, at the sizes its switch
ENCHTABLE_NOTEBOOK_SMALL=1 selects, and shows its three plots inline (the demo's, the distillation loss, the
evaluation)."""

import base64
import os
import shutil
from pathlib import Path

import nbclient
import nbformat

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "enchtable_colab.ipynb"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_notebook_runs_top_to_bottom_on_cpu(tmp_path, monkeypatch, quick_demo):
    """The demo cell reuses the session's quick demo (a copy, as an earlier run of the notebook would leave it):
    `run_demo` itself is tested in tests/demo; the notebook's own work (distil, enchant, evaluate, plots) runs."""
    shutil.copytree(quick_demo[0], tmp_path / "work" / "demo", symlinks=True)
    monkeypatch.setenv("ENCHTABLE_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("ENCHTABLE_NOTEBOOK_WORK", str(tmp_path / "work"))
    monkeypatch.delenv("XLA_FLAGS", raising=False)  # the CPU devices of a Colab CPU runtime (conftest sets 8)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()  # raises on a cell's error
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    pngs = [base64.b64decode(o.data["image/png"]) for o in outputs if "image/png" in o.get("data", {})]
    assert len(pngs) == 3 and all(p.startswith(PNG_MAGIC) for p in pngs)
    cpus = ", ".join(f"CpuDevice(id={i})" for i in range(len(os.sched_getaffinity(0))))  # one per core
    assert f"devices: [{cpus}]" in text and "sizes ci" in text
    assert (tmp_path / "work" / "enchanted" / "merge_report.json").is_file()
    assert (tmp_path / "work" / "safety-vector" / "manifest.json").is_file()
    assert "reusing the demo in" in text
    for model in ("aligned", "task", "enchanted"):
        assert f"{model:<10} unsafe rate" in text
