"""A flsl command in its own process group, as a terminal or a scheduler starts it (SIGINT at its
default disposition, as in a foreground terminal job), for tests that signal or kill its
processes while it runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO


class Started:
    def __init__(self, *args: object, env: dict[str, str] | None = None) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "flsl_cli", *map(str, args)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env or dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200"),
            preexec_fn=lambda: (signal.signal(signal.SIGINT, signal.SIG_DFL), os.setsid()),
        )

    def wait_until(self, condition, *, timeout: float = 180) -> bool:
        """Poll until `condition()`; False if the command ended or the time ran out first."""
        deadline = time.time() + timeout
        while not condition():
            if self.process.poll() is not None or time.time() > deadline:
                return False
            time.sleep(0.001)
        return True

    def wait_for(self, condition, *, what: str, timeout: float = 120) -> None:
        """Poll until `condition()`; the test fails, with the command's errors, if it never holds."""
        if not self.wait_until(condition, timeout=timeout):
            self.process.kill()
            _, err = self.process.communicate(timeout=60)
            pytest.fail(f"the command ended or timed out before {what}:\n{err[-3000:]}")

    def handles_stop_signals(self) -> bool:
        """The command's process catches SIGTERM (flsl's stop handling is in place)."""
        try:
            status = Path(f"/proc/{self.process.pid}/status").read_text()
        except OSError:
            return False
        caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
        return bool(caught & (1 << (signal.SIGTERM - 1)))

    def processes(self) -> list[int]:
        """Every process of the group: training processes and data workers."""
        listing = subprocess.run(["ps", "-o", "pid=", "-g", str(self.process.pid)], capture_output=True, text=True)
        return [int(pid) for pid in listing.stdout.split()]

    def signal_group(self, signum: int) -> None:
        os.killpg(self.process.pid, signum)

    def finish(self, *, timeout: float = 300) -> subprocess.CompletedProcess:
        out, err = self.process.communicate(timeout=timeout)
        return subprocess.CompletedProcess(self.process.args, self.process.returncode, out, err)
