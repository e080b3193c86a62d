#!/usr/bin/env bash
# The GPU checks of the fast training step, in one go on a CUDA machine (about 8 minutes on one
# H100; 10 at most: the parts' time limits add up to 600 s). Installs nothing. Python: .venv when
# it exists (`make setup`), else the machine's python3 with this checkout on PYTHONPATH, plus
# /tmp/site when pure-Python wheels the machine lacks (jsonschema and its needs, torch-fidelity,
# lpips, pytest and its needs) were installed there with
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
# Writes into ${OUT:-bench_out}/:
#   pytest_gpu.log               pytest -m gpu (tests/test_gpu.py: bf16 + TF32 + fused training
#                                like fp32, compiled step = eager step, no host sync per step)
#   bench_<variant>.jsonl/.log   cm bench on NVlabs/edm's CIFAR-10 DDPM++ at batch 512:
#                                fp32 (no TF32), tf32, bf16 (+ TF32), bf16 + torch.compile
#   bench_imagenet64.jsonl/.log  the class-conditional ImageNet 64 ADM (296M parameters):
#                                teacher and CD steps at batch 256 in passes of 64 (batch_gpu)
#   summary.txt                  img/s and ms per step of every timed figure, one line each
# Exit status 0 when every part passed. `--compile` on cd_step_l2 compiles three networks
# (several minutes): time it separately if wanted.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
if [ -x .venv/bin/python ]; then
  PY=.venv/bin/python
else
  PY=python3
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  [ -d /tmp/site ] && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
export PYTHONUNBUFFERED=1
status=0

part() {  # name, time limit in seconds, command...
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  echo "== $name (at most ${limit} s): $*"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  tail -n 15 "$OUT/$name.log"
  echo "== $name: exit $rc after $((SECONDS - start)) s"
  [ "$rc" -eq 0 ] || status=1
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" \
  >> "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"

part pytest_gpu 180 $PY -m pytest -m gpu -q -s -p no:cacheprovider

BENCH=($PY -m cmcore bench --config config/config.yaml --net cifar10 --device cuda --repeats 5
       --warmup 2)
STEPS=teacher_step,cd_step_l2
part bench_fp32 40 "${BENCH[@]}" --no-bf16 --no-tf32 --only teacher_step \
  --out "$OUT/bench_fp32.jsonl"
part bench_tf32 60 "${BENCH[@]}" --no-bf16 --tf32 --only "$STEPS" --out "$OUT/bench_tf32.jsonl"
part bench_bf16 50 "${BENCH[@]}" --bf16 --tf32 --only "$STEPS,sample_1step" \
  --out "$OUT/bench_bf16.jsonl"
part bench_bf16_compile 150 "${BENCH[@]}" --bf16 --tf32 --compile --only teacher_step \
  --out "$OUT/bench_bf16_compile.jsonl"
part bench_imagenet64 120 $PY -m cmcore bench --config config/config.yaml --net imagenet64 \
  --device cuda --batch 256 --batch-gpu 64 --bf16 --tf32 --repeats 3 --warmup 1 \
  --only teacher_step,cd_step_l2 --out "$OUT/bench_imagenet64.jsonl"

$PY - "$OUT" > "$OUT/summary.txt" <<'PY'
import glob, json, sys
for path in sorted(glob.glob(f"{sys.argv[1]}/bench_*.jsonl")):
    for line in open(path):
        r = json.loads(line)
        if "img_per_s" in r:
            print(f"{path.split('/')[-1]:28s} {r['name']:14s} {r['precision']:5s} "
                  f"compiled={r['compiled']!s:5s} {r['img_per_s']:8.1f} img/s "
                  f"{r['ms_per_step']:8.1f} ms/step {r['tflop_per_s']:6.1f} TFLOP/s "
                  f"{r['peak_mem_mb']:8.0f} MB peak")
PY
cat "$OUT/summary.txt"
echo "gpu_check: $([ $status -eq 0 ] && echo all parts passed || echo SOME PARTS FAILED)"
exit $status
