"""Multi-crop geometry, per-sample determinism, and the sharded stream: disjoint coverage
across ranks and workers, and exact continuation after a skip."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import REPO
from PIL import Image

from flsl_cli.config.schema import Recipe
from flsl_cli.data import augment as aug_mod
from flsl_cli.data.augment import MultiCropAugment, sample_crop
from flsl_cli.data.shards import resolve_shards
from flsl_cli.data.stream import TrainStream, build_loader, plan_layout
from flsl_cli.errors import DataError


def _recipe(train="x", **augment) -> Recipe:
    return Recipe.model_validate(
        {
            "data": {"train": str(train)},
            "model": {"arch": "vit_tiny", "patch_size": 8},
            "augment": {"global_size": 32, "local_size": 16, **augment},
            "loss": {"query_window_global": 2, "query_window_local": 2},
        }
    )


def test_student_crops_lie_inside_the_teacher_crop(monkeypatch):
    """Student global and local boxes are cut from the teacher box, and the teacher box's area
    fraction of the image lies in teacher_scale."""
    boxes = []
    real = aug_mod.crop_resize

    def spy(image, box, size, **scale):
        boxes.append(box)
        return real(image, box, size, **scale)

    monkeypatch.setattr(aug_mod, "crop_resize", spy)
    augment = MultiCropAugment(_recipe())
    image = Image.new("RGB", (120, 80), (128, 64, 32))
    for seed in range(30):
        boxes.clear()
        augment(image, rng=np.random.default_rng(seed))
        (tl, tt, tw, th), *students = boxes
        assert 0.8 * 120 * 80 * (1 - 1e-9) <= tw * th <= 120 * 80 * (1 + 1e-9)  # teacher_scale (0.8, 1.0)
        assert 0 <= tl and tl + tw <= 120 + 1e-9 and 0 <= tt and tt + th <= 80 + 1e-9
        assert 3 / 4 - 1e-9 <= tw / th <= 4 / 3 + 1e-9
        for left, top, w, h in students:
            assert tl - 1e-6 <= left and left + w <= tl + tw + 1e-6
            assert tt - 1e-6 <= top and top + h <= tt + th + 1e-6
        assert len(students) == 3


def test_student_and_local_boxes_are_drawn_in_the_teacher_views_coordinates():
    """As in the authors' release: measured in the teacher view (the teacher box stretched to a
    square), the student and local boxes' area fractions lie in their scale ranges and their
    aspect ratios in 3/4..4/3, however elongated the teacher box is in the image (in image pixels
    they would range over 9/16..16/9)."""
    from flsl_cli.data.view_plan import draw_crops

    aug = _recipe(local_crops=4).augment
    ratios, teacher_ratios = [], []
    for seed in range(300):
        crops = draw_crops(aug, (300, 200), rng=np.random.default_rng(seed))
        tl, tt, tw, th = crops.teacher
        teacher_ratios.append(tw / th)
        for box, scale in [(crops.student, aug.student_scale), *[(b, aug.local_scale) for b in crops.locals_]]:
            fw, fh = box[2] / tw, box[3] / th  # fractions of the teacher view's sides
            assert scale[0] * 0.999 <= fw * fh <= scale[1] * 1.001
            ratios.append(fw / fh)
            assert 0.75 * 0.999 <= fw / fh <= 4 / 3 * 1.001
    assert min(ratios) < 0.8 and max(ratios) > 1.25  # the whole aspect range is used
    assert max(teacher_ratios) > 1.25  # with teacher boxes far from square


def test_sample_crop_scale_range():
    rng = np.random.default_rng(0)
    for _ in range(200):
        left, top, w, h = sample_crop(200, 100, scale=(0.05, 0.4), rng=rng)
        assert 0 <= left and left + w <= 200 + 1e-9 and 0 <= top and top + h <= 100 + 1e-9
        assert 0.05 * 20000 * 0.999 <= w * h <= 0.4 * 20000 * 1.001


def test_views_shapes_queries_and_determinism():
    """Same generator seed -> identical views; the query indices fit the token grids."""
    augment = MultiCropAugment(_recipe())
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    a = augment(image, rng=np.random.default_rng(7))
    b = augment(image, rng=np.random.default_rng(7))
    c = augment(image, rng=np.random.default_rng(8))
    assert a["teacher"].shape == (3, 32, 32) and a["global"].shape == (3, 32, 32)
    assert a["locals"].shape == (2, 3, 16, 16)
    assert a["global_queries"].shape == (4,) and a["local_queries"].shape == (2, 1)
    assert int(a["global_queries"].max()) < 16 and int(a["local_queries"].max()) < 4
    for key in a:
        assert torch.equal(a[key], b[key])
    assert not torch.equal(a["global"], c["global"])


def _keys(shards, recipe, *, world, workers, rank, epoch, skip=0, batch=4):
    layout, _ = plan_layout(shards, world_size=world, num_workers=workers, local_batch=batch)
    stream = TrainStream(shards, layout=layout, rank=rank, seed=3, shuffle_buffer=10, augment=MultiCropAugment(recipe))
    stream.set_epoch(epoch, skip_batches=skip)
    return [list(b["key"]) for b in build_loader(stream, pin_memory=False)], layout


def test_every_sample_at_most_once_per_epoch_across_ranks_and_workers(demo_data):
    """2 ranks x 2 workers: no key twice in an epoch, equal step counts, and the epochs differ."""
    shards = resolve_shards(str(demo_data / "train"))
    recipe = _recipe(demo_data / "train")
    seen, steps = [], []
    for rank in range(2):
        batches, layout = _keys(shards, recipe, world=2, workers=2, rank=rank, epoch=0)
        steps.append(len(batches))
        seen += [k for batch in batches for k in batch]
    assert steps[0] == steps[1] == layout.steps_per_epoch
    assert len(seen) == len(set(seen))
    assert len(seen) >= 0.8 * shards.num_samples
    next_epoch, _ = _keys(shards, recipe, world=2, workers=2, rank=0, epoch=1)
    this_epoch, _ = _keys(shards, recipe, world=2, workers=2, rank=0, epoch=0)
    assert [k for b in next_epoch for k in b] != [k for b in this_epoch for k in b]


@pytest.mark.parametrize("skip", [1, 2, 5])
def test_skipping_batches_continues_exactly(demo_data, skip):
    """Resuming at batch b of an epoch yields exactly the batches b, b+1, ... of a full pass."""
    shards = resolve_shards(str(demo_data / "train"))
    recipe = _recipe(demo_data / "train")
    full, _ = _keys(shards, recipe, world=1, workers=2, rank=0, epoch=2)
    resumed, _ = _keys(shards, recipe, world=1, workers=2, rank=0, epoch=2, skip=skip)
    assert resumed == full[skip:]


def test_too_few_shards_for_the_processes(demo_data):
    shards = resolve_shards(str(demo_data / "train"))
    with pytest.raises(DataError, match="needs at least one shard"):
        plan_layout(shards, world_size=len(shards.shards) + 1, num_workers=0, local_batch=1)


def test_fewer_workers_when_shards_are_scarce(demo_data):
    shards = resolve_shards(str(demo_data / "train"))
    layout, notes = plan_layout(shards, world_size=2, num_workers=8, local_batch=2)
    assert layout.workers == len(shards.shards) // 2 and notes


def test_shard_forms_resolve_to_the_same_set(demo_data):
    """Directory with index, brace pattern and comma list name the same shards and counts."""
    by_dir = resolve_shards(str(demo_data / "train"))
    names = sorted(s.url for s in by_dir.shards)
    n = len(names)
    pattern = str(demo_data / "train" / f"demo-train-{{000000..{n - 1:06d}}}.tar")
    by_pattern = resolve_shards(pattern)
    by_list = resolve_shards(",".join(names))
    assert sorted(s.url for s in by_pattern.shards) == names == sorted(s.url for s in by_list.shards)
    assert by_dir.num_samples == by_pattern.num_samples == by_list.num_samples


def test_jpeg_draft_decoding_only_when_every_view_keeps_its_resolution():
    """A large JPEG is decoded at reduced size when all crops allow it, and the views stay close
    to those from full-size decoding; a small one is decoded at full size."""
    import io

    from flsl_cli.data.augment import CropPlan, decode_for, open_image

    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)
    big = Image.fromarray(base).resize((1600, 1200), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    big.save(buffer, format="JPEG", quality=95)
    data = buffer.getvalue()
    plan = CropPlan(teacher=(0, 0, 1600, 1200), student=(100, 100, 1000, 1000), locals_=((200, 200, 400, 400),))
    decoded, scale = decode_for(open_image(data), plan, global_size=224, local_size=96)
    assert scale[0] <= 0.5 and decoded.size == (round(1600 * scale[0]), round(1200 * scale[1]))
    tight = CropPlan(teacher=(0, 0, 1600, 1200), student=(100, 100, 1000, 1000), locals_=((200, 200, 120, 120),))
    _, full_scale = decode_for(open_image(data), tight, global_size=224, local_size=96)
    assert full_scale == (1.0, 1.0)

    augment = MultiCropAugment(Recipe.model_validate({"data": {"train": "x"}}))
    views_draft = augment.render(decoded, plan, scale=scale, rng=np.random.default_rng(1))
    full = Image.open(io.BytesIO(data)).convert("RGB")
    views_full = augment.render(full, plan, scale=(1.0, 1.0), rng=np.random.default_rng(1))
    for key in ("teacher", "global", "locals"):
        assert views_draft[key].shape == views_full[key].shape
        assert (views_draft[key] - views_full[key]).abs().mean() < 0.1


def test_a_jpeg_whose_sides_shrink_unevenly_keeps_every_box_inside_its_pixels():
    """Draft decoding rounds each side up on its own (2001 x 1500 at 1/4: 501 x 375, 0.2504
    across and 0.25 down): boxes that reach the bottom and right edges are cut at each axis's own
    scale, from the pixels that are there, and match full-size decoding."""
    import io

    from flsl_cli.data.augment import CropPlan, decode_for, open_image

    rng = np.random.default_rng(3)
    big = Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).resize(
        (2001, 1500), Image.Resampling.BICUBIC
    )
    buffer = io.BytesIO()
    big.save(buffer, format="JPEG", quality=95)
    data = buffer.getvalue()
    plan = CropPlan(teacher=(1, 0, 2000, 1500), student=(801, 600, 1200, 900), locals_=((1601, 1100, 400, 400),))
    decoded, scale = decode_for(open_image(data), plan, global_size=224, local_size=96)
    assert decoded.size == (501, 375) and scale == (501 / 2001, 375 / 1500)

    augment = MultiCropAugment(Recipe.model_validate({"data": {"train": "x"}}))
    views_draft = augment.render(decoded, plan, scale=scale, rng=np.random.default_rng(1))
    full = Image.open(io.BytesIO(data)).convert("RGB")
    views_full = augment.render(full, plan, scale=(1.0, 1.0), rng=np.random.default_rng(1))
    for key in ("teacher", "global", "locals"):  # normalised units: 0.15 is about 8/255
        assert (views_draft[key] - views_full[key]).abs().mean() < 0.15, key


@pytest.mark.parametrize("skip", [3, 4])
def test_resumed_stream_consumes_the_same_keys_on_two_ranks(demo_data, skip):
    """2 ranks x 2 workers: the keys consumed by an interrupted + resumed epoch equal those of an
    uninterrupted one, rank by rank, in order."""
    shards = resolve_shards(str(demo_data / "train"))
    recipe = _recipe(demo_data / "train")
    for rank in range(2):
        full, _ = _keys(shards, recipe, world=2, workers=2, rank=rank, epoch=1, batch=2)
        head = full[:skip]
        tail, _ = _keys(shards, recipe, world=2, workers=2, rank=rank, epoch=1, skip=skip, batch=2)
        assert head + tail == full


def test_no_shuffle_buffer_reads_in_shard_order(demo_data):
    """data.shuffle_buffer = 0 streams each reader's shards in file order."""
    shards = resolve_shards(str(demo_data / "train"))
    recipe = _recipe(demo_data / "train")
    layout, _ = plan_layout(shards, world_size=1, num_workers=0, local_batch=4)
    stream = TrainStream(shards, layout=layout, rank=0, seed=0, shuffle_buffer=0, augment=MultiCropAugment(recipe))
    stream.set_epoch(0)
    keys = [k for batch in build_loader(stream, pin_memory=False) for k in batch["key"]]
    first_shard = stream.slot_shards(0, 0)[0]
    from flsl_cli.data.shards import iter_samples

    assert keys[:4] == [key for key, _ in list(iter_samples(first_shard))[:4]]


