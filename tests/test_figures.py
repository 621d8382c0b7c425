"""The package draws its PNGs on matplotlib Figure objects: it never imports pyplot or switches the process's
backend, so a notebook's inline plots keep working after any of them (switching to Agg silenced plt.show())."""

import subprocess
import sys

PROBE = r"""
import io, sys
import matplotlib
matplotlib.use("svg")  # a user's backend, whatever it is
from enchtable_jax.bench import plots
from enchtable_jax.calibration import plot_calibration
from enchtable_jax.demo.report import plot_results
from enchtable_jax.merging.report import plot
from enchtable_jax.training.loop import plot_losses

buffers = [io.BytesIO() for _ in range(3)]
plot_losses([3.0, 2.0, 1.5], buffers[0], "loss")
candidates = [{"value": v, "unsafe_rate": 0.5 - v / 4, "over_refusal": v / 4} for v in (0.1, 0.5, 1.0)]
plot_calibration({"candidates": candidates, "bounds": {"unsafe_rate": 0.3, "over_refusal": 0.2}, "chosen": 0.5,
                  "met": True, "parameter": "beta", "method": "enchtable"}, buffers[1])
plot({"method": "enchtable", "alpha": 1.0, "tensors": [{"name": "model.layers.0.mlp.down_proj.weight",
      "merged": True, "weight": 0.9, "interference": 0.1}]}, buffers[2])
rows = [{"name": n, "unsafe_rate": 0.5, "utility": 0.5, "skill": 0.5, "harmless_refusal": 0.1}
        for n in ("base", "aligned", "task", "enchtable")]
plot_results([rows], sys.argv[1] + "/demo.png")
plots.bars("t", {"ours/tiny": {"median": 1.0, "min": 0.9, "max": 1.1}}, sys.argv[1] + "/bars.png")
assert all(b.getvalue()[:8] == b"\x89PNG\r\n\x1a\n" for b in buffers)
assert matplotlib.get_backend() == "svg", matplotlib.get_backend()
assert "matplotlib.pyplot" not in sys.modules
print("ok")
"""


def test_plots_leave_the_backend_and_pyplot_alone(tmp_path):
    run = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]
    assert (tmp_path / "demo.png").read_bytes()[:4] == b"\x89PNG" == (tmp_path / "bars.png").read_bytes()[:4]
