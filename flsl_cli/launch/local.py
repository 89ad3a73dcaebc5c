"""Run a function in N local processes (one per GPU, or N CPU processes with gloo).

Each child gets torchrun-style variables (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT).
A user error raised in any child is pickled to a small file (a `FlslError` pickles whole: its
type, message and fields) and raised again here as itself, so the CLI renders it once, like in a
single process. A stop signal sent to this process alone (`kill
PID`, a scheduler that signals only its child) is passed on to every child, which stop
together at one step (see `flsl_cli.signals`).
"""

from __future__ import annotations

import os
import pickle
import signal
import socket
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path

import torch.multiprocessing as mp

from flsl_cli.errors import FlslError
from flsl_cli.signals import STOP_SIGNALS, held, stop_request

_ERROR = ".error.pickle"  # a FlslError, pickled whole
_CRASH = ".crash.txt"  # any other exception's traceback


def _rank_of(path: Path) -> int:
    return int(path.name.removeprefix("rank").split(".")[0])


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _child(local_rank: int, fn: Callable, kwargs: dict, world_size: int, port: int, error_dir: str) -> None:
    stop_request()  # before anything slow: the parent started this process with stop signals held
    os.environ.update(
        {
            "RANK": str(local_rank),
            "LOCAL_RANK": str(local_rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    try:
        fn(**kwargs)
    except FlslError as exc:
        Path(error_dir, f"rank{local_rank}{_ERROR}").write_bytes(pickle.dumps(exc))
        raise SystemExit(exc.exit_code) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    except BaseException:
        Path(error_dir, f"rank{local_rank}{_CRASH}").write_text(traceback.format_exc())
        raise


def run_local_processes(fn: Callable, *, nprocs: int, kwargs: dict) -> None:
    """Call fn(**kwargs) in `nprocs` spawned processes and wait for all of them."""
    with tempfile.TemporaryDirectory(prefix="flsl-ranks-") as error_dir:
        # A stop signal that comes while the processes start is kept and passed on once they are
        # up. Holding it back is not enough here: torch's threads would take it and end this process.
        early: list[int] = []
        previous = {
            signum: signal.signal(signum, lambda signum, _frame: early.append(signum))
            for signum in STOP_SIGNALS
            if signal.getsignal(signum) is not signal.SIG_IGN
        }
        try:
            with held():  # the processes start with the stop signals held, until they can take them
                context = mp.start_processes(
                    _child,
                    args=(fn, kwargs, nprocs, free_port(), error_dir),
                    nprocs=nprocs,
                    join=False,
                    start_method="spawn",
                )
        except BaseException:
            _restore(previous)
            raise
        pass_on = _pass_on(context)
        for signum in previous:
            signal.signal(signum, pass_on)
        for early_signum in early:
            pass_on(early_signum, None)
        try:
            while not context.join():
                pass
        except mp.ProcessRaisedException:
            _raise_recorded(error_dir, fallback="a training process failed")
        except mp.ProcessExitedException as exc:
            if exc.exit_code == -signal.SIGINT:
                raise KeyboardInterrupt from None
            _raise_recorded(error_dir, fallback=f"a training process exited with code {exc.exit_code}")
        finally:
            _restore(previous)


def _restore(handlers: dict) -> None:
    for signum, handler in handlers.items():
        signal.signal(signum, handler)


def _pass_on(context):
    def handler(signum, _frame) -> None:
        for process in context.processes:
            if process.is_alive():
                try:
                    os.kill(process.pid, signum)
                except OSError:
                    pass

    return handler


def _raise_recorded(error_dir: str, *, fallback: str) -> None:
    """The error of the lowest rank that recorded one: a user error raised as itself, else a
    crash with its traceback."""
    for path in sorted(Path(error_dir).glob(f"rank*{_ERROR}"), key=_rank_of):
        # Written by this run's own children into a private temporary folder: safe to unpickle.
        error = pickle.loads(path.read_bytes())
        assert isinstance(error, FlslError)
        raise error
    crashes = sorted(Path(error_dir).glob(f"rank*{_CRASH}"), key=_rank_of)
    if crashes:
        raise RuntimeError(f"process {_rank_of(crashes[0])} crashed:\n{crashes[0].read_text()}")
    raise FlslError(fallback, fix="See the messages above; the run can be continued with `flsl resume RUN_DIR`")
