"""The SLURM options of `flsl pretrain`, `flsl resume` and `flsl sweep`, declared once.

`@slurm_options` adds them to a command's signature (Typer reads `__signature__`) and hands the
command one `slurm` argument: the options given, as SlurmConfig fields (None where not given, the
recipe decides), or None to run on this machine. The command keeps its own `devices` and
`dry_run` parameters, which this module reads too.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer

from flsl_cli.errors import FlslError

SLURM_PANEL = "SLURM (any of these submits a job instead of training here)"

F = TypeVar("F", bound=Callable[..., Any])

DryRunOption = Annotated[
    bool,
    typer.Option(
        "--dry-run",
        rich_help_panel=SLURM_PANEL,
        help="Check the recipe and options, show the submitit parameters and #SBATCH options of the job "
        "that would be submitted, and exit.",
    ),
]

# name -> annotation; every option defaults to None (not given).
_OPTIONS: dict[str, Any] = {
    "nodes": Annotated[
        int | None,
        typer.Option(
            "--nodes",
            "-N",
            rich_help_panel=SLURM_PANEL,
            help="Submit one SLURM job on N nodes (default: recipe slurm.nodes).",
        ),
    ],
    "gpus_per_node": Annotated[
        int | None,
        typer.Option(
            "--gpus-per-node",
            rich_help_panel=SLURM_PANEL,
            help="GPUs per node, one process each (default: slurm.gpus_per_node); 0: CPU processes with gloo.",
        ),
    ],
    "tasks_per_node": Annotated[
        int | None,
        typer.Option(
            "--tasks-per-node",
            rich_help_panel=SLURM_PANEL,
            help="CPU processes per node with --gpus-per-node 0 (default: slurm.tasks_per_node, else 1).",
        ),
    ],
    "partition": Annotated[
        str | None,
        typer.Option(
            "--partition", "-p", rich_help_panel=SLURM_PANEL, help="SLURM partition (default: slurm.partition)."
        ),
    ],
    "account": Annotated[
        str | None,
        typer.Option(
            "--account", "-A", rich_help_panel=SLURM_PANEL, help="SLURM account to charge (default: slurm.account)."
        ),
    ],
    "qos": Annotated[
        str | None,
        typer.Option("--qos", rich_help_panel=SLURM_PANEL, help="SLURM quality of service (default: slurm.qos)."),
    ],
    "time": Annotated[
        str | None,
        typer.Option(
            "--time",
            "-t",
            metavar="D-HH:MM:SS",
            rich_help_panel=SLURM_PANEL,
            help="Time limit of each job attempt; the job checkpoints and requeues itself before it "
            "(default: slurm.time, else the partition's).",
        ),
    ],
    "constraint": Annotated[
        str | None,
        typer.Option(
            "--constraint",
            "-C",
            rich_help_panel=SLURM_PANEL,
            help="Node features, e.g. a100 (default: slurm.constraint).",
        ),
    ],
    "mem": Annotated[
        str | None,
        typer.Option("--mem", rich_help_panel=SLURM_PANEL, help="Memory per node, e.g. 200G (default: slurm.mem)."),
    ],
    "cpus_per_task": Annotated[
        int | None,
        typer.Option(
            "--cpus-per-task",
            "-c",
            rich_help_panel=SLURM_PANEL,
            help="CPUs per process, for its data workers (default: slurm.cpus_per_task).",
        ),
    ],
    "exclusive": Annotated[
        bool | None,
        typer.Option(
            "--exclusive/--shared",
            rich_help_panel=SLURM_PANEL,
            help="Ask for whole nodes (default: slurm.exclusive).",
            show_default=False,
        ),
    ],
}


def slurm_options(command: F) -> F:
    """Give `command` the SLURM options in place of its `slurm` parameter (see the module)."""
    signature = inspect.signature(command, eval_str=True)  # the command's string annotations, resolved
    before = [p for name, p in signature.parameters.items() if name not in ("slurm", "dry_run")]
    added = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=None)
        for name, annotation in _OPTIONS.items()
    ]
    dry_run = inspect.Parameter("dry_run", inspect.Parameter.KEYWORD_ONLY, annotation=DryRunOption, default=False)

    @functools.wraps(command)
    def with_slurm(*args: Any, **kwargs: Any) -> Any:
        given = {name: kwargs.pop(name, None) for name in _OPTIONS}
        slurm = slurm_job(devices=kwargs.get("devices"), dry_run=kwargs.get("dry_run", False), values=given)
        return command(*args, slurm=slurm, **kwargs)

    with_slurm.__signature__ = signature.replace(parameters=[*before, *added, dry_run])  # type: ignore[attr-defined]
    with_slurm.__annotations__ = {
        **{name: p.annotation for name, p in signature.parameters.items() if name != "slurm"},
        **{p.name: p.annotation for p in [*added, dry_run]},
    }
    return with_slurm  # type: ignore[return-value]


def slurm_job(*, devices: int | None, dry_run: bool, values: dict[str, Any]) -> dict[str, Any] | None:
    """The SLURM options as SlurmConfig fields when a SLURM job is asked for (any of them, or
    --dry-run); None to train on this machine. --devices is refused with a SLURM job."""
    if all(value is None for value in values.values()) and not dry_run:
        return None
    if devices is not None:
        raise FlslError(
            "--devices is for runs on this machine and cannot be combined with SLURM options",
            fix="Use --gpus-per-node (or --gpus-per-node 0 --tasks-per-node N for CPU "
            "processes) with --nodes, or leave out the SLURM options",
        )
    return values
