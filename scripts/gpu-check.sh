#!/usr/bin/env bash
# The GPU check: what flsl does on one CUDA GPU, in one run of under 8 minutes, without network.
#
#   bash scripts/gpu-check.sh            (figures and logs under $OUT when set, else a temporary folder)
#
# 1. the CUDA tests (`pytest -m cuda`; they skip without a GPU);
# 2. `flsl bench step recipes/vits16_300ep.yaml` (64 images): the eager baseline against flsl, then
#    flsl with fused modes, then with fused modes and torch.compile; ViT-B/16 and ViT-S/8 at 64
#    images for their peak memory;
# 3. demo shards made at 400 px (`flsl data demo --image-size 400`), `flsl bench e2e` on them when
#    that command exists, and a 200-step `flsl pretrain` of vits16 on them with `--devices 1`;
# 4. the DAVIS estimate (`scripts/davis-estimate.py`: `flsl eval davis`'s stages at ViT-S/16 on synthetic
#    854 x 480 frames, extrapolated to the 1,999 frames of DAVIS 2017 val);
# 5. a summary table, also written as $OUT/gpu-check.json.
#
# A failed part is reported and the next one runs. Environment knobs, for a dry run on a CPU:
#   DEVICE=cpu  BENCH_STEPS=N  BENCH_BATCH=N  PRETRAIN_STEPS=N  DEMO_IMAGES=N  SKIP_COMPILE=1
#   CHECK_SET="--set model.depth=1 ..."   (extra recipe overrides for every bench and the pretrain)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
DEVICE="${DEVICE:-cuda}"
BENCH_STEPS="${BENCH_STEPS:-30}"
PRETRAIN_STEPS="${PRETRAIN_STEPS:-200}"
DEMO_IMAGES="${DEMO_IMAGES:-1000}"
RESULTS="${OUT:-$(mktemp -d -t flsl-gpu-check-XXXXXX)}"
WORK="$(mktemp -d -t flsl-gpu-check-work-XXXXXX)"  # shards and the run: large, kept out of $OUT
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$RESULTS"
read -r -a EXTRA <<< "${CHECK_SET:-}"
BATCH=()
[ -n "${BENCH_BATCH:-}" ] && BATCH=(--batch "$BENCH_BATCH")
WORKERS=$(( $(nproc) > 4 ? $(nproc) - 2 : 2 ))
: > "$RESULTS/parts.tsv"

FLSL=("$PY" -m flsl_cli)

part() {  # part NAME SECONDS COMMAND...: run with a time limit, log to $RESULTS/NAME.log
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    echo "== $name (at most ${limit}s)"
    timeout --signal=INT --kill-after=20 "$limit" "$@" > "$RESULTS/$name.log" 2>&1
    rc=$?
    tail -n 30 "$RESULTS/$name.log"
    echo "== $name: exit $rc after $((SECONDS - start))s"
    printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" >> "$RESULTS/parts.tsv"
}

echo "flsl GPU check: device $DEVICE, results in $RESULTS"
"$PY" - <<'PY' > "$RESULTS/machine.txt" 2>&1
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0), "bf16", torch.cuda.is_bf16_supported())
PY
cat "$RESULTS/machine.txt"

part cuda-tests 150 "$PY" -m pytest -q -m cuda -p no:cacheprovider tests
# bf16 autocast (optim.precision=auto) is what this check measures; the recipes default to fp32 until it has.
BF16=(--set optim.precision=auto)
step=(bench step recipes/vits16_300ep.yaml --device "$DEVICE" --steps "$BENCH_STEPS" "${BATCH[@]}" "${BF16[@]}" "${EXTRA[@]}")
part bench-step 120 "${FLSL[@]}" "${step[@]}" --out "$RESULTS/step.json"
part bench-step-fused 120 "${FLSL[@]}" "${step[@]}" --set optim.fused_modes=true --out "$RESULTS/step-fused.json"
if [ -z "${SKIP_COMPILE:-}" ]; then
    part bench-step-compile 200 "${FLSL[@]}" "${step[@]}" --set optim.fused_modes=true --compile \
        --out "$RESULTS/step-compile.json"
fi

# Peak memory at 64 images per GPU for the larger models (must fit in 80 GB).
for model in vitb16 vits8; do
    part "bench-step-$model" 120 "${FLSL[@]}" bench step "recipes/${model}_300ep.yaml" --device "$DEVICE" --steps 2 \
        --warmup 1 "${BATCH[@]}" "${BF16[@]}" "${EXTRA[@]}" --out "$RESULTS/step-$model.json"
done

part demo-data 120 "${FLSL[@]}" data demo "$WORK/demo400" --images "$DEMO_IMAGES" --image-size 400
if "${FLSL[@]}" bench e2e --help > /dev/null 2>&1; then
    part bench-e2e 150 "${FLSL[@]}" bench e2e recipes/vits16_300ep.yaml --data "$WORK/demo400/train" \
        --device "$DEVICE" --steps "$BENCH_STEPS" --workers "$WORKERS" "${BATCH[@]}" "${BF16[@]}" "${EXTRA[@]}" \
        --out "$RESULTS/e2e.json"
