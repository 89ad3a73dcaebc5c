"""The one timestamp format of the records flsl writes (run.json, checkpoint
manifests, SLURM job records): local time with its UTC offset, e.g. 2026-01-31T14:05:09+0100."""

from __future__ import annotations

import time

FORMAT = "%Y-%m-%dT%H:%M:%S%z"


def now() -> str:
    return time.strftime(FORMAT)
