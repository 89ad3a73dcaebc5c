"""Where a training process's log records go: every rank's to its file in the run directory
(`rundir.rank_log_path`), rank 0's also to the terminal. flsl logs through stdlib `logging`
under the `flsl_cli` logger (storage retries, for one); outside a run, Python's last-resort
handler prints its warnings to stderr."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from flsl_cli.train.rundir import rank_log_path

LOGGER = "flsl_cli"
FORMAT = "%(asctime)s rank {rank} %(levelname)s %(name)s: %(message)s"
TERMINAL_FORMAT = "flsl: %(message)s"


class _Stderr(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a record comes (a progress display may have
    replaced it, so that lines show above the bar)."""

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass


@contextmanager
def run_logging(run_dir: Path, *, rank: int) -> Iterator[Path]:
    """Send the `flsl_cli` logger's records (WARNING and up) to this rank's log file, and on
    rank 0 to the terminal too, while the block runs; yields the log file's path."""
    path = rank_log_path(run_dir, rank=rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    logger = logging.getLogger(LOGGER)
    to_file = logging.FileHandler(path, encoding="utf-8")
    to_file.setFormatter(logging.Formatter(FORMAT.format(rank=rank)))
    handlers: list[logging.Handler] = [to_file]
    if rank == 0:
        terminal = _Stderr()
        terminal.setFormatter(logging.Formatter(TERMINAL_FORMAT))
        handlers.append(terminal)
    before = logger.propagate
    for handler in handlers:
        handler.setLevel(logging.WARNING)
        logger.addHandler(handler)
    logger.propagate = False
    try:
        yield path
    finally:
        logger.propagate = before
        for handler in handlers:
            logger.removeHandler(handler)
            handler.close()
