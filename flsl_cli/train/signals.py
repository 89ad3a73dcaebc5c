"""Stop requests: signals (SLURM's time-limit warning, preemption's SIGTERM, Ctrl-C under a
scheduler) set a flag; the training step folds the flag into its one per-step collective, so
every rank sees the request at the same step, saves that step and stops."""

from __future__ import annotations

import signal
from collections.abc import Iterable


class StopRequest:
    """Records which signal asked the run to stop; `requested` is polled once per step."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum, _frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def install(self, signals: Iterable[int]) -> "StopRequest":
        for signum in signals:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def uninstall(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()
