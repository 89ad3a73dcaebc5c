"""What one SLURM job asks for: the recipe's `slurm` section with the command line's SLURM
options applied the way `--set slurm.KEY=VALUE` would be (same schema, same checks), and the
resources that follow from it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flsl_cli.config.load import validate_options
from flsl_cli.config.schema import SlurmConfig

# The SlurmConfig fields the command line sets, and their options.
SLURM_OPTIONS = {
    "nodes": "--nodes",
    "gpus_per_node": "--gpus-per-node",
    "tasks_per_node": "--tasks-per-node",
    "partition": "--partition",
    "account": "--account",
    "qos": "--qos",
    "time": "--time",
    "constraint": "--constraint",
    "mem": "--mem",
    "cpus_per_task": "--cpus-per-task",
    "exclusive": "--exclusive",
}


def with_options(config: SlurmConfig, options: Mapping[str, Any]) -> SlurmConfig:
    """`config` with the options given on the command line (None: not given, the recipe decides)."""
    given = {name: value for name, value in options.items() if value is not None}
    return validate_options(
        {**config.model_dump(), **given},
        section=("slurm",),
        options={k: SLURM_OPTIONS[k] for k in given},
        fix="Change the SLURM options named above (or the recipe's slurm section with --set); to train on this "
        "machine instead, leave out --nodes and the other SLURM options",
    )


@dataclass(frozen=True)
class SlurmRequest:
    """One job's resources: the slurm section it was made from, and the CPUs of each process
    (the section's cpus_per_task, else the data workers + 1)."""

    slurm: SlurmConfig
    cpus_per_task: int

    @classmethod
    def of(cls, config: SlurmConfig, options: Mapping[str, Any], *, data_workers: int) -> SlurmRequest:
        slurm = with_options(config, options)
        return cls(slurm=slurm, cpus_per_task=slurm.cpus_per_task or data_workers + 1)

    @property
    def nodes(self) -> int:
        return self.slurm.nodes

    @property
    def gpus_per_node(self) -> int:
        return self.slurm.gpus_per_node

    @property
    def tasks_per_node(self) -> int:
        return self.slurm.gpus_per_node or self.slurm.tasks_per_node or 1

    @property
    def signal_seconds(self) -> int:
        return int(round(self.slurm.signal_minutes_before_end * 60))

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node

    @property
    def use_cuda(self) -> bool:
        return self.gpus_per_node > 0

    def describe(self) -> str:
        kind = "GPU" if self.use_cuda else "CPU"
        nodes = f"{self.nodes} node{'s' if self.nodes > 1 else ''}"
        return f"{nodes} x {self.tasks_per_node} {kind} process(es) = {self.world_size}"

    def record(self) -> dict[str, Any]:
        """What run.json keeps of the request."""
        slurm = self.slurm
        record = {
            "nodes": self.nodes,
            "tasks_per_node": self.tasks_per_node,
            "gpus_per_node": self.gpus_per_node,
            "signal_seconds": self.signal_seconds,
            "max_requeues": slurm.max_requeues,
            "partition": slurm.partition,
            "account": slurm.account,
            "qos": slurm.qos,
            "time": slurm.time,
            "constraint": slurm.constraint,
            "mem": slurm.mem,
            "cpus_per_task": self.cpus_per_task,
            "exclusive": slurm.exclusive,
            "extra_sbatch": dict(slurm.extra_sbatch),
            "setup": list(slurm.setup),
            "python": slurm.python,
        }
        return {key: value for key, value in record.items() if value not in (None, [], {})}
