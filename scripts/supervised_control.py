"""Supervised control for the learning study (docs/learning.md): the demo recipe's backbone
trained with labels, evaluated with the same bbox k-NN as every other row.

It answers "can this architecture, at this size and this length, learn box features that the
k-NN reads better than a random init's, given the labels?" If it can, the evaluation and the
architecture are not what stops the self-supervised runs; if it cannot, no objective will
within a CPU demo.

The model: the recipe's backbone (random init, seed 0: the weights `flsl knn-eval --random-init`
evaluates), mean-pooled tokens, one linear layer to the classes; cross-entropy on the image's
label (the class of its largest object). The data: the demo's train split, every image in
memory, views by random resized crop (scale 0.25-1, the size the recipe trains at) and a
horizontal flip, normalised as flsl normalises. The schedule: the recipe's batch, epochs,
peak learning rate, warm-up and cosine decay (flsl's own `Schedules`; AdamW, the recipe's
weight decay). The k-NN: the recipe's `eval.knn` on the backbone every `--eval-every` epochs,
through flsl's own evaluation.

    python scripts/supervised_control.py recipes/demo.yaml --set data.train=/tmp/demo/train \\
        --set 'eval.knn={train: /tmp/demo/train, val: /tmp/demo/val, k: [10, 20], resize: 72, crop: 64}'
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image
from torchvision.transforms import v2

from flsl_cli.config.load import load_recipe
from flsl_cli.data.normalize import IMAGENET_MEAN, IMAGENET_STD
from flsl_cli.data.shards import resolve_shards
from flsl_cli.eval.api import evaluate_during_training
from flsl_cli.eval.backbones import random_init_backbone
from flsl_cli.train.schedules import Schedules


def read_split(location: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image (uint8, N x 3 x H x W) and label of a split of webdataset shards."""
    urls = [shard.url for shard in resolve_shards(location).shards]
    images, labels = [], []
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        picture = Image.open(io.BytesIO(sample["jpg"])).convert("RGB")
        images.append(v2.functional.pil_to_tensor(picture))
        labels.append(int(sample["cls"]))
    return torch.stack(images), torch.tensor(labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--eval-every", type=int, default=2, help="epochs between k-NN evaluations")
    parser.add_argument("--out", type=Path, help="also write the curve here (JSON)")
    args = parser.parse_args()
    recipe = load_recipe(args.recipe, overrides=args.overrides)
    assert recipe.eval.knn is not None, "give eval.knn (train and val splits)"
    torch.manual_seed(recipe.optim.seed)

    images, labels = read_split(recipe.data.train)
    classes = int(labels.max()) + 1
    backbone = random_init_backbone(recipe).train()
    classifier = torch.nn.Linear(backbone.embed_dim, classes)
    parameters = [*backbone.parameters(), *classifier.parameters()]
    batch = recipe.optim.global_batch_size
    steps_per_epoch = len(images) // batch
    schedules = Schedules(recipe=recipe, steps_per_epoch=steps_per_epoch)
    optimizer = torch.optim.AdamW(parameters, lr=schedules.peak_lr(), weight_decay=recipe.optim.weight_decay)
    views = v2.Compose(
        [
            v2.RandomResizedCrop(recipe.augment.global_size, scale=(0.25, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    device = torch.device("cpu")
    curve = [{"epoch": 0, **evaluate_during_training(backbone=backbone, settings=recipe.eval.knn, device=device)}]
    print(json.dumps(curve[-1]), flush=True)
    step = 0
    for epoch in range(1, recipe.optim.epochs + 1):
        order = torch.randperm(len(images))
        started, seen, correct, loss_sum = time.time(), 0, 0, 0.0
        for index in range(steps_per_epoch):
            chosen = order[index * batch : (index + 1) * batch]
            inputs = torch.stack([views(image) for image in images[chosen]])
            for group in optimizer.param_groups:
                group["lr"] = schedules.lr(step)
            logits = classifier(backbone.forward_features(inputs).mean(dim=1))
            loss = F.cross_entropy(logits, labels[chosen])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            seen += len(chosen)
            correct += int((logits.argmax(dim=1) == labels[chosen]).sum())
            loss_sum += float(loss.detach()) * len(chosen)
        row = {"epoch": epoch, "step": step, "loss": loss_sum / seen, "train_accuracy": 100 * correct / seen}
        row["seconds"] = round(time.time() - started, 1)
        if epoch % args.eval_every == 0 or epoch == recipe.optim.epochs:
            row.update(evaluate_during_training(backbone=backbone, settings=recipe.eval.knn, device=device))
            backbone.train()
        curve.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        args.out.write_text(json.dumps(curve, indent=1) + "\n")


if __name__ == "__main__":
    main()
