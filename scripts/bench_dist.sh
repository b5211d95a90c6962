#!/usr/bin/env bash
# Data-parallel throughput of `train hypernet` on this machine (docs/SCALING.md): 1 process ×
# T threads against T processes × 1 thread (Gloo over 127.0.0.1), same global batch, with
# 1 process × 1 thread as the baseline, and the all-reduce time per step against the step time
# (rank 0's wall time inside the collectives: it includes waiting for the slower rank).
# Steady state: the first 2 steps are skipped; medians over the remaining steps.
#   scripts/bench_dist.sh [THREADS=2] [STEPS=10] [REPS=2]
# Needs target/release/loracast (cargo build --release). Toy base, toy world, the shipped
# recipe's decoder (configs/toy/hypernet.json) at batch 8, the tiny test ViT as the encoder.
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${1:-2} steps=${2:-10} reps=${3:-2}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 - "$tmp/h.json" "$steps" <<'PY'
import json, sys
c = json.load(open("configs/toy/hypernet.json"))
c["loop"].update(steps=int(sys.argv[2]), warmup=0, cooldown=0, checkpoint_every=10**6, log_every=1)
c["batch"] = 8
json.dump(c, open(sys.argv[1], "w"))
PY
run() { # run NAME NPROC THREADS(total)
  local out="$tmp/$1"
  rm -rf "$out"
  local args=(train hypernet --base toy --encoder tests/fixtures/metrics/dino --data toy
              --config "$tmp/h.json" --out "$out")
  if [ "$2" -gt 1 ]; then args+=(--nproc "$2"); fi
  OMP_NUM_THREADS=$3 target/release/loracast "${args[@]}" 2>/dev/null
  python3 - "$out/run/metrics.jsonl" "$1" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
t = [r["elapsed_s"] for r in rows]
steps = [b - a for a, b in zip(t[1:], t[2:])]  # steps 3.. (after warm-up)
step = sorted(steps)[len(steps) // 2]
comm = sorted(r.get("comm_s", 0.0) for r in rows[2:])[len(rows[2:]) // 2]
print(f"{sys.argv[2]:>14}: median step {step*1000:7.0f} ms  {8/step:6.2f} samples/s"
      f"  all-reduce {comm*1000:6.1f} ms/step ({100*comm/step:4.1f} % of the step)")
PY
}
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg), $(nproc) CPUs"
for r in $(seq "$reps"); do
  run "1x1thread" 1 1
  run "1x${threads}threads" 1 "$threads"
  run "${threads}x1thread" "$threads" "$threads"
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
python3 - "$tmp/2x1thread/run/checkpoint.safetensors" <<'PY' 2>/dev/null || true
import json, struct, sys
with open(sys.argv[1], "rb") as f:
    n = struct.unpack("<Q", f.read(8))[0]
    head = json.loads(f.read(n))
numel = lambda s: eval("*".join(map(str, s)) or "1")
p = sum(numel(v["shape"]) for k, v in head.items()
        if k != "__metadata__" and not k.startswith(("adam_", "encoder.")))
print(f"gradient all-reduced per step: {p} f32 = {p*4/2**20:.1f} MiB")
PY
