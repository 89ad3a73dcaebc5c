"""An estimate of the time `flsl eval davis` takes on the 30 sequences of DAVIS 2017 val
(1,999 frames) for ViT-S/16, from a few synthetic 854 x 480 frames on this machine.

    python scripts/davis-estimate.py [--device cpu|cuda] [--frames 16] [--objects 2] [--json OUT]

The DAVIS data is not needed (nor any network): the script writes a synthetic sequence in the
DAVIS layout (854 x 480 JPEGs, palette PNGs, `--objects` moving shapes), times each stage of one
frame with the code `flsl eval davis` runs (timm's vit_small_patch16_224 with random weights,
which costs what trained weights cost), with the propagation's context full (the first frame
and 7 previous ones, as for all but the first 7 frames of a sequence), then runs the whole
evaluation on the sequence once to check that the stages add up. The estimate is
    model load + 1,999 x (read + forward + propagate + upsample/write + measures)
and is an extrapolation, not a measurement of DAVIS itself.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flsl_cli.config.schema import DavisEvalConfig
from flsl_cli.eval.backbones import ModelSpec, load_eval_model
from flsl_cli.eval.davis.api import evaluate_model
from flsl_cli.eval.davis.frames import (
    frame_tensor,
    model_size,
    read_image,
    to_original_size,
    write_palette_png,
)
from flsl_cli.eval.davis.measures import frame_measures
from flsl_cli.eval.davis.propagation import (
    PropagationSettings,
    Propagator,
    upsample_labels,
)
from flsl_cli.eval.report import Reporter

DAVIS_VAL_FRAMES = 1999
DAVIS_VAL_SEQUENCES = 30
HEIGHT, WIDTH = 480, 854
MODEL = "timm:vit_small_patch16_224"


def write_sequence(root: Path, *, frames: int, objects: int) -> None:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    background = 110 + 20 * np.kron(rng.normal(0, 1, (HEIGHT // 16, WIDTH // 16 + 1)), np.ones((16, 16)))[:, :WIDTH]
    palette = [0, 0, 0] + [v for i in range(1, 256) for v in ((i * 97) % 256, (i * 57) % 256, (i * 31) % 256)]
    names = ("JPEGImages", "Annotations")
    for name in names:
        (root / name / "480p" / "synthetic").mkdir(parents=True, exist_ok=True)
    for t in range(frames):
        image = np.repeat(background[..., None], 3, axis=2)
        ids = np.zeros((HEIGHT, WIDTH), np.uint8)
        for o in range(objects):
            cy, cx = 120 + 200 * (o % 2) + 3 * t, 150 + 250 * o + 8 * t
            inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= 70**2
            image[inside] = (200 - 60 * o, 40 + 70 * o, 60)
            ids[inside] = o + 1
        Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(
            root / names[0] / "480p" / "synthetic" / f"{t:05d}.jpg", quality=90
        )
        mask = Image.frombytes("P", (WIDTH, HEIGHT), ids.tobytes())
        mask.putpalette(palette)
        mask.save(root / names[1] / "480p" / "synthetic" / f"{t:05d}.png")
    (root / "ImageSets" / "2017").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "2017" / "val.txt").write_text("synthetic\n")


def timed(action, repeat: int) -> float:
    """Seconds per call, the median of `repeat` calls after one untimed call."""
    action()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--frames", type=int, default=16, help="frames of the synthetic sequence")
    parser.add_argument("--objects", type=int, default=2, help="objects per frame (scored per object)")
    parser.add_argument("--repeat", type=int, default=3, help="timed calls per stage")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    started = time.perf_counter()
    model = load_eval_model(ModelSpec(model=MODEL, random_init=True))
    model.module.to(device)
    load_seconds = time.perf_counter() - started
    settings = DavisEvalConfig(davis="unused", batch_size=args.batch_size)
    size_hw = model_size(HEIGHT, WIDTH, short_side=settings.short_side, patch=model.patch_size)
    grid_hw = (size_hw[0] // model.patch_size, size_hw[1] // model.patch_size)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with tempfile.TemporaryDirectory(prefix="flsl-davis-bench-") as tmp:
        root = Path(tmp) / "DAVIS"
        write_sequence(root, frames=args.frames, objects=args.objects)
        jpeg = root / "JPEGImages" / "480p" / "synthetic" / "00001.jpg"
        png = root / "Annotations" / "480p" / "synthetic" / "00001.png"
        stages = {}
        stages["read"] = timed(
            lambda: (
                frame_tensor(read_image(str(jpeg)), size_hw=size_hw, mean=model.mean, std=model.std),
                np.array(read_image(str(png))),
            ),
            args.repeat,
        )
        batch = torch.stack(
            [frame_tensor(read_image(str(jpeg)), size_hw=size_hw, mean=model.mean, std=model.std)] * args.batch_size
        ).to(device)

        def forward() -> None:
            model.tokens(batch)
            sync()

        stages["forward"] = timed(forward, args.repeat) / args.batch_size
        dim = model.embed_dim
        features = [torch.randn(grid_hw[0] * grid_hw[1], dim, device=device) for _ in range(9)]
        labels = torch.nn.functional.one_hot(
            torch.randint(0, args.objects + 1, (grid_hw[0] * grid_hw[1],)), args.objects + 1
        ).to(device)
        propagator = Propagator(features[0], labels, grid_hw=grid_hw, settings=PropagationSettings())
        for f in features[1:8]:
            propagator.step(f)  # the context full: the first frame and 7 previous ones

        def propagate() -> None:
            propagator.step(features[8])
            sync()

        stages["propagate"] = timed(propagate, args.repeat)
        soft = propagator.step(features[8])
        truth = np.array(read_image(str(png)))
        stages["upsample_write"] = timed(
            lambda: write_palette_png(
                to_original_size(
                    upsample_labels(soft, grid_hw=grid_hw, patch=model.patch_size), size_hw=(HEIGHT, WIDTH)
                ),
                palette=[0] * 768,
            ),
            args.repeat,
        )
        predicted = np.roll(truth, 5, axis=1)
        stages["measures"] = timed(
            lambda: frame_measures(torch.from_numpy(predicted), torch.from_numpy(truth), objects=args.objects),
            args.repeat,
        )
        per_frame = sum(stages.values())
        start = time.perf_counter()
        results = evaluate_model(
            model,
            settings=settings.model_copy(update={"davis": str(root)}),
            device=device,
            reporter=Reporter(enabled=False),
        )
        whole = time.perf_counter() - start
    estimate = load_seconds + DAVIS_VAL_FRAMES * per_frame
    figures = {
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
        "model": MODEL,
        "model_size_hw": list(size_hw),
        "grid_hw": list(grid_hw),
        "objects_per_frame": args.objects,
        "seconds_per_frame": {k: round(v, 4) for k, v in stages.items()},
        "seconds_per_frame_total": round(per_frame, 4),
        "model_load_seconds": round(load_seconds, 2),
        "check": {
            "frames": args.frames,
            "seconds": round(whole, 2),
            "seconds_per_frame": round(whole / args.frames, 4),
            "JF_mean": results["overall"]["JF_mean"],
        },
        "estimate_davis_val_seconds": round(estimate, 1),
        "davis_val_frames": DAVIS_VAL_FRAMES,
        "davis_val_sequences": DAVIS_VAL_SEQUENCES,
    }
    print(json.dumps(figures, indent=1))
    print(
        f"estimate for DAVIS 2017 val ({DAVIS_VAL_SEQUENCES} sequences, {DAVIS_VAL_FRAMES} frames), ViT-S/16 on "
        f"{args.device}: {estimate / 60:.1f} min ({per_frame:.3f} s per frame; the whole evaluation of "
        f"{args.frames} synthetic frames took {whole / args.frames:.3f} s per frame)"
    )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()
