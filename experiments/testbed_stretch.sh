#!/usr/bin/env bash
# One GPU command of testbed training: resume (checkpoint in /tmp, else the committed weights), train for
# $1 seconds, export, measure the structure figures on held-out clips, and pack what comes back into $OUT
# in at most 8 flat files (the device machine returns files at most 2 folders down, 16 MiB each).
#   bash experiments/testbed_stretch.sh 420 [--lr 5e-4 ...extra train args]
#   bash experiments/testbed_stretch.sh 240 --no-resume --world-detail 0.8   # the data variant (A/B)
set -euo pipefail
budget=${1:-420}; shift || true
# The structure is measured on the data the model trains on: forward a --world-detail given to training.
detail=()
args=("$@")
for i in "${!args[@]}"; do
  if [ "${args[$i]}" = "--world-detail" ]; then detail=(--world-detail "${args[$((i + 1))]}"); fi
done
: "${OUT:?set OUT to the folder that comes back}"
export PYTHONUNBUFFERED=1
python3 experiments/train_testbed.py --out /tmp/testbed/run --ckpt /tmp/testbed/ckpt.pt \
  --init-from weights/testbed --time-budget "$budget" "$@" 2>&1 | tee "$OUT/train_stdout.txt"
python3 experiments/testbed_structure.py --weights /tmp/testbed/run/weights --out /tmp/testbed/structure \
  --clips 2 --rows 256 --recall-layers 1,3,5,7 "${detail[@]}" 2>&1 | tee "$OUT/structure_stdout.txt" || echo "structure failed"
cp /tmp/testbed/structure/structure.json "$OUT/" 2>/dev/null || true
mv /tmp/testbed/run/weights/transformer/diffusion_pytorch_model.int8*.safetensors "$OUT/"
tar -C /tmp/testbed/run -czf "$OUT/weights_rest.tgz" weights summary.json
ls -la "$OUT"