def _raise_recipe_error(source: str) -> None:
    from flsl_cli.errors import RecipeError

    raise RecipeError(["data.train: required"], source=source)


def test_a_flsl_error_crosses_processes_intact():
    """A FlslError pickles with its message, location, remedy, exit code and subclass fields, and
    one raised in a spawned process is raised again in the parent as itself."""
    import multiprocessing
    import pickle

    from flsl_cli.errors import RecipeError, RunStopped, TrainingDiverged

    errors = [
        DataError("shard unreadable", where="s3://b/x.tar", fix="Regenerate it"),
        RunStopped("stopped", step=12, signal_name="SIGINT", where="run", fix="Resume it"),
        TrainingDiverged("loss is nan"),
        RecipeError(["optim.lr: must be > 0"], source="r.yaml"),
    ]
    for error in errors:
        back = pickle.loads(pickle.dumps(error))
        assert type(back) is type(error)
        assert (str(back), back.what, back.where, back.fix, back.exit_code) == (
            str(error),
            error.what,
            error.where,
            error.fix,
            error.exit_code,
        )
    assert pickle.loads(pickle.dumps(errors[1])).exit_code == 130 and errors[1].step == 12
    assert pickle.loads(pickle.dumps(errors[3])).problems == ["optim.lr: must be > 0"]

    with multiprocessing.get_context("spawn").Pool(1) as pool, pytest.raises(RecipeError) as raised:
        pool.apply(_raise_recipe_error, ("recipes/x.yaml",))
    assert raised.value.where == "recipes/x.yaml" and raised.value.problems == ["data.train: required"]
    assert raised.value.exit_code == 2 and "flsl recipe validate" in raised.value.fix


