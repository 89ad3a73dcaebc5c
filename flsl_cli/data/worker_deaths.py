"""How this process's data workers ended, read before PyTorch reaps them.

A worker killed mid-write (the OOM killer, `kill -9`) reaches the rank as one of three torch
errors depending on timing: "is killed by signal", "exited unexpectedly" (the signal is lost
once torch has reaped the worker) or a raw EOFError/UnpicklingError from a torn queue message.
A thread per worker waits for it with `waitid(WNOWAIT)`, which sees the exit status without
reaping, so whichever error torch raises, the rank can name the worker and its signal.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

_ended: dict[int, str] = {}
_watched: set[int] = set()
_lock = threading.Lock()


def children() -> set[int]:
    """Pids of this process's live child processes (Linux /proc; empty elsewhere)."""
    me = str(os.getpid())
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[1] == me:
            found.add(int(stat.parent.name))
    return found


def watch(pids: set[int]) -> None:
    """Record how each of these child processes ends."""
    for pid in pids - _watched:
        _watched.add(pid)
        threading.Thread(target=_wait, args=(pid,), name=f"flsl-worker-{pid}", daemon=True).start()


def _wait(pid: int) -> None:
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
    except ChildProcessError:  # reaped before this thread ran: the end is unknown
        info = None
    if info is None:  # also: None when the process had not ended, which WEXITED rules out
        how = "unknown"
    else:
        if info.si_code in (os.CLD_KILLED, os.CLD_DUMPED):
            how = signal.Signals(info.si_status).name
        else:
            how = f"exit code {info.si_status}"
    with _lock:
        _watched.discard(pid)
        if how != "exit code 0":
            _ended[pid] = how


def abnormal_end(*, pid: int | None = None, wait_s: float = 2.0) -> tuple[int, str] | None:
    """(pid, how) of a watched worker that was killed or exited non-zero, waiting up to wait_s
    for the kernel to report it; `pid` narrows the question to one worker."""
    deadline = time.monotonic() + wait_s
    while True:
        with _lock:
            ended = [(p, how) for p, how in _ended.items() if pid is None or p == pid]
        if ended:
            return ended[0]
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.05)
