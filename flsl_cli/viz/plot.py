"""`flsl plot RUN_DIR`: a run's curves in one PNG, read from metrics.jsonl and run.json (a local
or remote run dir, finished or still training): the loss terms, learning rate, weight decay,
teacher temperature and momentum, images/s, the data-health counts and, when logged, the k-NN
results, over steps. Percentages and counts never share an axis: the k-NN accuracies (with
the chance levels and the random init) have their own panel, the evaluated image counts theirs.
Step 0 is marked in every panel; resumes and SLURM requeues (run.json's `resumes`) are vertical
lines. The PNG goes into the run dir by default (RUN_DIR/plot.png).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flsl_cli import storage
from flsl_cli.errors import FlslError, RunDirError
from flsl_cli.train.rundir import METRICS_NAME, read_run_record
from flsl_cli.viz.extras import require_matplotlib

if TYPE_CHECKING:
    from matplotlib.figure import Figure

RESUME_GID = "resume"
START_GID = "step-0"
PLOT_NAME = "plot.png"
# (panel title, metrics.jsonl keys, legend label of each key)
PANELS: tuple[tuple[str, tuple[str, ...], dict[str, str]], ...] = (
    (
        "loss terms",
        ("loss", "intra", "inter", "volume"),
        {"loss": "total", "intra": "intra (L1)", "inter": "inter (L2)", "volume": "volume (L3)"},
    ),
    ("learning rate", ("lr",), {}),
    ("weight decay", ("wd",), {}),
    ("teacher temperature", ("teacher_temp",), {}),
    ("teacher momentum", ("momentum",), {}),
    ("images/s", ("images_per_s",), {}),
    ("data health (cumulative)", ("seen", "bad"), {"seen": "samples seen", "bad": "bad samples"}),
)
KNN_TITLE = "k-NN (teacher), %"
COUNTS_TITLE = "evaluated (count)"
RANDOM_INIT_PREFIX = "random_init_"  # the end-of-training baseline (eval.at_end)
CHANCE_MARK = "_chance_"
SECOND_AXIS = ("bad",)


@dataclass
class RunCurves:
    run_dir: str
    series: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)  # key -> (steps, values)
    resumes: list[dict[str, Any]] = field(default_factory=list)
    status: str | None = None


def read_curves(run_dir: str) -> RunCurves:
    """Every numeric series of metrics.jsonl (the last line may be half-written while the run
    trains: unparsable lines are skipped) and the resumes of run.json."""
    run_dir = storage.normalize(run_dir)
    record = read_run_record(run_dir)
    try:
        text = storage.read_bytes(storage.join(run_dir, METRICS_NAME)).decode("utf-8")
    except FileNotFoundError:
        text = ""
    except OSError as exc:
        raise RunDirError(
            f"cannot read {METRICS_NAME} ({exc})", where=run_dir, fix="Check the run directory and your access to it"
        ) from None
    curves = RunCurves(
        run_dir=run_dir,
        resumes=[r for r in record.resumes if isinstance(r, dict)],
        status=record.status.value,
    )
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if not isinstance(row, dict) or "step" not in row:
            continue
        for key, value in row.items():
            if key in ("step", "epoch") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            steps, values = curves.series.setdefault(key, ([], []))
            steps.append(int(row["step"]))
            values.append(float(value))
    if not curves.series:
        raise RunDirError(
            f"the run has no metrics yet ({METRICS_NAME} is empty or missing)",
            where=run_dir,
            fix=f"Plot it once it has logged a step (every logging.every_steps steps); "
            f"`flsl status {run_dir}` says where it stands",
        )
    return curves


def draw_run(curves: RunCurves) -> Figure:
    """The matplotlib Figure: one panel per group of series that the run logged."""
    plt = require_matplotlib()
    panels = [(title, [k for k in keys if k in curves.series], labels) for title, keys, labels in PANELS]
    knn = sorted(k for k in curves.series if _is_accuracy(k))
    if knn:
        panels.append((KNN_TITLE, knn, {}))
    counts = sorted(k for k in curves.series if _is_count(k))
    if counts:
        panels.append((COUNTS_TITLE, counts, {}))
    # chance levels and the random-init baseline are drawn with the k-NN curves or not at all
    known = {key for _, keys, _ in PANELS for key in keys} | {
        k for k in curves.series if k.startswith(("knn", RANDOM_INIT_PREFIX)) or _is_count(k)
    }
    other = sorted(set(curves.series) - known)
    if other:
        panels.append(("other", other, {}))
    panels = [panel for panel in panels if panel[1]]
    columns = 3
    rows = -(-len(panels) // columns)
    figure, axes_grid = plt.subplots(rows, columns, figsize=(5 * columns, 3.2 * rows), squeeze=False)
    figure.suptitle(f"{curves.run_dir}  ({curves.status or 'unknown status'})", fontsize=11)
    for axes, (title, keys, labels) in zip(axes_grid.flat, panels):
        for key in keys:
            steps, values = curves.series[key]
            # bad samples are a few among many: their own scale, on the right
            target = _right_axis(axes) if key in SECOND_AXIS else axes
            target.plot(
                steps,
                values,
                label=labels.get(key, key),
                marker="o" if len(steps) < 3 else None,
                color="tab:red" if key in SECOND_AXIS else None,
            )
            if key in SECOND_AXIS:  # counts: from 0, and a visible range while there are none
                target.set_ylim(0, max(1.0, max(values) * 1.1))
        if title == KNN_TITLE:
            _mark_baselines(axes, curves, keys)
        _mark_start(axes, curves)
        _mark_resumes(axes, curves.resumes)
        axes.set_title(title, fontsize=10)
        axes.set_xlabel("step", fontsize=8)
        axes.tick_params(labelsize=8)
        axes.grid(alpha=0.3)
        if len(keys) > 1 or curves.resumes:
            handles = [h for ax in (axes, *_twins(axes)) for h in ax.get_legend_handles_labels()[0]]
            axes.legend(handles=handles, fontsize=7)
    for axes in list(axes_grid.flat)[len(panels) :]:
        axes.set_visible(False)
    figure.tight_layout()
    return figure


def _is_accuracy(key: str) -> bool:
    """A k-NN accuracy in percent (not an image count or a chance level)."""
    return key.startswith("knn") and CHANCE_MARK not in key and not _is_count(key)


def _is_count(key: str) -> bool:
    """How many images or sequences an evaluation saw (a count, not a percentage)."""
    return key.startswith(("knn", "davis")) and key.endswith(("_images", "_sequences"))


def _mark_start(axes, curves: RunCurves) -> None:
    """Step 0 (the weights the run started from) as a thin line at the left of every panel."""
    last = max(max(steps) for steps, _ in curves.series.values())
    line = axes.axvline(0, color="black", linewidth=0.8, alpha=0.5, label="_step 0")
    line.set_gid(START_GID)
    axes.set_xlim(left=-0.02 * max(1, last))


def _mark_baselines(axes, curves: RunCurves, keys: list[str]) -> None:
    """Chance levels as dotted lines; the random init's figure as a cross at the step it was taken."""
    for key in sorted(k for k in curves.series if CHANCE_MARK in k and k.startswith("knn")):
        level = curves.series[key][1][-1]
        what = key.split(CHANCE_MARK, 1)[1].replace("_", " ")
        axes.axhline(level, color="gray", linestyle=":", linewidth=1, label=f"chance ({what})")
    for key in keys:
        baseline = curves.series.get(RANDOM_INIT_PREFIX + key)
        if baseline:
            axes.plot(baseline[0], baseline[1], marker="x", linestyle="none", markersize=8, label=f"random init: {key}")