def test_a_data_error_in_a_loader_worker_arrives_as_itself(tmp_path):
    """Shards whose images never decode: the DataError raised in a loader worker reaches the
    training process with its own type, message and remedy (not as traceback text)."""
    from flsl_cli.data.shard_writer import ShardWriter
    from flsl_cli.data.stream import iterate

    with ShardWriter(tmp_path, prefix="bad", samples_per_shard=8) as writer:
        for index in range(16):
            writer.write(f"bad-{index:04d}", {"jpg": b"not an image", "cls": b"0"})
    shards = resolve_shards(str(tmp_path))
    layout, _ = plan_layout(shards, world_size=1, num_workers=2, local_batch=4)
    stream = TrainStream(shards, layout=layout, rank=0, seed=3, shuffle_buffer=4, augment=MultiCropAugment(_recipe()))
    with pytest.raises(DataError) as raised:
        list(iterate(build_loader(stream, pin_memory=False)))
    assert type(raised.value) is DataError
    assert raised.value.what.startswith("no readable sample near ") and raised.value.fix
    assert "Traceback" not in str(raised.value)


def test_an_epoch_that_leaves_samples_out_says_how_many(demo_data):
    """The demo's 8 shards of 24 over 3 reader slots: each slot reads 2 shards' worth, 144 of the
    192 samples an epoch, and the layout says so; over 2 slots every sample is read, no note."""
    from flsl_cli.data.stream import plan_layout

    shards = resolve_shards(str(demo_data / "train"))
    assert [shard.samples for shard in shards.shards] == [24] * 8
    layout, notes = plan_layout(shards, world_size=1, num_workers=3, local_batch=8)
    assert layout.steps_per_epoch * 8 == 144
    assert any("each epoch reads 144 of the 192 samples (75.0%)" in note for note in notes), notes
    layout, notes = plan_layout(shards, world_size=2, num_workers=1, local_batch=8)
    assert layout.steps_per_epoch * 8 * 2 == 192
    assert not any("each epoch reads" in note for note in notes), notes


