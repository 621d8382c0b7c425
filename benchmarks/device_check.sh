#!/usr/bin/env bash
# The accelerator check (issue 17): every SVD algorithm of the device timed with its accuracy (svd_algorithms.py),
# then the bench's studies at full size on this machine's first accelerator, each under its own time limit so that
# one slow part cannot cost the others, in under 9 minutes of an H200 (8 min 50 s of limits).
#
#   bash benchmarks/device_check.sh [OUT]        (from anywhere; OUT default: benchmarks/results/<device>)
#   QUICK=1 bash benchmarks/device_check.sh OUT  (the smallest sizes: proves the plumbing on a CPU)
#   STUDIES="gcg:90" bash benchmarks/device_check.sh OUT  (only the parts named, each with its limit in seconds)
#
# OUT receives at most four files, so that the device tool brings them all back from $OUT: summary.md (the
# machine, the SVD algorithms' table, then every study's bench.md), log.txt (everything printed), results.tar.gz
# (svd/svd_algorithms.json and each study's folder: bench.json, bench.md, plots) and env.txt. On the device machine the package runs from the working tree
# (PYTHONPATH), with the JAX, torch and transformers of the machine's image; studies whose comparison side is
# missing there (mergekit) say so in their results instead of failing. Record what it measured in
# BENCHMARKS.md with the date, the machine and the command.
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python="${PYTHON:-python3}"
device="$("$python" -c 'import jax; d = jax.devices()[0]; print(f"{d.platform}-{d.device_kind}".lower().replace(" ", "-"))')"
out="${1:-$root/benchmarks/results/$device}"
mkdir -p "$out"
work="$(mktemp -d)"
quick=()
[[ "${QUICK:-0}" == 1 ]] && quick=(--quick)
# part -> seconds it may take (the sum, 530 s, stays under 9 minutes with the startup around it); gcg: batch 512
studies=(${STUDIES:-svd:60 convert:50 linearize:80 ntk:50 distill:80 merge:110 mergekit:30 gcg:70})

{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  uname -m
  "$python" -c 'import jax, sys; print("python", sys.version.split()[0], "jax", jax.__version__, jax.devices())'
  "$python" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())' 2>&1 | tail -1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
} > "$out/env.txt" 2>&1

: > "$out/log.txt"
{ echo "# device check: $device${quick:+ (quick)}"; echo; sed 's/^/    /' "$out/env.txt"; echo; } > "$out/summary.md"
for entry in "${studies[@]}"; do
  study="${entry%%:*}" limit="${entry##*:}"
  echo "=== $study (limit ${limit} s) ===" | tee -a "$out/log.txt"
  start=$SECONDS
  if [[ "$study" == svd ]]; then  # its table goes to stdout, its JSON is rewritten after every measurement
    mkdir -p "$work/svd"
    timeout "$limit" "$python" "$root/benchmarks/svd_algorithms.py" "$work/svd/svd_algorithms.json" "${quick[@]}" \
      > "$work/svd/table.md" 2>> "$out/log.txt"
    status=$?
    cat "$work/svd/table.md" >> "$out/log.txt"
    [[ -s "$work/svd/table.md" ]] && { echo "### SVD algorithms (seconds per ι: two SVDs)"; echo; \
      cat "$work/svd/table.md"; } > "$work/svd/bench.md"
  else
    timeout "$limit" "$python" -m enchtable_jax.bench --suite "$study" "${quick[@]}" --out "$work/$study" \
      >> "$out/log.txt" 2>&1
    status=$?
  fi
  echo "$study: exit $status after $((SECONDS - start)) s" | tee -a "$out/log.txt"
  if [[ -f "$work/$study/bench.md" ]]; then
    cat "$work/$study/bench.md" >> "$out/summary.md"
  else
    echo "## $study: no result (exit $status$([[ $status == 124 ]] && echo ", over its ${limit} s"))" >> "$out/summary.md"
  fi
  echo >> "$out/summary.md"
done
tar -czf "$out/results.tar.gz" -C "$work" .
rm -rf "$work"
echo "device check written to $out"
