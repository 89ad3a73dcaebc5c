"""What a k-NN evaluation shows and writes: progress bars (rich on a terminal, one plain line per
stage otherwise), the results table, and the JSON file with every number and setting."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from flsl_cli import storage
from flsl_cli.progress import ProgressBars, make_console


class Reporter:
    """Progress of the stages of an evaluation; does nothing when disabled (ranks other than 0)."""

    def __init__(self, *, enabled: bool, console: Console | None = None) -> None:
        self.enabled = enabled
        self.console = console or make_console(stderr=True)

    def note(self, message: str) -> None:
        if self.enabled:
            self.console.print(Text.assemble(("flsl:", "cyan"), f" {message}"), highlight=False)  # not markup

    @contextmanager
    def stage(self, description: str, *, total: int, unit: str) -> Iterator[_Stage]:
        """A progress bar for one stage; yields an object whose `advance(n)` / `set(done, total)`
        move it. Off a terminal a single line is printed when the stage ends."""
        stage = _Stage()
        if not self.enabled:
            yield stage
            return
        started = time.monotonic()
        live = self.console.is_terminal
        progress = None
        if live:
            progress = ProgressBars(
                console=self.console,
                columns=(
                    TextColumn("[bold]{task.description}"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TextColumn(unit),
                    TimeElapsedColumn(),
                    TextColumn("eta"),
                    TimeRemainingColumn(),
                ),
            )
            stage.bind(progress, description, total=total)
        try:
            yield stage
        finally:
            if progress is not None:
                progress.close()
            else:
                self.console.print(
                    f"{description}: {stage.done} {unit} in {time.monotonic() - started:.1f} s",
                    highlight=False,
                    markup=False,
                )


class _Stage:
    def __init__(self) -> None:
        self.done = 0
        self._progress: ProgressBars | None = None
        self._label = ""
        self._total: int | None = None

    def bind(self, progress: ProgressBars, label: str, *, total: int) -> None:
        self._progress, self._label, self._total = progress, label, total
        progress.update(label, done=0, total=total)

    def advance(self, count: int) -> None:
        self.done += count
        if self._progress is not None:
            self._progress.update(self._label, done=self.done, total=self._total)

    def set(self, done: int, total: int) -> None:
        self.done, self._total = done, total
        if self._progress is not None:
            self._progress.update(self._label, done=done, total=total)


def results_table(results: dict[str, Any]) -> Group:
    """Top-1 / top-5 per k, between a line with the main settings and one with the image counts."""
    settings = results["settings"]
    train, val = results["train"], results["val"]
    mode = "bounding-box-aligned" if settings["mode"] == "bbox" else "global (mean-pooled)"
    grid = f", grid {settings['grid']}x{settings['grid']}" if settings["mode"] == "bbox" else ""
    model = results["model"]
    step = f" step {model['step']}" if model.get("step") is not None else ""
    which = f" {model['which']}" if model.get("which") else ""
    random = " (random init)" if model.get("random_init") else ""
    header = Text.assemble(
        (f"k-NN, {mode}", "bold"),
        f"{grid}, T={settings['temperature']}, resize {settings['resize']} / crop "
        f"{settings['crop']} px, patch {settings['patch_size']}\n"
        f"{model.get('source', '')}{step}{which}{random}",
    )
    table = Table(show_header=True)
    table.add_column("k", justify="right", style="bold")
    table.add_column("top-1 %", justify="right")
    table.add_column("top-5 %", justify="right")
    bbox = settings["mode"] == "bbox"
    if bbox:
        table.add_column("feature top-1 %", justify="right")
    for k, row in results["results"].items():
        cells = [str(k), f"{row['top1']:.2f}", f"{row['top5']:.2f}"]
        table.add_row(*cells, *([f"{row['feature_top1']:.2f}"] if bbox else []))
    footer = (
        f"bank: {train['images']} train images ({train['features']} features); queries: {val['images']} "
        f"val images{_skipped_text(train, val)}"
    )
    return Group(header, table, Text(footer), Text(_chance_text(results)))


def _chance_text(results: dict[str, Any]) -> str:
    """The scores uniformly random guesses would get: with few classes the any-of-g rule is
    generous (7 classes, 9 features: 75% top-1), so a result means little unless it is well above."""
    chance, settings = results["chance"], results["settings"]
    bbox = settings["mode"] == "bbox"
    rule = f", any of {settings['features_per_image']}" if bbox else ""
    text = (
        f"chance level ({settings['num_classes']} classes{rule}): "
        f"top-1 {chance['top1']:.2f}%, top-5 {chance['top5']:.2f}%"
    )
    if bbox:
        text += f", feature {chance['feature_top1']:.2f}%"
    return text


def _skipped_text(train: dict[str, Any], val: dict[str, Any]) -> str:
    parts = []
    for name, split in (("train", train), ("val", val)):
        if split["skipped"]:
            reasons = ", ".join(f"{n} {why}" for why, n in split["skipped"].items())
            parts.append(f"{name}: {sum(split['skipped'].values())} skipped ({reasons})")
    return ("; " + "; ".join(parts)) if parts else ""


def write_json(path: Path, results: dict[str, Any]) -> None:
    """Write the results atomically."""
    storage.write_json_atomic(path, results)


def comparison_table(comparison: dict[str, dict[str, float]], *, step: int, settings: Any) -> Group:
    """The end-of-training k-NN of the teacher beside a random init and the chance level (the
    metrics of `evaluate_during_training`), with the teacher's lead in points."""
    mode = settings.mode
    k = sorted(settings.k)[min(1, len(settings.k) - 1)]  # k = 20 with the default list
    column, chance_key = (
        (f"knn_{mode}_feature_top1_k{k}", f"knn_{mode}_chance_feature_top1")
        if mode == "bbox"
        else (f"knn_{mode}_top1_k{k}", f"knn_{mode}_chance_top1")
    )
    teacher, baseline = comparison["teacher"], comparison["random_init"]
    images = int(teacher[f"knn_{mode}_images"])
    measure = "feature top-1" if mode == "bbox" else "top-1"
    table = Table(title=f"k-NN on {settings.val} ({mode}, k={k}, {images} images)", title_justify="left")
    table.add_column("backbone", style="bold")
    table.add_column(f"{measure} %", justify="right")
    table.add_row(f"teacher, step {step}", f"{teacher[column]:.1f}")
    table.add_row("random init (same architecture)", f"{baseline[column]:.1f}")
    table.add_row("chance", f"{teacher[chance_key]:.1f}")
    lead = teacher[column] - baseline[column]
    verdict = (
        f"the teacher is {lead:.1f} points ahead of random init"
        if lead > 0
        else f"the teacher is {-lead:.1f} points behind random init: the features did not improve"
    )
    return Group(table, Text(verdict, style="green" if lead > 0 else "yellow"))