_READER_GONE = """
import os, socket, sys, time
from multiprocessing import resource_sharer
from flsl_cli.data.stream import quiet_when_the_reader_is_gone

quiet_when_the_reader_is_gone()  # as every data worker does
dup = resource_sharer.DupFd(os.open(os.devnull, os.O_RDONLY))  # a tensor's file descriptor, offered
address, _ = dup._id
reader = socket.socket(socket.AF_UNIX if isinstance(address, str) else socket.AF_INET, socket.SOCK_STREAM)
reader.connect(address)
reader.close()  # the training process ends while it takes the descriptor
time.sleep(1)
sys.excepthook(ValueError, ValueError("any other error"), None)
"""


def test_a_data_worker_prints_no_traceback_when_its_reader_is_gone(tmp_path):
    """The thread that hands a batch's file descriptors over loses its reader (the training
    process was killed mid-handshake): no traceback; any other error is still printed."""
    script = tmp_path / "reader_gone.py"
    script.write_text(_READER_GONE)
    done = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 0, done.stderr
    assert "resource_sharer" not in done.stderr and "ValueError: any other error" in done.stderr, done.stderr


def _layout_notes(sizes: list[int], *, workers: int, batch: int) -> str:
    from flsl_cli.data.shards import Shard, ShardSet

    shards = ShardSet(shards=tuple(Shard(url=f"s-{i}.tar", samples=n) for i, n in enumerate(sizes)))
    _, notes = plan_layout(shards, world_size=1, num_workers=workers, local_batch=batch)
    return " ".join(notes)


