#!/usr/bin/env bash
# One prepared GPU check (issue 17), for a lent H100/H200: under 8 minutes, one table per part, all output also
# under $OUT (or ./gpu-check-out). Installs nothing from the network: wheels the image lacks come from a carried
# folder, made beforehand on a machine with the package index:
#     pip download --no-deps -d .gpu-wheels lpips==0.1.4 submitit==1.5.4 webdataset braceexpand
#     (then `run` with carry: [".gpu-wheels"])
# Parts:
#   1. calibrate speedrun.yaml, both stages, the whole recipe (TREAD, REPA, LPIPS, DINO, self-guided grid) on
#      synthetic data at the real shapes (512 px x 32, 1024 px x 16 per GPU; 2304-d text, 256 tokens), random
#      frozen networks (no weights files on the device), evaluation off (torchmetrics is not in the image);
#   2. tools/bench_step.py at 512 px: eager vs compiled, and each loss and switch against eager (compiling each
#      variant would not fit the 8 minutes; the calibrate rows are compiled);
#   3. tools/bench_data.py: JPEG decode + crop at 512 and 1024 px with 1, 4 and 8 workers, in the workers (PIL)
#      and with data.decode: device (the workers read headers, nvJPEG decodes on the GPU).
# PIXELDIFF_GPU_CHECK_SMOKE=1 runs the same parts tiny, on the CPU, to check the script itself.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-check-out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python}"
if [ -d .gpu-wheels ]; then
    "$PY" -m pip install --quiet --no-index --find-links .gpu-wheels --no-deps .gpu-wheels/* 2>&1 | tail -2
fi
"$PY" - <<'EOF' | tee "$OUT/device.txt"
import torch, platform
print("torch", torch.__version__, "cuda", torch.version.cuda, "python", platform.python_version())
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only")
EOF
commit="$(git describe --always --dirty 2>/dev/null || echo unknown)"
echo "commit $commit, $(date -u +%Y-%m-%dT%H:%MZ)" | tee -a "$OUT/device.txt"

if [ "${PIXELDIFF_GPU_CHECK_SMOKE:-0}" = 1 ]; then
    MANIFEST=manifests/dryrun.yaml; STEPS=3; SETS=(--set eval.enabled=false)
    BENCH=(--preset tiny --res 32:8 --text-len 8 --text-dim 64 --steps 2 --warmup 1 --modes eager,eager+tread)
    DATA=(--images 64 --size 96x80 --res 64 --per-shard 16 --device cpu); WORKERS="1 2"; RESES="64"
else
    MANIFEST=manifests/speedrun.yaml; STEPS=20
    # synthetic captions are a few words: text untrimmed, at the full 256 tokens real captions can reach
    SETS=(--set data.source=synthetic --set data.text.encoder=builtin --set data.text.prompt_embeddings=null
          --set data.text.trim=false --set eval.enabled=false --set cluster.compile=true)
    BENCH=(--preset JiT-32 --res 512:32 --text-len 256 --text-dim 2304 --steps 10 --warmup 3
           --modes eager,compile,eager+tread,eager+lpips,eager+dino,eager+repa,eager+tread+lpips+dino+repa,eager+muon)
    DATA=(--images 1024 --size 768x640 --per-shard 128 --device cuda); WORKERS="1 4 8"; RESES="512 1024"
fi

echo "== 1. calibrate $MANIFEST ($STEPS steps per stage)" | tee "$OUT/calibrate.txt"
timeout 330 "$PY" -m launcher.cli calibrate "$MANIFEST" --steps "$STEPS" --runs-dir "$OUT/runs" "${SETS[@]}" \
    2>&1 | grep -v '^  | {' | tee -a "$OUT/calibrate.txt"
cp "$OUT"/runs/*-calibrate/calibration.json "$OUT/" 2>/dev/null

echo "== 2. bench_step" | tee "$OUT/bench_step.txt"
timeout 150 "$PY" tools/bench_step.py "${BENCH[@]}" --peak-tflops 989.4 2>&1 | tee -a "$OUT/bench_step.txt"

echo "== 3. bench_data" | tee "$OUT/bench_data.txt"
for res in $RESES; do
    for w in $WORKERS; do
        echo "-- ${res} px, $w worker(s)" | tee -a "$OUT/bench_data.txt"
        timeout 40 "$PY" tools/bench_data.py "${DATA[@]}" --res "$res" --workers "$w" 2>&1 | tail -11 \
            | tee -a "$OUT/bench_data.txt"
    done
done
echo "== done; files in $OUT"