_DIAGNOSTIC_ROWS = (
    ("effective_rank", "effective rank of the tokens (of {embed_dim} dims)", "{:.1f}"),
    ("within_image_cosine", "mean cosine, two tokens of one image", "{:.3f}"),
    ("between_image_cosine", "mean cosine, tokens of different images", "{:.3f}"),
    ("teacher_entropy", "teacher entropy per token, nats (max {max_entropy:.2f})", "{:.2f}"),
    ("prototypes_in_use", "prototypes that are some token's first choice", "{:.0%}"),
    ("mean_perplexity_share", "perplexity of the mean prediction / K", "{:.0%}"),
)


def diagnostics_table(results: dict[str, Any]) -> Table:
    """`flsl diagnose`'s figures: the checkpoint's network beside a random init."""
    import math

    table = Table(
        title=f"{results['checkpoint']} ({results['which']}, step {results['step']}): "
        f"{results['images']} images of {results['val']} at {results['crop']} px",
        title_justify="left",
    )
    table.add_column("diagnostic", style="bold")
    table.add_column("trained", justify="right")
    table.add_column("random init", justify="right")
    names = {"embed_dim": results["embed_dim"], "max_entropy": math.log(results["prototypes"])}
    for key, label, fmt in _DIAGNOSTIC_ROWS:
        if key in results["trained"]:
            table.add_row(
                label.format(**names), fmt.format(results["trained"][key]), fmt.format(results["random_init"][key])
            )
    return table
