"""JSON-lines logs of a run: `metrics.jsonl` (one object per logged step) and
`bad_samples.jsonl` (one object per bad sample or unreadable shard), appended and flushed as
training goes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flsl_cli.train.rundir import METRICS_NAME

BAD_SAMPLES_NAME = "bad_samples.jsonl"


class JsonlWriter:
    def __init__(self, run_dir: Path, *, name: str = METRICS_NAME) -> None:
        self._handle = open(Path(run_dir) / name, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._handle.write(json.dumps(record) + "\n")
        self._handle.flush()

    def flush(self) -> None:
        if not self._handle.closed:
            self._handle.flush()

    def close(self) -> None:
        self._handle.close()
