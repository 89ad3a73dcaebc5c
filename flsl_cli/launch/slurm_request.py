"""What one SLURM job asks for: the recipe's `slurm` section with the command line's options
applied, resolved into the resources of the job."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from flsl_cli.config.schema import SlurmConfig
from flsl_cli.launch.slurm_errors import SlurmError

@dataclass(frozen=True)
class SlurmFlags:
    """SLURM options given on the command line; None means "not given" (the recipe decides)."""

    nodes: int | None = None
    gpus_per_node: int | None = None
    tasks_per_node: int | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str | None = None
    constraint: str | None = None
    mem: str | None = None
    cpus_per_task: int | None = None
    exclusive: bool | None = None

    def given(self) -> bool:
        return any(value is not None for value in asdict(self).values())


@dataclass(frozen=True)
class SlurmRequest:
    """One job's resources, resolved from the recipe's `slurm` section and the flags."""

    nodes: int
    tasks_per_node: int
    gpus_per_node: int
    signal_seconds: int
    max_requeues: int
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str | None = None
    constraint: str | None = None
    mem: str | None = None
    cpus_per_task: int = 1
    exclusive: bool = False
    extra_sbatch: dict[str, Any] = field(default_factory=dict)
    setup: list[str] = field(default_factory=list)
    python: str | None = None

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
        return {key: value for key, value in asdict(self).items() if value not in (None, [], {})}


def resolve_request(config, flags: SlurmFlags, *, data_workers: int) -> SlurmRequest:
    """Merge the recipe's `slurm` section (a SlurmConfig) with the flags; check the result. A
    process asks for its data workers + 1 CPUs unless the flags or the recipe say otherwise."""


    def pick(name: str):
        value = getattr(flags, name)
        return getattr(config, name) if value is None else value

    for name, least in (("nodes", 1), ("gpus_per_node", 0), ("tasks_per_node", 1), ("cpus_per_task", 1)):
        value = getattr(flags, name)
        if value is not None and value < least:
            flag = "--" + name.replace("_", "-")
            remedy = ("; leave out --nodes and the other SLURM options to train on this machine"
                      if name == "nodes" else "")
            raise SlurmError(f"{flag} must be at least {least}, found {value}",
                             fix=f"Use e.g. {flag} {max(least, 1)}{remedy}")
    gpus = pick("gpus_per_node")
    tasks = pick("tasks_per_node")
    if gpus and tasks is not None and tasks != gpus:
        raise SlurmError(
            f"--tasks-per-node {tasks} does not match --gpus-per-node {gpus}: flsl runs one process per GPU",
            fix=f"Leave out --tasks-per-node, or use --gpus-per-node 0 --tasks-per-node {tasks} for CPU processes",
        )
    limit = pick("time")
    signal_seconds = int(round(config.signal_minutes_before_end * 60))
    if limit is not None:
        try:
            seconds = SlurmConfig.time_limit_seconds(limit)
        except ValueError as exc:
            raise SlurmError(f"--time: {exc}",
                             fix="Use SLURM's format, e.g. --time 2-00:00:00 or --time 12:00:00") from None
        if seconds is not None and signal_seconds >= seconds:
            raise SlurmError(
                f"the time limit {limit} is not longer than slurm.signal_minutes_before_end "
                f"({config.signal_minutes_before_end} min), so the job would be told to stop as it starts",
                fix="Ask for more time, or lower slurm.signal_minutes_before_end with --set",
            )
    return SlurmRequest(
        nodes=pick("nodes"), tasks_per_node=gpus or tasks or 1, gpus_per_node=gpus,
        signal_seconds=signal_seconds, max_requeues=config.max_requeues,
        partition=pick("partition"), account=pick("account"), qos=pick("qos"), time=limit,
        constraint=pick("constraint"), mem=pick("mem"), cpus_per_task=pick("cpus_per_task") or data_workers + 1,
        exclusive=bool(pick("exclusive")), extra_sbatch=dict(config.extra_sbatch), setup=list(config.setup),
        python=config.python,
    )


