"""`flsl status SWEEP_DIR`: where each member of a sweep stands (state, step, requeues, last
error), read from sweep.json and each member's run dir as `flsl status RUN_DIR` reads one."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from flsl_cli.launch.status import read_status
from flsl_cli.launch.sweep.record import read_sweep


@dataclass
class MemberStatus:
    name: str
    values: dict[str, Any]
    run_dir: str
    status: str
    step: int | None = None
    requeues: int = 0
    job_ids: list[str] = field(default_factory=list)
    last_error: str | None = None


@dataclass
class SweepStatus:
    sweep_dir: str
    scheduler: str
    arrays: list[str]
    members: list[MemberStatus]

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for member in self.members:
            word = member.status.split(" ")[0]
            counts[word] = counts.get(word, 0) + 1
        return counts

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)


def read_sweep_status(sweep_dir: str | Path, *, ask_slurm: bool = True) -> SweepStatus:
    sweep_dir = Path(sweep_dir)
    record = read_sweep(sweep_dir)
    members = []
    for member in record.members:
        run_dir = record.run_dir(sweep_dir, member)
        if not (run_dir / "run.json").exists():
            members.append(
                MemberStatus(name=member.name, values=member.values, run_dir=str(run_dir), status="not started")
            )
            continue
        status = read_status(run_dir, ask_slurm=ask_slurm)
        error = status.last_error or {}
        members.append(
            MemberStatus(
                name=member.name,
                values=member.values,
                run_dir=str(run_dir),
                status=status.status,
                step=status.step,
                requeues=status.requeues,
                job_ids=list(member.job_ids),
                last_error=error.get("message"),
            )
        )
    return SweepStatus(sweep_dir=str(sweep_dir), scheduler=record.scheduler, arrays=record.arrays, members=members)
