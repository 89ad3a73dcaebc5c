"""SWEEP_DIR/sweep.json: the record of a sweep. One typed owner of its fields: the recipe and
the grid it was made from, the `--set` values every member shares, how it runs (SLURM, with
what request, or here), and each member (its name, its typed values, its run dir, its jobs).

Only the command that creates or resubmits the sweep writes it (the members write their own
run.json); it is replaced atomically. Nothing here imports torch.

    record = read_sweep(sweep_dir)
    for member in record.members:
        print(member.name, member.values, record.run_dir(sweep_dir, member))
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flsl_cli import timestamps
from flsl_cli.launch.sweep.grid import SweepError
from flsl_cli.storage import write_json_atomic

SWEEP_NAME = "sweep.json"
VERSION = 1


@dataclass
class SweepMember:
    name: str
    values: dict[str, Any]  # swept key -> its value, as the schema typed it
    run_dir: str  # relative to the sweep dir
    job_ids: list[str] = field(default_factory=list)  # every job that trained it, oldest first


@dataclass
class SweepRecord:
    recipe: str
    grid: dict[str, list[Any]]
    together: dict[str, list[Any]]
    overrides: list[str]  # the --set values of every member
    scheduler: str  # "slurm" or "local"
    members: list[SweepMember]
    slurm: dict[str, Any] = field(default_factory=dict)  # what each array task asks for (SlurmRequest.record)
    max_parallel: int | None = None
    devices: int | None = None
    arrays: list[str] = field(default_factory=list)  # the job arrays submitted, oldest first
    created: str = field(default_factory=timestamps.now)
    version: int = VERSION

    def member(self, name: str) -> SweepMember:
        return next(m for m in self.members if m.name == name)

    @staticmethod
    def run_dir(sweep_dir: str | Path, member: SweepMember) -> Path:
        return Path(sweep_dir) / member.run_dir

    def submitted(self, *, array: str, jobs: dict[str, str]) -> None:
        """A job array was accepted: `jobs` maps member names to their job (ARRAY_INDEX)."""
        self.arrays.append(array)
        for name, job_id in jobs.items():
            self.member(name).job_ids.append(job_id)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, where: str) -> SweepRecord:
        try:
            values = dict(data)
            values["members"] = [SweepMember(**m) for m in data["members"]]
            return cls(**values)
        except (KeyError, TypeError) as exc:
            raise SweepError(
                f"{SWEEP_NAME} is not a sweep record flsl can read ({exc})",
                where=where,
                fix="Check the file; flsl writes it atomically, so it was changed by hand or by another version",
            ) from None


def is_sweep_dir(path: str | Path) -> bool:
    return (Path(path) / SWEEP_NAME).is_file()


def read_sweep(sweep_dir: str | Path) -> SweepRecord:
    path = Path(sweep_dir) / SWEEP_NAME
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise SweepError(
            f"no {SWEEP_NAME} here: this is not a sweep dir",
            where=str(sweep_dir),
            fix="Pass the --sweep-dir of `flsl sweep` (it holds sweep.json and one run dir per member)",
        ) from None
    except (OSError, ValueError) as exc:
        raise SweepError(f"cannot read {SWEEP_NAME} ({exc})", where=str(path)) from None
    if not isinstance(data, dict):
        raise SweepError(f"{SWEEP_NAME} does not hold a sweep record", where=str(path))
    return SweepRecord.from_dict(data, where=str(path))


def write_sweep(sweep_dir: str | Path, record: SweepRecord) -> None:
    write_json_atomic(Path(sweep_dir) / SWEEP_NAME, record.to_dict())
