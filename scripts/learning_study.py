"""Figures of the learning study (docs/learning.md) from finished runs: per run, the teacher's
bbox k-NN over training (metrics.jsonl; the recipe's eval.every_epochs) and the collapse
diagnostics of each checkpoint and of a random init (`flsl diagnose`'s figures).

    python scripts/learning_study.py --val VAL_SHARDS RUN_DIR [RUN_DIR ...] [--images 128] [--json OUT]

Prints one markdown table per run; --json writes every figure.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from flsl_cli.checkpoint.store import list_checkpoints
from flsl_cli.config.schema import eval_sizes
from flsl_cli.eval.diagnose import network_diagnostics, random_init_network, read_images
from flsl_cli.models.load import load_network

K = 20


def knn_curve(run_dir: Path) -> dict[int, dict[str, float]]:
    rows = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if f"knn_bbox_feature_top1_k{K}" in row:
            rows[int(row["step"])] = {
                "feature_top1": row[f"knn_bbox_feature_top1_k{K}"],
                "image_top1": row[f"knn_bbox_top1_k{K}"],
            }
    return rows


def study(run_dir: Path, *, val: str, images: int) -> dict:
    steps = {}
    pixels = recipe = None
    for ref in list_checkpoints(run_dir):
        network, recipe, step, _ = load_network(ref.path)
        if pixels is None:
            resize, crop = eval_sizes(recipe.augment.global_size)
            pixels = read_images(val, images=images, resize=resize, crop=crop, patch_size=recipe.model.patch_size)
            steps[0] = network_diagnostics(random_init_network(recipe), pixels, teacher_temp=recipe.loss.teacher_temp)
        steps[step] = network_diagnostics(network, pixels, teacher_temp=recipe.loss.teacher_temp)
    return {"run": str(run_dir), "knn": knn_curve(run_dir), "diagnostics": steps}


def markdown(result: dict) -> str:
    lines = [
        f"**{result['run']}**",
        "",
        "| step | feature top-1 % (k=20) | image top-1 % | eff. rank | cos within | cos between "
        "| teacher entropy | prototypes used |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for step in sorted(set(result["knn"]) | set(result["diagnostics"])):
        knn, diag = result["knn"].get(step, {}), result["diagnostics"].get(step, {})
        cells = [f"{knn[k]:.1f}" if k in knn else "" for k in ("feature_top1", "image_top1")]
        cells += [
            f"{diag[k]:.{p}f}" if k in diag else ""
            for k, p in (
                ("effective_rank", 1),
                ("within_image_cosine", 2),
                ("between_image_cosine", 2),
                ("teacher_entropy", 2),
            )
        ]
        cells.append(f"{diag['prototypes_in_use']:.0%}" if diag else "")
        lines.append(f"| {'0 (random init)' if step == 0 and diag and not knn else step} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--val", required=True)
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = [study(run, val=args.val, images=args.images) for run in args.runs]
    for result in results:
        print(markdown(result), end="\n\n")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