def test_unread_note_blames_the_batch_when_the_shards_split_evenly():
    """The demo's case: 16 shards of 100 over 2 slots split evenly; the 800 samples of a slot fill
    12 batches of 64 and the last 32 are left out. The note names the batch, not the shard count."""
    note = _layout_notes([100] * 16, workers=2, batch=64)
    assert "each epoch reads 1536 of the 1600 samples" in note
    assert "each slot's 800 samples fill 12 batches of 64 and the last 32 are left out (64 samples" in note
    assert "do not split evenly" not in note and "differ in size" not in note


def test_unread_note_blames_the_shard_count_when_it_is_not_a_multiple_of_the_slots():
    """15 shards of 64 over 2 slots: 7 shards per slot fill whole batches of 64, and one shard is
    left out; the note names the shard count and the multiple that avoids it, not the batch."""
    note = _layout_notes([64] * 15, workers=2, batch=64)
    assert "15 shards do not split evenly over 2 reader slot(s), so the samples of 1 shard(s) are left out" in note
    assert "(64 samples; a shard count that is a multiple of 2 avoids it)" in note
    assert "batches of" not in note


def test_unread_note_blames_unequal_shards():
    """16 shards over 2 slots, half of 64 samples and half of 128: each slot reads as many as the
    smallest share (8 x 64), so 512 samples are left out; batches of 64 divide it."""
    note = _layout_notes([64] * 8 + [128] * 8, workers=2, batch=64)
    assert "the shards differ in size and each slot reads as many samples as the smallest share (512)" in note
    assert "so 512 samples are left out" in note and "batches of" not in note


def test_unread_note_names_both_causes_when_both_hold():
    """5 shards of 100 over 2 slots with batches of 64: a shard left over and a partial batch."""
    note = _layout_notes([100] * 5, workers=2, batch=64)
    assert "5 shards do not split evenly" in note and "the last 8 are left out (16 samples" in note


class _Slow(torch.utils.data.IterableDataset):
    def __iter__(self):
        while True:
            time.sleep(0.05)
            yield torch.zeros(1)


def test_a_killed_worker_is_named_from_torchs_own_error_whoever_reaped_it():
    """torch's loader, with no flsl watcher on its workers (as when torch reaps a killed worker
    before the watcher thread runs): the error torch raises still yields the worker's pid and
    SIGKILL, whether torch reported it from its SIGCHLD handler or as "exited unexpectedly"."""
    from flsl_cli.data.stream import worker_failure
    from flsl_cli.data.worker_deaths import children

    before = children()
    batches = iter(torch.utils.data.DataLoader(_Slow(), batch_size=None, num_workers=1))
    next(batches)
    (victim,) = children() - before
    os.kill(victim, signal.SIGKILL)
    with pytest.raises(RuntimeError) as raised:
        for _ in range(200):
            next(batches)
    failure = worker_failure(raised.value, run_dir="runs/x")
    assert failure is not None, raised.value
    assert failure.what.startswith(f"data worker (pid {victim}) was killed by SIGKILL"), failure.what
    assert "flsl resume runs/x" in failure.fix
