#!/usr/bin/env bash
# Does a briefly pretrained demo model beat random initialisation in the bounding-box k-NN?
# A measurement, not a test: it prints both models' figures beside the chance level.
#
#   bash scripts/demo-knn.sh [STEPS] [OUT_DIR]     (defaults: 96 steps, a temporary folder)
#
# Makes 1000 demo images (96 px, 800 train / 200 val), pretrains recipes/demo.yaml for STEPS
# steps, then runs `flsl knn-eval` (bbox mode, at the training size 73/64 px, k = 10, 20) on the teacher and on the
# same architecture at random initialisation. About 3 minutes on a 2-core CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS="${1:-96}"
OUT="${2:-$(mktemp -d -t flsl-demo-knn-XXXXXX)}"
DATA="$OUT/demo96"
[ -f "$DATA/train/index.json" ] || flsl data demo "$DATA" --images 1000 --seed 0 --image-size 96
flsl pretrain recipes/demo.yaml --set "data.train=$DATA/train" --set data.demo=null \
    --set "optim.max_steps=$STEPS" --set checkpoint.every_minutes=null --run-dir "$OUT/run" --force
common=(--train "$DATA/train" --val "$DATA/val" --k 10,20)
flsl knn-eval "$OUT/run" "${common[@]}" --out "$OUT/pretrained.json"
flsl knn-eval "$OUT/run" "${common[@]}" --random-init --out "$OUT/random.json"
python3 - "$OUT" "$STEPS" <<'PY'
import json, sys
out, steps = sys.argv[1], sys.argv[2]
ours, theirs = (json.load(open(f"{out}/{name}.json")) for name in ("pretrained", "random"))
chance = ours["chance"]
print(f"bbox k-NN on the demo data after {steps} pretraining steps (chance: top-1 {chance['top1']:.1f}%, "
      f"feature top-1 {chance['feature_top1']:.1f}%)")
print(f"{'k':>3}  {'top-1 pretrained':>17}  {'top-1 random':>12}  {'feature pretrained':>18}  {'feature random':>14}")
for k in ("10", "20"):
    a, b = ours["results"][k], theirs["results"][k]
    print(f"{k:>3}  {a['top1']:>16.1f}%  {b['top1']:>11.1f}%  {a['feature_top1']:>17.1f}%  {b['feature_top1']:>13.1f}%")
PY
