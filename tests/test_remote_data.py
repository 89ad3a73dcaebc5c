"""Streaming shards from real endpoints over HTTP: an S3-compatible server (moto, read by
s3fs) and a plain HTTP file server, including an endpoint that goes away mid-epoch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from conftest import REPO, tiny_overrides
from servers import S3_ENV, http_server, moto_server, tcp_proxy

pytest.importorskip("s3fs")
pytest.importorskip("moto")


def _without_speed(lines: list[str]) -> list[dict]:
    """Metrics lines without their timing, which differs from run to run."""
    return [{k: v for k, v in json.loads(line).items() if k != "images_per_s"} for line in lines]


def _env(endpoint: str) -> dict:
    return {
        **os.environ,
        **S3_ENV,
        "AWS_ENDPOINT_URL": endpoint,
        "FSSPEC_S3_ENDPOINT_URL": endpoint,
        "PYTHONUNBUFFERED": "1",
        "COLUMNS": "200",
    }


def _flsl(*args, env, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flsl_cli", *map(str, args)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def s3(demo_data):
    """moto on a private port behind a killable proxy; the demo shards uploaded to s3://shards/train."""
    import s3fs

    server = moto_server().start()
    proxy = tcp_proxy(server.port).start()
    endpoint = f"http://127.0.0.1:{proxy.port}"
    fs = s3fs.S3FileSystem(key="testing", secret="testing", client_kwargs={"endpoint_url": endpoint})
    fs.mkdir("shards")
    fs.mkdir("runs")
    for path in sorted((demo_data / "train").iterdir()):
        fs.put_file(str(path), f"shards/train/{path.name}")
    try:
        yield {"endpoint": endpoint, "fs": fs, "proxy": proxy}
    finally:
        proxy.kill()
        server.kill()


def test_train_from_s3_index_and_brace_pattern(s3, tmp_path):
    """data.train as an s3:// directory with index.json, and as a brace pattern, both train."""
    env = _env(s3["endpoint"])
    for spec in ("s3://shards/train", "s3://shards/train/demo-train-{000000..000007}.tar"):
        run = tmp_path / f"run{len(spec)}"
        result = _flsl(
            "pretrain", "recipes/demo.yaml", *tiny_overrides(spec, optim__max_steps=3), "--run-dir", run, env=env
        )
        assert result.returncode == 0, result.stderr
        assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 3
    assert "testing" not in result.stderr + result.stdout  # credentials never printed


