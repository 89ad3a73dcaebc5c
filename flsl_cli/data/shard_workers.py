"""Worker processes for `flsl data shards`: a spawned pool (or the calling process for one
worker). A DataError raised in a worker is raised again in the caller as itself (a FlslError
pickles intact)."""

from __future__ import annotations

import multiprocessing
import signal
from collections.abc import Callable, Iterator


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is handled once, by the parent


class WorkerPool:
    """`workers` spawned processes (started on first use), or the calling process when 1."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._pool: multiprocessing.pool.Pool | None = None

    def map(self, fn: Callable, items: list) -> Iterator:
        if self.workers <= 1 or len(items) <= 1:
            return map(fn, items)
        return self._get_pool().imap(fn, items)

    def map_unordered(self, fn: Callable, items: list) -> Iterator:
        if self.workers <= 1:
            return map(fn, items)
        return self._get_pool().imap_unordered(fn, items)

    def close(self, *, abort: bool) -> None:
        if self._pool is None:
            return
        if abort:
            self._pool.terminate()
        else:
            self._pool.close()
        self._pool.join()
        self._pool = None

    def _get_pool(self):
        if self._pool is None:
            # spawn, not fork: the parent runs a progress-bar thread, and forking with threads is unsafe.
            context = multiprocessing.get_context("spawn")
            self._pool = context.Pool(self.workers, initializer=_ignore_sigint)
        return self._pool
