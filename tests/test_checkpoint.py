"""Checkpoints: atomic, committed by a manifest, pruned, and never unpickling code."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from flsl_cli.checkpoint.store import list_checkpoints, load_file, newest_valid, save_checkpoint, verify
from flsl_cli.errors import CheckpointError


def _save(run, step, keep=5):
    return save_checkpoint(run, step=step, keep_last=keep, payload={"step": step, "w": torch.full((3,), float(step))})


def test_save_load_roundtrip_and_manifest(tmp_path):
    path = _save(tmp_path, 7)
    refs = list_checkpoints(tmp_path)
    assert [r.step for r in refs] == [7] and refs[0].path == path
    assert verify(refs[0]) is None
    assert torch.equal(load_file(path)["w"], torch.full((3,), 7.0))
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if ".tmp" in p.name]


def test_keep_last_prunes_oldest(tmp_path):
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, keep=2)
    assert [r.step for r in list_checkpoints(tmp_path)] == [3, 4]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step-00000003.json",
        "step-00000003.pt",
        "step-00000004.json",
        "step-00000004.pt",
    ]


def test_file_without_manifest_is_not_a_checkpoint(tmp_path):
    """A .pt whose manifest was never written (crash mid-save) is ignored."""
    _save(tmp_path, 1)
    torch.save({"format": "flsl-checkpoint/1", "step": 2}, tmp_path / "checkpoints" / "step-00000002.pt")
    ref, payload = newest_valid(tmp_path)
    assert ref.step == 1 and payload["step"] == 1


def test_truncated_newest_falls_back_to_previous(tmp_path):
    _save(tmp_path, 1)
    path = _save(tmp_path, 2)
    with open(path, "r+b") as handle:
        handle.truncate(os.path.getsize(path) // 2)
    skipped = []
    ref, payload = newest_valid(tmp_path, on_skip=lambda r, why: skipped.append((r.step, why)))
    assert ref.step == 1 and payload["step"] == 1
    assert skipped and skipped[0][0] == 2 and "truncated" in skipped[0][1]


def test_only_truncated_checkpoint_is_refused(tmp_path):
    path = _save(tmp_path, 3)
    with open(path, "r+b") as handle:
        handle.truncate(100)
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        newest_valid(tmp_path)


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {_Evil.marker}",))


def test_pickle_carrying_code_is_refused_and_not_run(tmp_path):
    """A file that would run a command when unpickled is refused, and the command never runs."""
    _Evil.marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as handle:
        pickle.dump({"format": "flsl-checkpoint/1", "x": _Evil()}, handle)
    with pytest.raises(CheckpointError, match="refused to load"):
        load_file(path)
    assert not _Evil.marker.exists()


def test_not_a_flsl_checkpoint(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="not a flsl checkpoint"):
        load_file(path)


def test_crash_during_save_leaves_previous_checkpoint_loadable(tmp_path, monkeypatch):
    """If writing fails midway, no partial file appears under a final name."""
    _save(tmp_path, 1)

    def broken_save(obj, handle):
        handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        _save(tmp_path, 2)
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000001.json", "step-00000001.pt"]
    assert newest_valid(tmp_path)[0].step == 1