def test_endpoint_outage_mid_epoch(s3, tmp_path):
    """The S3 endpoint disappears for a few seconds mid-epoch and comes back: the run finishes,
    nothing is counted as lost, and the result equals an undisturbed run."""
    env = _env(s3["endpoint"])
    common = tiny_overrides("s3://shards/train", optim__epochs=2, data__num_workers=2, data__max_bad_fraction=0)
    calm = tmp_path / "calm"
    assert _flsl("pretrain", "recipes/demo.yaml", *common, "--run-dir", calm, env=env).returncode == 0

    stormy = tmp_path / "stormy"
    process = subprocess.Popen(
        [sys.executable, "-m", "flsl_cli", "pretrain", "recipes/demo.yaml", *common, "--run-dir", str(stormy)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not (
        (stormy / "metrics.jsonl").exists() and len((stormy / "metrics.jsonl").read_text().splitlines()) >= 2
    ):
        time.sleep(0.1)
    s3["proxy"].kill()
    time.sleep(4)
    s3["proxy"].start()
    _, err = process.communicate(timeout=600)
    assert process.returncode == 0, err
    assert not (stormy / "bad_samples.jsonl").read_text().strip()
    calm_metrics = (calm / "metrics.jsonl").read_text().splitlines()
    stormy_metrics = (stormy / "metrics.jsonl").read_text().splitlines()
    assert _without_speed(calm_metrics) == _without_speed(stormy_metrics)


def test_missing_bucket_and_unmatched_pattern(s3, tmp_path):
    env = _env(s3["endpoint"])
    for spec, needle in (
        ("s3://no-such-bucket/train", "does not exist"),
        ("s3://shards/train/other-{000000..000003}.tar", "matches no shard"),
    ):
        result = _flsl("pretrain", "recipes/demo.yaml", *tiny_overrides(spec), "--run-dir", tmp_path / "r", env=env)
        assert result.returncode == 2, result.stderr
        assert needle in result.stderr and "Traceback" not in result.stderr
        assert not (tmp_path / "r").exists()


def test_unknown_protocol(tmp_path):
    result = _flsl(
        "pretrain",
        "recipes/demo.yaml",
        *tiny_overrides("nosuchproto://bucket/train"),
        "--run-dir",
        tmp_path / "r",
        env=_env("http://127.0.0.1:9"),
    )
    assert result.returncode == 2 and "nosuchproto://" in result.stderr and "Traceback" not in result.stderr


def test_train_from_http_server(demo_data, tmp_path):
    """Shards served by a plain HTTP server, named by the URL of their index."""
    server = http_server(demo_data / "train").start()
    try:
        url = f"http://127.0.0.1:{server.port}/index.json"
        result = _flsl(
            "pretrain",
            "recipes/demo.yaml",
            *tiny_overrides(url, optim__max_steps=3),
            "--run-dir",
            tmp_path / "run",
            env=_env("http://127.0.0.1:9"),
        )
        assert result.returncode == 0, result.stderr
    finally:
        server.kill()


def test_run_dir_on_s3_and_resume_from_it(s3, tmp_path):
    """--run-dir s3://...: recipe, metrics and committed checkpoints land there; `flsl resume
    s3://...` continues and ends exactly where an uninterrupted local run ends."""
    import torch

    env = _env(s3["endpoint"])
    common = tiny_overrides("s3://shards/train", optim__epochs=2)
    local = tmp_path / "local"
    assert _flsl("pretrain", "recipes/demo.yaml", *common, "--run-dir", local, env=env).returncode == 0

    url = "s3://runs/exp1"
    first = _flsl("pretrain", "recipes/demo.yaml", *common, "--set", "optim.max_steps=7", "--run-dir", url, env=env)
    assert first.returncode == 0, first.stderr
    fs = s3["fs"]
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls("runs/exp1/checkpoints"))
    assert "step-00000007.json" in names and "step-00000007.pt" in names
    assert all(name.replace(".pt", ".json") in names for name in names if name.endswith(".pt"))
    assert {"recipe.yaml", "run.json", "metrics.jsonl"} <= {p.rsplit("/", 1)[-1] for p in fs.ls("runs/exp1")}

    resumed = _flsl("resume", url, "--set", "optim.max_steps=null", env=env)
    assert resumed.returncode == 0, resumed.stderr
    fs.invalidate_cache()
    remote_metrics = fs.cat_file("runs/exp1/metrics.jsonl").decode().splitlines()
    local_metrics = (local / "metrics.jsonl").read_text().splitlines()
    assert _without_speed(remote_metrics) == _without_speed(local_metrics)
    newest = sorted(p for p in fs.ls("runs/exp1/checkpoints") if p.endswith(".pt"))[-1]
    fs.get_file(newest, str(tmp_path / "remote.pt"))
    remote_final = torch.load(tmp_path / "remote.pt", weights_only=True)
    local_final = torch.load(sorted((local / "checkpoints").glob("*.pt"))[-1], weights_only=True)
    assert remote_final["step"] == local_final["step"]
    for key, value in local_final["teacher"].items():
        assert torch.equal(value, remote_final["teacher"][key]), key


def test_every_rank_log_of_a_remote_run_lands_there_and_keeps_its_earlier_lines(s3, tmp_path):
    """--devices 2 --run-dir s3://...: each process uploads its own logs/rank-N.log when it ends;
    `flsl resume` pulls each rank's log first, so the lines of the earlier attempt stay."""
    env = _env(s3["endpoint"])
    fs = s3["fs"]
    url = "s3://runs/two"
    common = tiny_overrides("s3://shards/train", optim__max_steps=3)
    first = _flsl("pretrain", "recipes/demo.yaml", *common, "--devices", "2", "--run-dir", url, env=env)
    assert first.returncode == 0, first.stderr
    fs.invalidate_cache()
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls("runs/two/logs")) == ["rank-0.log", "rank-1.log"]

    earlier = {
        rank: f"2026-12-02 05:00:00,000 rank {rank} WARNING flsl_cli.storage: retrying listing {url}\n"
        for rank in (0, 1)
    }
    for rank, line in earlier.items():  # what the first attempt would have logged
        fs.pipe_file(f"runs/two/logs/rank-{rank}.log", line.encode())
    resumed = _flsl("resume", url, "--devices", "2", "--set", "optim.max_steps=5", env=env)
    assert resumed.returncode == 0, resumed.stderr
    fs.invalidate_cache()
    for rank, line in earlier.items():
        assert fs.cat_file(f"runs/two/logs/rank-{rank}.log").decode().startswith(line), rank
    assert json.loads(fs.cat_file("runs/two/run.json"))["step"] == 5


