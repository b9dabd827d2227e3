#!/usr/bin/env bash
# Testbed training variants side by side in one GPU command (one H200): each variant trains from the committed
# weights (weights/testbed) in its own process, all at once (one training process keeps the H200 about 10% busy:
# ~55 TFLOP/s at 182 ms per step, so concurrent variants cost little step rate), then the attention structure of
# each is measured on the same held-out clips as results/testbed/README.md (plain world data; a variant that
# changes the data is also measured on its own data). Comes back in at most 8 files: ab.tgz (every variant's
# stdout, summary, structure.json) and the weights (2 int8 shards + weights_rest.tgz) of the variants named by
# --keep (at most 2).
#   bash experiments/testbed_ab.sh <train seconds> <variant>...   variant = name:"train args" (name: [a-z0-9_])
#   bash experiments/testbed_ab.sh 380 'control:' 'detail:--world-detail 0.8' 'qknorm:--qk-norm-lr-mult 10'
# KEEP="detail qknorm" picks whose weights come back (default: every variant but control, at most 2).
# STRUCTURE="..." replaces the structure script's arguments (CPU smoke run: "--point quick --clips 1 --rows 8
# --recall-layers 1 --device cpu").
set -uo pipefail
budget=${1:?seconds of training per variant}; shift
: "${OUT:?set OUT to the folder that comes back}"
export PYTHONUNBUFFERED=1
structure=${STRUCTURE:---clips 2 --rows 256 --recall-layers 1,3,5,7}
root=${AB_ROOT:-/tmp/testbed_ab}
rm -rf "$root"; mkdir -p "$root"
names=()
for spec in "$@"; do
  name=${spec%%:*}; args=${spec#*:}
  case "$name" in ""|*[!a-z0-9_]*) echo "variant name '$name' must be [a-z0-9_]+ (name:args)"; exit 2 ;; esac
  names+=("$name")
  mkdir -p "$root/$name"
  # shellcheck disable=SC2086  # args is a list of training flags
  python3 experiments/train_testbed.py --out "$root/$name/run" --ckpt "$root/$name/ckpt.pt" --no-resume \
    --init-from weights/testbed --time-budget "$budget" $args > "$root/$name/train_stdout.txt" 2>&1 &
done
wait
for name in "${names[@]}"; do
  tail -2 "$root/$name/train_stdout.txt" | sed "s/^/[$name] /"
  (
    # shellcheck disable=SC2086
    python3 experiments/testbed_structure.py --weights "$root/$name/run/weights" --out "$root/$name/structure" \
      $structure > "$root/$name/structure_stdout.txt" 2>&1
  ) &
done
wait
# A data variant is also measured on its own data.
for spec in "$@"; do
  name=${spec%%:*}; args=${spec#*:}
  detail=$(grep -o -- '--world-detail [0-9.]*' <<< "$args" || true)
  if [ -n "$detail" ]; then
    # shellcheck disable=SC2086
    python3 experiments/testbed_structure.py --weights "$root/$name/run/weights" --out "$root/$name/structure_own" \
      $structure $detail > "$root/$name/structure_own_stdout.txt" 2>&1 &
  fi
done
wait
for name in "${names[@]}"; do
  echo "== $name"; grep -iE "top-15|content heads|recall" "$root/$name/structure_stdout.txt" | head -6
done
tar -C "$root" -czf "$OUT/ab.tgz" --exclude='ckpt.pt' --exclude='*.safetensors' --exclude='weights' .
keep=${KEEP:-$(printf '%s\n' "${names[@]}" | grep -v '^control$' | head -2 | tr '\n' ' ')}
for name in $keep; do
  w="$root/$name/run/weights"
  for f in "$w"/transformer/diffusion_pytorch_model.int8*.safetensors; do cp "$f" "$OUT/${name}__$(basename "$f")"; done
  tar -C "$root/$name/run" -czf "$OUT/${name}__weights_rest.tgz" --exclude='*.safetensors' weights summary.json
done
ls -la "$OUT"
