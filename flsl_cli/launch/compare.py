"""`flsl compare RUN_DIR_OR_SWEEP_DIR ...`: one table of runs (a sweep counts as its members):
the recipe keys whose values differ between them, the final loss terms, the newest k-NN (and
DAVIS) figures, the steps reached, the mean images/s and the training time; read from each
run's recipe.yaml and metrics.jsonl (no torch). Runs of different recipes are compared on what
they share; what only some of them logged is named.

    comparison = compare_runs(["runs/lr-sweep"])
    for row in comparison.rows:
        print(row.name, row.values, row.metrics.get("knn_bbox_top1_k20"))
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from flsl_cli.errors import FlslError, RunDirError
from flsl_cli.launch.sweep.record import is_sweep_dir, read_sweep
from flsl_cli.train.run_record import load_record
from flsl_cli.train.rundir import RECIPE_NAME, RUN_NAME, load_recipe_yaml
from flsl_cli.viz.plot import RANDOM_INIT_PREFIX, RunCurves, read_curves

LOSS_TERMS = ("loss", "intra", "inter", "volume")
EVAL_PREFIXES = ("knn_", "davis_")
SHOWN_KEYS = 8  # differing keys beyond the swept ones shown as table columns (all are in --json)


@dataclass
class CompareRow:
    name: str
    run_dir: str
    status: str | None
    values: dict[str, Any]  # every differing key -> this run's value (None: the run has no such key)
    step: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)  # final loss terms, newest k-NN/DAVIS figures
    images_per_s: float | None = None
    train_seconds: float | None = None  # from the logged images/s: the time spent in training steps


@dataclass
class Comparison:
    rows: list[CompareRow]
    keys: list[str]  # the recipe keys that differ between the runs, swept keys first
    swept: list[str]  # the keys a sweep swept
    metrics: list[str]  # the metrics every run logged
    not_shared: dict[str, list[str]]  # a metric only some runs logged -> the runs that lack it
    curves: dict[str, RunCurves] = field(default_factory=dict, repr=False)

    def to_json(self) -> str:
        data = asdict(self)
        data.pop("curves")
        return json.dumps(data, indent=1)

    def default_metric(self) -> str:
        """The first k-NN top-1 of the teacher every run logged, else the total loss."""
        top1 = [m for m in self.metrics if m.startswith("knn_") and "_top1_" in m and "feature" not in m]
        return top1[0] if top1 else "loss"


def compare_runs(paths: Sequence[str | Path]) -> Comparison:
    """The comparison of the runs at `paths` (run dirs, or sweep dirs for all their members)."""
    runs: list[tuple[str, Path]] = []
    swept: list[str] = []
    for path in paths:
        path = Path(path)
        if is_sweep_dir(path):
            record = read_sweep(path)
            swept += [key for key in [*record.grid, *record.together] if key not in swept]
            runs += [(f"{path.name}/{m.name}", record.run_dir(path, m)) for m in record.members]
        elif (path / RUN_NAME).exists() or (path / RECIPE_NAME).exists():
            runs.append((path.name, path))
        else:
            raise RunDirError(
                "neither a run dir nor a sweep dir",
                where=str(path),
                fix="Pass run dirs of `flsl pretrain` (holding run.json) or sweep dirs of `flsl sweep` (sweep.json)",
            )
    if not runs:
        raise FlslError("nothing to compare", fix="Pass one or more run dirs or sweep dirs")
    recipes = {name: _flat_recipe(run_dir) for name, run_dir in runs}
    every_key = sorted({key for flat in recipes.values() for key in flat})
    differing = [
        k for k in every_key if len({json.dumps(flat.get(k), sort_keys=True) for flat in recipes.values()}) > 1
    ]
    keys = [k for k in swept if k in differing] + [k for k in differing if k not in swept]
    rows, curves = [], {}
    for name, run_dir in runs:
        row, run_curves = _row(name, run_dir, values={k: recipes[name].get(k) for k in keys}, recipe=recipes[name])
        rows.append(row)
        if run_curves is not None:
            curves[name] = run_curves
    logged = sorted({m for row in rows for m in row.metrics})
    shared = [m for m in logged if all(m in row.metrics for row in rows)]
    not_shared = {m: [row.name for row in rows if m not in row.metrics] for m in logged if m not in shared}
    return Comparison(rows=rows, keys=keys, swept=swept, metrics=shared, not_shared=not_shared, curves=curves)


def _flat_recipe(run_dir: Path) -> dict[str, Any]:
    try:
        data = load_recipe_yaml((run_dir / RECIPE_NAME).read_text())
    except OSError:
        return {}
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            flat[prefix[:-1]] = node

    walk(data, "")
    return flat


def _row(
    name: str, run_dir: Path, *, values: dict[str, Any], recipe: dict[str, Any]
) -> tuple[CompareRow, RunCurves | None]:
    try:
        status: str | None = load_record(run_dir).status.value
    except FlslError:
        status = None
    row = CompareRow(name=name, run_dir=str(run_dir), status=status, values=values)
    try:
        curves = read_curves(str(run_dir))
    except RunDirError:  # nothing logged yet
        return row, None
    series = curves.series
    if "loss" in series:
        row.step = series["loss"][0][-1]
    for key, (_, points) in series.items():
        if key in LOSS_TERMS or (key.startswith(EVAL_PREFIXES) and not key.startswith(RANDOM_INIT_PREFIX)):
            row.metrics[key] = points[-1]
    if "images_per_s" in series:
        steps, rates = series["images_per_s"]
        row.images_per_s = round(sum(rates) / len(rates), 2)
        batch = recipe.get("optim.global_batch_size")
        if isinstance(batch, int):
            seconds, previous = 0.0, 0
            for step, rate in zip(steps, rates):
                if rate > 0 and step > previous:
                    seconds += (step - previous) * batch / rate
                previous = step
            row.train_seconds = round(seconds, 1)
    return row, curves


def check_metric(comparison: Comparison, metric: str | None) -> str:
    """The metric to plot: the one asked for, which every run must have logged, else the default."""
    chosen = metric or comparison.default_metric()
    if chosen not in comparison.metrics:
        lacking = comparison.not_shared.get(chosen)
        why = f"not logged by {', '.join(lacking)}" if lacking else "not logged by any of the runs"
        raise FlslError(
            f"--metric {chosen}: {why}",
            fix=f"Choose one every run logged: {', '.join(comparison.metrics) or '(none)'}",
        )
    return chosen


def plot_compare(comparison: Comparison, *, metric: str | None, out: Path) -> Path:
    """`--out`: the metric against each swept (else differing) key, and its curves over steps."""
    from flsl_cli.viz.compare import plot_comparison

    chosen = check_metric(comparison, metric)
    keys = comparison.swept or comparison.keys
    by_key = {
        key: [(row.values.get(key), row.metrics[chosen]) for row in comparison.rows if row.values.get(key) is not None]
        for key in keys
        if key in comparison.keys
    }
    curves = {name: curve.series[chosen] for name, curve in comparison.curves.items() if chosen in curve.series}
    return plot_comparison(metric=chosen, by_key=by_key, curves=curves, out=out)