else
    echo "== bench-e2e: this flsl has no \`flsl bench e2e\`; skipped"
fi
part pretrain 240 "${FLSL[@]}" pretrain recipes/vits16_300ep.yaml --devices 1 --run-dir "$WORK/run" --force \
    --set "data.train=$WORK/demo400/train" --set "data.num_workers=$WORKERS" --set data.shuffle_buffer=500 \
    --set optim.global_batch_size=64 --set "optim.max_steps=$PRETRAIN_STEPS" --set logging.every_steps=10 \
    --set checkpoint.every_minutes=null --set checkpoint.every_steps=null "${BF16[@]}" "${EXTRA[@]}"
cp "$WORK/run/metrics.jsonl" "$RESULTS/pretrain-metrics.jsonl" 2> /dev/null
# DAVIS 2017 val at ViT-S/16 (`flsl eval davis`): per-frame stages on synthetic 854 x 480 frames, extrapolated.
part davis-estimate 150 "$PY" scripts/davis-estimate.py --device "$DEVICE" --frames 24 --json "$RESULTS/davis.json"

"$PY" - "$RESULTS" <<'PY'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
parts = [line.split("\t") for line in (out / "parts.tsv").read_text().splitlines() if line]
summary = {"machine": (out / "machine.txt").read_text().strip(), "parts": {}, "step": {}, "pretrain": None, "e2e": None}
print(f"\n{'part':<20} {'exit':>5} {'seconds':>8}")
for name, rc, seconds in parts:
    summary["parts"][name] = {"exit": int(rc), "seconds": int(seconds)}
    print(f"{name:<20} {rc:>5} {seconds:>8}")
print(f"\n{'bench step':<34} {'step ms':>8} {'images/s':>9} {'MFU':>6} {'peak GiB':>9} {'vs baseline':>12}")
for name in ("step", "step-fused", "step-compile", "step-vitb16", "step-vits8"):
    path = out / f"{name}.json"
    if not path.exists():
        continue
    figures = json.loads(path.read_text())
    summary["step"][name] = figures
    for variant, run in figures["variants"].items():
        label = f"{name}: {variant}"
        mfu = "-" if run["mfu"] is None else f"{run['mfu']:.1%}"
        memory = "-" if run["peak_memory_bytes"] is None else f"{run['peak_memory_bytes'] / 2**30:.2f}"
        ratio = f"{figures['speedup']:.2f}" if variant == "flsl" else "1.00"
        print(f"{label:<34} {run['step_seconds'] * 1000:>8.1f} {run['images_per_second']:>9.1f} {mfu:>6} {memory:>9} {ratio:>12}")
if (out / "e2e.json").exists():
    summary["e2e"] = e2e = json.loads((out / "e2e.json").read_text())
    workers = ", ".join(f"{path} {ms:.2f}" for path, ms in e2e["worker_cpu_ms_per_image"].items())
    print(f"\nbench e2e (views on {e2e['settings']['view_device']}): step alone {e2e['step']['images_per_second']:.1f} "
          f"images/s, from shards {e2e['e2e']['images_per_second']:.1f} images/s ({e2e['e2e_fraction_of_step']:.1%}); "
          f"data-worker CPU ms/image: {workers}")
metrics = out / "pretrain-metrics.jsonl"
if metrics.exists():
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    rows = [row for row in rows if "loss" in row]
    if rows:
        rates = [row["images_per_s"] for row in rows[len(rows) // 2:] if "images_per_s" in row]
        summary["pretrain"] = {"steps": rows[-1]["step"], "first_loss": rows[0]["loss"], "last_loss": rows[-1]["loss"],
                               "images_per_s_second_half": sum(rates) / len(rates) if rates else None}
        p = summary["pretrain"]
        rate = "-" if p["images_per_s_second_half"] is None else f"{p['images_per_s_second_half']:.1f}"
        print(f"\npretrain vits16 on 400 px demo shards: {p['steps']} steps, loss {p['first_loss']:.4f} -> "
              f"{p['last_loss']:.4f}, {rate} images/s (second half)")
if (out / "davis.json").exists():
    summary["davis"] = davis = json.loads((out / "davis.json").read_text())
    stages = ", ".join(f"{name} {seconds * 1000:.0f}" for name, seconds in davis["seconds_per_frame"].items())
    print(f"\nflsl eval davis, ViT-S/16 at {davis['model_size_hw'][1]} x {davis['model_size_hw'][0]}: "
          f"{davis['seconds_per_frame_total'] * 1000:.0f} ms per frame ({stages} ms); estimate for DAVIS 2017 val "
          f"({davis['davis_val_frames']} frames): {davis['estimate_davis_val_seconds'] / 60:.1f} min (extrapolated)")
(out / "gpu-check.json").write_text(json.dumps(summary, indent=1) + "\n")
print(f"\nwrote {out / 'gpu-check.json'}")
failed = [name for name, rc, _ in parts if rc != "0"]
sys.exit(1 if failed else 0)
PY
