"""`flsl`: the top-level Typer app. Command modules are small; torch is imported only when a
command runs, so `flsl --help` is instant."""

from __future__ import annotations

import typer

from flsl_cli.cli import bench, data, davis, eval, export, recipe, sweep, train, viz
from flsl_cli.cli.status import status

app = typer.Typer(
    name="flsl",
    help="Pretrain Vision Transformers with FLSL (Feature-Level Self-Supervised Learning).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("pretrain")(train.pretrain)
app.command("resume")(train.resume)
app.command("status")(status)
app.command("sweep")(sweep.sweep)
app.command("compare")(sweep.compare)
app.command("export")(export.export)
app.command("knn-eval")(eval.knn_eval)
app.command("diagnose")(eval.diagnose)
app.command("visualize")(viz.visualize)
app.command("plot")(viz.plot)
app.add_typer(recipe.app, name="recipe", help="Show or validate recipes.")
app.add_typer(data.app, name="data", help="Make data sets.")
app.add_typer(bench.app, name="bench", help="Measure throughput.")
# `flsl eval knn` is `flsl knn-eval` under the group of evaluations (both names work).
eval_app = typer.Typer(no_args_is_help=True)
eval_app.command("davis")(davis.davis_eval)
eval_app.command("knn")(eval.knn_eval)
app.add_typer(eval_app, name="eval", help="Evaluate pretrained backbones (DAVIS 2017, k-NN).")


def main() -> None:
    app()
