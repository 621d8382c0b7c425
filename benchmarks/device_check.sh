#!/usr/bin/env bash
# The accelerator check (issue 17): the bench's studies at full size on this machine's first accelerator, each
# under its own time limit so that one slow study cannot cost the others, in well under 8 minutes of an H200.
#
#   bash benchmarks/device_check.sh [OUT]        (from anywhere; OUT default: benchmarks/results/<device>)
#   QUICK=1 bash benchmarks/device_check.sh OUT  (the smallest sizes: proves the plumbing on a CPU)
#
# OUT receives at most four files, so that the device tool brings them all back from $OUT: summary.md (the
# machine, then every study's bench.md), log.txt (everything printed), results.tar.gz (each study's folder:
# bench.json, bench.md, plots) and env.txt. On the device machine the package runs from the working tree
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
# study -> seconds it may take (the sum stays under 8 minutes)
studies=(convert:60 linearize:90 ntk:60 distill:90 merge:120 mergekit:30)

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
  timeout "$limit" "$python" -m enchtable_jax.bench --suite "$study" "${quick[@]}" --out "$work/$study" \
    >> "$out/log.txt" 2>&1
  status=$?
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
