"""Real servers on 127.0.0.1 for tests: moto's S3 endpoint, a plain HTTP file server, and a
TCP proxy that can be killed and restarted to make an endpoint go away for a while."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, *, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


class Process:
    def __init__(self, args: list[str], *, port: int, cwd: Path | None = None, env: dict | None = None) -> None:
        self.args, self.port, self.cwd, self.env = args, port, cwd, env
        self.process: subprocess.Popen | None = None

    def start(self) -> Process:
        self.process = subprocess.Popen(
            self.args,
            cwd=self.cwd,
            env={**os.environ, **(self.env or {})},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port)
        return self

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


def moto_server() -> Process:
    port = free_port()
    return Process([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], port=port, env=S3_ENV)


def http_server(directory: Path) -> Process:
    port = free_port()
    return Process([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"], port=port, cwd=directory)


def tcp_proxy(target_port: int, *, port: int | None = None) -> Process:
    port = port or free_port()
    return Process([sys.executable, str(HERE / "tcp_proxy.py"), str(port), str(target_port)], port=port)
