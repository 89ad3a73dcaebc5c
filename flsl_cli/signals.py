"""Stop signals: what a scheduler, a terminal or a user sends to ask a run to stop.

SLURM (time-limit warning, preemption, `scancel`, `scontrol requeue`), `timeout`, systemd,
Kubernetes and Ctrl-C signal every process of a run, data workers included. The rule:

- a training process turns any stop signal into a request (`StopRequest`): a flag that the
  training step folds into its one per-step collective, so every rank stops after the same
  step and saves it. A handler only sets the flag, so a signal never interrupts a write, and a
  second signal (during the save, say) changes nothing;
- a data worker is never ended by a stop signal: it passes each one on to its training
  process, which decides (`for_data_worker`);
- the moment a data worker is forked, the stop signals are held back (`held`), so a worker
  never meets a signal before it has made its own arrangements, and the training process gets
  what arrived meanwhile as soon as the workers are up.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT, signal.SIGHUP)


class StopRequest:
    """Which stop signal arrived first in this process; `requested` is polled once per step."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self.count = 0
        self._previous: dict[int, signal._HANDLER] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    @property
    def interrupted(self) -> bool:
        """The stop came from Ctrl-C (SIGINT)."""
        return self.signal_name == signal.SIGINT.name

    def _handle(self, signum, _frame) -> None:
        self.count += 1
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name

    def install(self) -> StopRequest:
        """Handle the stop signals in this process; a signal the process was started with
        ignored (SIGINT in a background job, SIGHUP under nohup) stays ignored. Signals held
        back by the parent (see `held`) arrive now."""
        for signum in STOP_SIGNALS:
            if signal.getsignal(signum) is signal.SIG_IGN:
                continue
            self._previous[signum] = signal.signal(signum, self._handle)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        return self

    def uninstall(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()


_active: StopRequest | None = None


def stop_request() -> StopRequest:
    """This process's stop request, installed on first use (once per process)."""
    global _active
    if _active is None:
        _active = StopRequest().install()
    return _active


def release() -> None:
    """Give the stop signals back to their previous handlers (when a run in this process ends)."""
    global _active
    if _active is not None:
        _active.uninstall()
        _active = None


@contextlib.contextmanager
def held() -> Iterator[None]:
    """Hold the stop signals back for the block (they stay pending, then arrive): processes
    forked inside start with them held and release them once they are ready."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def for_data_worker() -> None:
    """In a data worker (forked or spawned with the stop signals held): a thread takes every stop
    signal and passes it on to the training process, except SIGTERM from the training process
    itself, which is how its data loader ends a worker (`Process.terminate`)."""
    parent = os.getppid()

    def pass_on() -> None:
        while True:
            info = signal.sigwaitinfo(STOP_SIGNALS)
            if info.si_signo == signal.SIGTERM and info.si_pid == parent:
                os._exit(0)
            if os.getppid() == parent:  # never to whichever process adopted an orphan
                try:
                    os.kill(parent, info.si_signo)
                except OSError:
                    pass

    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # stay held in every thread: the one below takes them
    threading.Thread(target=pass_on, name="flsl-stop-signals", daemon=True).start()
