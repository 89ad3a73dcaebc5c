"""Progress of a DAVIS evaluation over every process: each process drops one small JSON file per
finished sequence into a folder the launcher shares with them; the main process shows the
lines of the others' sequences and moves one bar over all the frames of the job as the files
appear, between its own frames and, once its share is done, until every process has passed a
barrier after its last sequence (a barrier that fails when a process dies, so nothing hangs).
Without a shared folder (one process, or during training) only its own sequences are shown.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

POLL_SECONDS = 0.2


class SequenceLog:
    def __init__(
        self, folder: str | None, *, is_main: bool, on_line: Callable[[str], None], on_frames: Callable[[int], None]
    ) -> None:
        self.folder = Path(folder) if folder else None
        self.is_main = is_main
        self.on_line = on_line
        self.on_frames = on_frames
        self.shown: set[str] = set()

    def finished(self, name: str, *, frames: int, lines: list[str]) -> None:
        """This process finished sequence `name`: shown here (main) or left for the main process."""
        self.shown.add(name)
        if self.is_main:
            for line in lines:
                self.on_line(line)
        elif self.folder is not None:
            record = self.folder / f"{name}.json"
            staged = record.with_name(f".{record.name}.tmp")
            staged.write_text(json.dumps({"frames": frames, "lines": lines}))
            staged.replace(record)  # whole or not at all for the reader

    def poll(self) -> None:
        """Show the sequences other processes finished since the last call (main process)."""
        if not self.is_main or self.folder is None:
            return
        for path in sorted(self.folder.glob("*.json")):
            name = path.stem
            if name in self.shown:
                continue
            record: dict[str, Any] = json.loads(path.read_text())
            self.shown.add(name)
            self.on_frames(int(record["frames"]))
            for line in record["lines"]:
                self.on_line(line)

    def wait_for(self, passed: Callable[[], bool]) -> None:
        """Show the others' sequences until `passed()` (every process has finished: a barrier
        they all enter after their last sequence) says so, then the last ones (main process)."""
        while not passed():
            self.poll()
            time.sleep(POLL_SECONDS)
        self.poll()