def _right_axis(axes):
    twins = _twins(axes)
    if twins:
        return twins[0]
    right = axes.twinx()
    right.tick_params(labelsize=8, colors="tab:red")
    return right


def _twins(axes) -> list:
    return [other for other in axes.figure.axes if other is not axes and other.bbox.bounds == axes.bbox.bounds]


def _mark_resumes(axes, resumes: list[dict[str, Any]]) -> None:
    for event in resumes:
        requeue = bool(event.get("restart"))
        label = (
            f"requeued (job {event.get('job_id')}), resumed at {event['step']}"
            if requeue
            else f"resumed at {event['step']}"
        )
        line = axes.axvline(
            int(event["step"]), color="tab:red" if requeue else "gray", linestyle="--", linewidth=1, label=label
        )
        line.set_gid(RESUME_GID)


def default_plot_path(run_dir: str) -> Path:
    """RUN_DIR/plot.png for a local run dir; for a remote one, NAME-plot.png here (plots are
    written locally)."""
    run_dir = storage.normalize(run_dir)
    if storage.is_local(run_dir):
        return Path(run_dir).expanduser() / PLOT_NAME
    return Path(f"{storage.basename(run_dir.rstrip('/')) or 'run'}-{PLOT_NAME}")


def plot_run(run_dir: str, *, out: Path | None = None) -> Path:
    """Write the run's PNG to `out` (default: `default_plot_path`), whole or not at all."""
    plt = require_matplotlib()
    curves = read_curves(run_dir)
    out = Path(out).expanduser() if out is not None else default_plot_path(run_dir)
    if out.is_dir():
        raise FlslError("--out is a folder", where=str(out), fix="Pass a file name, e.g. --out run.png")
    figure = draw_run(curves)
    try:  # the picture appears whole or not at all
        storage.replace_local(out, lambda handle: figure.savefig(handle, dpi=100, format="png"))
    finally:
        plt.close(figure)
    return out
