"""Study: HF safetensors folder → parameters (`enchtable_jax.load`, i.e. `converters.hf.read_hf`) and back
(`enchtable_jax.save`, i.e. `write_hf`), in MB/s, against the `safetensors` library on the same files.

One random float32 folder per run: `--quick` the tiny preset in one file; full: SmolLM2-135M's shape
(538 MB) in 256 MB shards with an index. Four implementations alternate in this process:
- ours_load: `enchtable_jax.load(folder)`: header and shape checks, every tensor read and placed on the
  default device (blocked on);
- safetensors_load (the floor): `safetensors.numpy.load_file` of every shard, into numpy;
- ours_save: `enchtable_jax.save(model, out, overwrite=True)`: config files, shards, index, atomic rename;
- safetensors_save: `safetensors.numpy.save_file` of the same tensors, same shards (no config or index).
The files sit in the page cache after the first call, so these are memory-speed figures, not disk.

`convert_fraction_of_floor` (target ≥ 0.5) = ours load MB/s / safetensors load MB/s, per repeat (paired
by alternation); `convert_write_fraction_of_floor` the same for writing. Peak RSS of one load of each
kind is measured in a fresh process (`bench.process`), with the RSS after imports, so that the memory a
load needs beyond the runtime can be compared with the model's size.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import jax

from enchtable_jax import api
from enchtable_jax.bench.optional import optional_module
from enchtable_jax.bench.process import run_fresh
from enchtable_jax.bench.synthetic import folder_bytes, write_model
from enchtable_jax.bench.timing import alternate, rate, ratio, summary
from enchtable_jax.models.init import preset_config

MB = 1e6

_OURS_LOAD = """
import time
import jax
from enchtable_jax import api
rss0 = peak_rss_bytes()
start = time.perf_counter()
model = api.load(ARGS["folder"], progress=False)
jax.block_until_ready(model.params)
print(json.dumps({"seconds": time.perf_counter() - start, "rss_after_import_bytes": rss0,
                  "peak_rss_bytes": peak_rss_bytes()}))
"""
_SAFETENSORS_LOAD = """
import time
from safetensors.numpy import load_file
rss0 = peak_rss_bytes()
start = time.perf_counter()
tensors = [load_file(f) for f in ARGS["files"]]
print(json.dumps({"seconds": time.perf_counter() - start, "rss_after_import_bytes": rss0,
                  "peak_rss_bytes": peak_rss_bytes()}))
"""


def _cold_load(code: str, args: dict, nbytes: int) -> dict:
    """One load in a fresh process: seconds, RSS after imports, peak RSS, and the peak above imports / model."""
    got = run_fresh(code, args)
    return {**got, "extra_rss_over_model": (got["peak_rss_bytes"] - got["rss_after_import_bytes"]) / nbytes}


SIZES = ("tiny", "smollm2-135m")  # `--quick` the first, full the second; `--size` either


def run(quick: bool = False, repeats: int | None = None, size: str | None = None) -> dict:
    preset = size or SIZES[0 if quick else 1]
    shard_size = "5GB" if preset == "tiny" else "256MB"
    repeats = repeats or (3 if preset == "tiny" else 9)  # a full repeat takes ~2 s: more of them tame the noise
    st, st_missing = optional_module("safetensors.numpy")
    config = preset_config(preset)
    with tempfile.TemporaryDirectory(prefix="convert-study-") as tmp:
        tmp = Path(tmp)
        folder = write_model(tmp / "model", config, shard_size=shard_size)
        files = sorted(folder.glob("*.safetensors"))
        nbytes = folder_bytes(folder)
        model = api.load(folder, progress=False)

        def ours_load():
            jax.block_until_ready(api.load(folder, progress=False).params)

        fns = {"ours_load": ours_load,
               "ours_save": lambda: api.save(model, tmp / "ours-out", shard_size=shard_size, overwrite=True,
                                             progress=False)}
        if st is not None:
            shards = [st.load_file(f) for f in files]
            (tmp / "st-out").mkdir()
            fns["safetensors_load"] = lambda: [st.load_file(f) for f in files]
            fns["safetensors_save"] = lambda: [st.save_file(t, tmp / "st-out" / f.name, metadata={"format": "pt"})
                                               for t, f in zip(shards, files)]
        times = alternate(fns, repeats)
        cold = {"ours_load": _cold_load(_OURS_LOAD, {"folder": str(folder)}, nbytes)}
        if st is not None:
            cold["safetensors_load"] = _cold_load(_SAFETENSORS_LOAD, {"files": [str(f) for f in files]}, nbytes)
    figures = {
        "preset": preset, "setup": f"{preset}, {nbytes / MB:,.1f} MB float32 in {len(files)} file(s), "
                                   f"{repeats} repeats",
        "repeats": repeats, "bytes": nbytes, "files": len(files),
        "seconds": {name: summary(t) for name, t in times.items()},
        "megabytes_per_second": {name: rate(nbytes / MB, t) for name, t in times.items()},
        "cold": cold, "samples": times,
    }
    if st is None:
        figures["unavailable"] = {"safetensors_load": st_missing, "safetensors_save": st_missing}
    else:
        figures["convert_fraction_of_floor"] = ratio(times["safetensors_load"], times["ours_load"])
        figures["convert_write_fraction_of_floor"] = ratio(times["safetensors_save"], times["ours_save"])
        figures["load_peak_rss_over_floor"] = cold["ours_load"]["peak_rss_bytes"] / cold["safetensors_load"][
            "peak_rss_bytes"]
    return figures