def test_transient_is_told_by_type_errno_and_status_not_by_words():
    """A malformed shard is not retried however its message reads; resets, timeouts, throttling
    and 5xx are, also when a backend translated them into a generic OSError."""
    import errno

    from botocore.exceptions import ClientError

    from flsl_cli import storage

    def s3_error(status: int, code: str) -> ClientError:
        return ClientError(
            {"Error": {"Code": code, "Message": "x"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject"
        )

    def translated(status: int, code: str) -> OSError:
        error = OSError(errno.EIO, "whatever the server said")
        error.__cause__ = s3_error(status, code)
        return error

    permanent = [
        ValueError("malformed header in s3://b/in1k-train-000500.tar"),
        ValueError("HTTP 503 connection reset timeout"),
        FileNotFoundError("s3://b/x"),
        PermissionError("Connection timed out"),
        translated(403, "AccessDenied"),
        s3_error(404, "NoSuchKey"),
        OSError(errno.EIO, "503 Service Unavailable"),
    ]
    transient = [
        ConnectionResetError(errno.ECONNRESET, "x"),
        TimeoutError(),
        OSError(errno.ETIMEDOUT, "x"),
        s3_error(503, "SlowDown"),
        s3_error(429, "x"),
        translated(502, "BadGateway"),
        OSError(errno.EBUSY, "x"),
    ]
    assert [storage.is_transient(e) for e in permanent] == [False] * len(permanent)
    assert [storage.is_transient(e) for e in transient] == [True] * len(transient)


def test_malformed_data_is_not_retried(caplog):
    """with_retries gives up at once on a ValueError naming a shard, and logs no retry."""
    from flsl_cli import storage

    calls = []

    def action():
        calls.append(1)
        raise ValueError("malformed header in s3://b/in1k-train-000500.tar")

    with pytest.raises(ValueError), caplog.at_level("WARNING", logger="flsl_cli"):
        storage.with_retries(action, url="s3://b/in1k-train-000500.tar", what="reading")
    assert len(calls) == 1
    assert not caplog.records


def test_endpoint_away_is_retried_and_logged(s3, monkeypatch, caplog):
    """A real S3 read while the endpoint is unreachable: the refused connection is retried, the
    retry logged on one line (what, URL, attempt n/N, reason, no credentials), and the read that
    follows once the endpoint is back returns the object."""
    import fsspec

    from flsl_cli import storage

    monkeypatch.setitem(
        fsspec.config.conf,
        "s3",
        {  # as FSSPEC_S3_* variables would set it
            "endpoint_url": s3["endpoint"],
            "key": "testing",
            "secret": "testing",
            "config_kwargs": {"retries": {"max_attempts": 1}},
        },
    )
    s3["fs"].pipe_file("shards/note.txt", b"hello")
    s3["proxy"].kill()
    waits = []

    def endpoint_back(seconds: float) -> None:
        waits.append(seconds)
        if not s3["proxy"].process or s3["proxy"].process.poll() is not None:
            s3["proxy"].start()

    monkeypatch.setattr(storage, "_sleep", endpoint_back)
    with caplog.at_level("WARNING", logger="flsl_cli"):
        data = storage.read_bytes("s3://shards/note.txt")
    assert data == b"hello"
    lines = [record.getMessage() for record in caplog.records if record.name == "flsl_cli.storage"]
    assert len(lines) == len(waits) >= 1
    assert lines[0].startswith(f"retrying reading s3://shards/note.txt: attempt 1/{storage.RETRY_ATTEMPTS} failed (")
    assert "testing" not in "\n".join(lines)


def test_retry_lines_go_to_every_rank_file_and_rank_0_terminal(tmp_path, capsys):
    """In a run, each rank's retries land in RUN_DIR/logs/rank-N.log; only rank 0's reach the terminal."""
    from flsl_cli import storage
    from flsl_cli.train.rundir import rank_log_path
    from flsl_cli.train.runlog import run_logging

    def flaky():
        attempts.append(1)
        if len(attempts) == 1:
            raise ConnectionResetError(104, "reset")
        return "ok"

    for rank in (1, 0):
        attempts = []
        with run_logging(tmp_path, rank=rank):
            assert storage.with_retries(flaky, url="s3://b/shard-000001.tar", what="reading") == "ok"
        terminal = capsys.readouterr().err
        logged = rank_log_path(tmp_path, rank=rank).read_text()
        assert f"rank {rank} WARNING flsl_cli.storage: retrying reading s3://b/shard-000001.tar: attempt 1/" in logged
        assert ("flsl: retrying reading s3://b/shard-000001.tar" in terminal) == (rank == 0)


def test_a_cut_remote_upload_is_removed_by_the_next_writer():
    """On a remote filesystem that cannot upload atomically (fsspec's memory://, like sftp), a
    push killed between its upload and its move leaves `NAME.tmp`: rank 0 of the next attempt
    removes it (and every push does), and committed checkpoints stay."""
    import fsspec

    from flsl_cli.train import remote

    fs = fsspec.filesystem("memory")
    folder = "/cut-upload/run/checkpoints"
    for name, data in (("step-00000003.pt", b"x"), ("step-00000003.json", b"{}"), ("step-00000005.pt.tmp", b"cut")):
        fs.pipe(f"{folder}/{name}", data)
    assert remote.remove_cut_uploads("memory://cut-upload/run") == ["step-00000005.pt.tmp"]
    left = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(folder, detail=False))
    assert left == ["step-00000003.json", "step-00000003.pt"]
    assert remote.remove_cut_uploads("memory://no-such/run") == []  # nothing pushed yet
