"""notebooks/evaluate.ipynb: stored without outputs, and runs top to bottom (nbclient, an
ipykernel kernel) on the tiny demo checkpoint that test_evaluate.py trains."""

import json
import os

import nbformat
from nbclient import NotebookClient

from test_evaluate import ROOT, demo_workdir

NOTEBOOK = os.path.join(ROOT, "notebooks", "evaluate.ipynb")


def test_notebook_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)
    # The parameters are one cell, at the top, each overridable by the environment.
    params = code[0].source
    for name in ("VALLEY_CHECKPOINT", "VALLEY_VIDEO", "VALLEY_DATA"):
        assert f'os.environ.get("{name}"' in params


def test_notebook_runs_top_to_bottom(tmp_path_factory, tmp_path, monkeypatch):
    demo = demo_workdir(tmp_path_factory)
    video = os.path.join(demo, "data", "videos", "val_00001.mp4")
    out = tmp_path / "eval"
    monkeypatch.setenv("VALLEY_CHECKPOINT", os.path.join(demo, "model"))
    monkeypatch.setenv("VALLEY_VIDEO", video)
    monkeypatch.setenv("VALLEY_DATA", os.path.join(demo, "data", "val.json"))
    monkeypatch.setenv("VALLEY_OUT", str(out))
    monkeypatch.setenv("VALLEY_MAX_ITEMS", "8")
    monkeypatch.setenv("VALLEY_REPO", "")
    # The kernel imports this checkout, on the CPU, with one device.
    monkeypatch.setenv("PYTHONPATH", ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "valley_jax is installed: nothing to install" in text
    assert "accelerator found: cpu" in text and "computes on cpu" in text
    assert "frames: (4, 112, 112, 3) uint8" in text  # the demo's 4 frames at 112 px
    assert text.count("Human: ") == 2 and text.count("Assistant: ") == 2
    images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.data]
    assert len(images) == 1  # the sampled frames

    with open(out / "results.json") as f:
        results = json.load(f)
    assert results["offline"]["all"]["n"] == 8
    table = [o.data["text/markdown"] for o in outputs
             if o.output_type == "display_data" and "text/markdown" in o.data]
    assert len(table) == 1
    for qtype, s in results["offline"].items():
        assert f"| {qtype} | {s['n']} | {s['exact']:.3f} | {s['contains']:.3f} |" in table[0]
    # Executing did not write outputs back into the stored notebook.
    assert all(c.outputs == [] for c in nbformat.read(NOTEBOOK, as_version=4).cells
               if c.cell_type == "code")
