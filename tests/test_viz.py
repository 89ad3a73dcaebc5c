"""Pictures: `flsl visualize` (similarity maps, clusters, grid PNGs), `flsl plot` (a run's curves)
and `logging.tensorboard` (the same scalars as TensorBoard events, continued across a resume)."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import run_flsl, tiny_overrides
from typer.testing import CliRunner

from flsl_cli.cli.app import app

pytest.importorskip("matplotlib", reason="needs pip install 'flsl[viz]'")

STOP, RESUMED_AT, FINAL = 7, 5, 9  # the first attempt logs up to 7, the resume goes on from 5 to 9


def _invoke(*args) -> tuple[int, str]:
    """`flsl ARGS` in this process: (exit code, stdout + stderr); an escaped exception fails."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result.exit_code, " ".join((result.stdout + result.stderr).split())


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def resumed_run(demo_data, tmp_path_factory) -> Path:
    """A tiny run with TensorBoard: 7 steps (checkpoints at 5 and 7), the step-7 checkpoint lost,
    resumed from step 5 to 9, so steps 6 and 7 were logged twice."""
    run = tmp_path_factory.mktemp("viz") / "run"
    common = tiny_overrides(demo_data / "train", data__num_workers=0, logging__tensorboard="true")
    first = run_flsl("pretrain", "recipes/demo.yaml", *common, "--set", f"optim.max_steps={STOP}", "--run-dir", run)
    assert first.returncode == 0, first.stderr
    for path in (run / "checkpoints").glob(f"step-{STOP:08d}.*"):
        path.unlink()
    resumed = run_flsl("resume", run, "--set", f"optim.max_steps={FINAL}")
    assert resumed.returncode == 0, resumed.stderr
    assert f"from step {RESUMED_AT}" in resumed.stderr
    return run


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict[str, Path]:
    """Two photographs that ship with scikit-image, of different sizes and aspect ratios."""
    data = pytest.importorskip("skimage.data", reason="needs pip install 'flsl[viz]'")
    from PIL import Image

    folder = tmp_path_factory.mktemp("photos")
    paths = {"cat": folder / "cat.png", "coffee": folder / "coffee.jpg"}
    Image.fromarray(data.chelsea()).save(paths["cat"])  # 451 x 300
    Image.fromarray(data.coffee()).save(paths["coffee"])  # 600 x 400
    return paths


def test_help_imports_neither_torch_nor_matplotlib():
    """`flsl --help`, `flsl visualize --help` and `flsl plot --help` answer without the heavy packages."""
    import subprocess
    import sys

    from conftest import REPO

    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from flsl_cli.cli.app import app\n"
        "for args in (['--help'], ['visualize', '--help'], ['plot', '--help']):\n"
        "    result = CliRunner().invoke(app, args)\n"
        "    assert result.exit_code == 0, result.output\n"
        "print(*(name in sys.modules for name in ('torch', 'matplotlib', 'tensorboard')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False", "False"]


# --- the maps, in numbers -------------------------------------------------------------------


class RegionColours:
    """A hand-built 'backbone': every token is the mean colour of its 8 x 8 patch, at every layer."""

    def __init__(self, depth: int = 2) -> None:
        import torch

        self.module = torch.nn.Module()
        self.module.patch_embed = SimpleNamespace(patch_size=(8, 8))
        self.module.embed_dim = 3
        self.module.blocks = [torch.nn.Identity() for _ in range(depth)]
        self.module.forward_features = self.forward_features
        self.module.forward_intermediates = self.forward_intermediates

    @staticmethod
    def forward_intermediates(images, *, indices, norm, output_fmt, intermediates_only):
        import torch.nn.functional as F

        assert output_fmt == "NCHW" and intermediates_only
        return [F.avg_pool2d(images, 8) for _ in indices]

    def forward_features(self, images):
        return (
            self.forward_intermediates(images, indices=[0], norm=False, output_fmt="NCHW", intermediates_only=True)[0]
            .flatten(2)
            .transpose(1, 2)
        )


def test_two_flat_regions_separate_in_ass_and_probe_maps(tmp_path):
    """On an 80 x 48 image, red over 6 of 10 patch columns and blue over 4, with tokens that are
    the patch colours: the ASS map is 1 on red and 24/36 on blue (each token's similarity sum is
    the size of its region), a probe on red is 1 on red and 0 on blue."""
    from PIL import Image

    from flsl_cli.eval.backbones import wrap_module
    from flsl_cli.viz.api import Subject, model_row
    from flsl_cli.viz.images import prepare_image

    pixels = np.zeros((48, 80, 3), dtype=np.uint8)
    pixels[:, :48, 0] = 255
    pixels[:, 48:, 2] = 255
    Image.fromarray(pixels).save(tmp_path / "regions.png")
    model = wrap_module(
        RegionColours().module, mean=(0, 0, 0), std=(1, 1, 1), description={"kind": "test"}, identity="test"
    )
    image = prepare_image(tmp_path / "regions.png", size=48, patch=8, points=[(10, 20), (70, 5)])
    panels = model_row(Subject(model, name="hand-built"), image=image, layers=[1, 2])

    titles = [p.title for p in panels]
    assert titles[0] == "hand-built\nimage"
    for layer in (1, 2):
        ass = panels[titles.index(f"ASS\nlayer {layer}")].values_hw
        assert ass.shape == (6, 10)
        np.testing.assert_allclose(ass[:, :6], 1.0, atol=1e-6)
        np.testing.assert_allclose(ass[:, 6:], 24 / 36, atol=1e-6)
    on_red = panels[titles.index("probe (10,20)\nlayer 2")].values_hw
    np.testing.assert_allclose(on_red[:, :6], 1.0, atol=1e-6)
    np.testing.assert_allclose(on_red[:, 6:], 0.0, atol=1e-6)
    on_blue = panels[titles.index("probe (70,5)\nlayer 1")].values_hw
    np.testing.assert_allclose(on_blue[:, :6], 0.0, atol=1e-6)
    np.testing.assert_allclose(on_blue[:, 6:], 1.0, atol=1e-6)
    assert not any(p.kind == "clusters" for p in panels)  # no head: not a flsl checkpoint


def test_resize_keeps_the_patch_grid_whole():
    """Any image size becomes whole patches, the short side near --size."""
    from flsl_cli.viz.images import resized_shape

    assert resized_shape(width=451, height=300, size=64, patch=8) == (96, 64)
    assert resized_shape(width=300, height=451, size=448, patch=16) == (448, 672)
    assert resized_shape(width=5, height=3, size=20, patch=14) == (28, 14)


# --- the grid PNGs --------------------------------------------------------------------------


def _png_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as image:
        return image.size


def test_grids_have_the_expected_sizes_with_and_without_compare(resumed_run, photos, tmp_path):
    """One grid PNG per image and an index.html; a row per model: the image, ASS at layers 1 and 2
    (depth 2), 3 default points x 2 layers of probes, the clusters of the flsl head."""
    from flsl_cli.viz.grid import COLORBAR_PX, HEADER_PX, PANEL_PX, TITLE_PX

    columns = 1 + 2 + 3 * 2 + 1
    one = tmp_path / "one"
    code, output = _invoke("visualize", resumed_run, photos["cat"], "--out", one, "--size", 64)
    assert code == 0, output
    assert sorted(p.name for p in one.iterdir()) == ["cat.png", "index.html"]
    cat_panel_h = round(PANEL_PX * 64 / 96)  # 451 x 300 drawn at 96 x 64
    assert _png_size(one / "cat.png") == (columns * PANEL_PX + COLORBAR_PX, HEADER_PX + cat_panel_h + TITLE_PX)

    several = tmp_path / "several"
    code, output = _invoke(
        "visualize",
        resumed_run,
        photos["cat"],
        photos["coffee"],
        "--out",
        several,
        "--size",
        64,
        "--compare-random-init",
        "--layers",
        "2",
        "--points",
        "300,200",
    )
    assert code == 0, output
    assert sorted(p.name for p in several.iterdir()) == ["cat.png", "coffee.png", "index.html"]
    columns = 1 + 1 + 1 + 1  # image, ASS at layer 2, one probe (layer 2 is the last), clusters
    coffee_panel_h = round(PANEL_PX * 64 / 96)  # 600 x 400 drawn at 96 x 64
    for name, panel_h in (("cat.png", cat_panel_h), ("coffee.png", coffee_panel_h)):
        assert _png_size(several / name) == (
            columns * PANEL_PX + COLORBAR_PX,
            HEADER_PX + 2 * (panel_h + TITLE_PX),
        ), name
    index = (several / "index.html").read_text()
    assert 'src="cat.png"' in index and 'src="coffee.png"' in index and "random init" in index
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_each_row_has_a_colour_bar_and_the_maps_take_the_chosen_opacity(resumed_run, photos, tmp_path):
    """A grid of the checkpoint and its random init: each row has a colour bar (inferno, 0 to 1)
    at the right of its panels and level with them, the maps are drawn at --opacity, and in the
    saved PNG the bar runs from dark at the bottom to bright at the top."""
    import matplotlib.pyplot as plt
    from PIL import Image

    from flsl_cli.eval.backbones import ModelSpec, load_eval_model
    from flsl_cli.viz.api import Subject, model_row
    from flsl_cli.viz.clusters import load_head
    from flsl_cli.viz.grid import COLORBAR_LABEL, DPI, grid_figure
    from flsl_cli.viz.images import prepare_image

    image = prepare_image(photos["cat"], size=64, patch=8, points=[(225, 150)])
    rows = []
    for random_init in (False, True):
        model = load_eval_model(ModelSpec(checkpoint=str(resumed_run), random_init=random_init))
        rows.append(model_row(Subject(model, name="m", head=load_head(model)), image=image, layers=[2]))
    figure = grid_figure(rows, image_hw3=image.pixels_hw3, heading="cat", opacity=0.45)
    try:
        bars = [axes for axes in figure.axes if axes.get_label().startswith(COLORBAR_LABEL)]
        assert [axes.get_label() for axes in bars] == [f"{COLORBAR_LABEL} 1", f"{COLORBAR_LABEL} 2"]
        panels = [axes for axes in figure.axes if axes not in bars]
        for bar, drawn in zip(bars, rows):
            box = bar.get_position()
            row = [axes for axes in panels if axes.get_position().y0 <= box.y0 < box.y1 <= axes.get_position().y1]
            assert len(row) == len(drawn) and box.x0 > max(axes.get_position().x1 for axes in row)
            assert bar.get_ylim() == (0.0, 1.0)
        overlays = [picture for axes in panels for picture in axes.get_images()[1:]]
        assert overlays and {picture.get_alpha() for picture in overlays} == {0.45}
        assert {picture.get_cmap().name for picture in overlays} == {"inferno", "tab20"}
        path = tmp_path / "grid.png"
        figure.savefig(path, dpi=DPI)
    finally:
        plt.close(figure)
    pixels = np.asarray(Image.open(path).convert("L"), dtype=float)
    box = bars[0].get_position()
    height, width = pixels.shape
    rows_px = slice(round((1 - box.y1) * height) + 2, round((1 - box.y0) * height) - 2)
    column = pixels[rows_px, round((box.x0 + box.x1) / 2 * width)]
    assert column[0] > column[-1] + 100  # bright (hot) at the top, dark (cold) at the bottom


def test_clusters_are_the_heads_argmax(resumed_run, photos):
    """The cluster overlay is the argmax of the trained head over the last layer's tokens."""
    import torch

    from flsl_cli.eval.backbones import ModelSpec, load_eval_model
    from flsl_cli.models.load import load_network
    from flsl_cli.viz.api import Subject, model_row
    from flsl_cli.viz.clusters import load_head
    from flsl_cli.viz.images import prepare_image

    model = load_eval_model(ModelSpec(checkpoint=str(resumed_run)))
    image = prepare_image(photos["cat"], size=64, patch=8, points=[])
    panels = model_row(Subject(model, name="m", head=load_head(model)), image=image, layers=[2])
    clusters = panels[-1].values_hw
    network, _, step, _ = load_network(resumed_run, which="teacher")
    assert step == FINAL
    from flsl_cli.viz.features import to_tensor

    with torch.no_grad():
        expected = network.head(network.tokens(to_tensor(model, image.pixels_hw3))).argmax(-1).reshape(8, 12)
    assert panels[-1].kind == "clusters" and clusters.shape == (8, 12)
    assert (clusters == expected.numpy()).all()


# --- flsl plot ------------------------------------------------------------------------------


def test_plot_draws_every_logged_series_and_marks_the_resume(resumed_run, tmp_path):
    """Every numeric series of metrics.jsonl is a line with the logged steps and values, and
    every panel has a vertical line at the resume step."""
    from flsl_cli.viz.plot import RESUME_GID, START_GID, draw_run, read_curves

    rows = _metrics(resumed_run)
    assert [r["step"] for r in rows] == list(range(1, FINAL + 1))
    figure = draw_run(read_curves(str(resumed_run)))
    panels = [axes for axes in figure.axes if axes.get_visible() and axes.get_title()]
    drawn = {}
    for axes in panels:
        resumes = [line for line in axes.get_lines() if line.get_gid() == RESUME_GID]
        assert [list(line.get_xdata()) for line in resumes] == [[RESUMED_AT, RESUMED_AT]], axes.get_title()
        twins = [other for other in figure.axes if other is not axes and other.bbox.bounds == axes.bbox.bounds]
        for line in [line for ax in (axes, *twins) for line in ax.get_lines()]:
            if line.get_gid() not in (RESUME_GID, START_GID):
                drawn[(axes.get_title(), line.get_label())] = (list(line.get_xdata()), list(line.get_ydata()))
    titles = {title for title, _ in drawn}
    assert {
        "loss terms",
        "learning rate",
        "weight decay",
        "teacher temperature",
        "teacher momentum",
        "images/s",
        "data health (cumulative)",
    } <= titles
    assert drawn[("loss terms", "total")] == ([r["step"] for r in rows], [r["loss"] for r in rows])
    assert drawn[("loss terms", "volume (L3)")][1] == [r["volume"] for r in rows]
    assert drawn[("learning rate", "lr")][1] == [r["lr"] for r in rows]
    assert drawn[("teacher momentum", "momentum")][1] == [r["momentum"] for r in rows]
    assert drawn[("data health (cumulative)", "samples seen")][1] == [r["seen"] for r in rows]
    assert drawn[("data health (cumulative)", "bad samples")][1] == [r["bad"] for r in rows]
    series = {key for r in rows for key in r if key not in ("step", "epoch")}
    assert len(drawn) == len(series)  # each logged series once

    code, output = _invoke("plot", resumed_run, "--out", tmp_path / "run.png")
    assert code == 0, output
    assert _png_size(tmp_path / "run.png")[0] > 1000
    code, output = _invoke("plot", resumed_run)  # by default into the run dir, not the current folder
    assert code == 0, output
    assert f"wrote {resumed_run / 'plot.png'}" in output and _png_size(resumed_run / "plot.png")[0] > 1000


def test_plot_keeps_counts_off_the_percentage_axes_and_marks_chance_and_step_0(resumed_run):
    """A run that logged k-NN results: the accuracies, the chance levels (dotted) and the random
    init share the k-NN panel, whose lines all read in percent; the evaluated image count (400)
    has a panel of its own; every panel has a line at step 0 and starts at or before it."""
    import fsspec

    from flsl_cli.viz.plot import COUNTS_TITLE, KNN_TITLE, RESUME_GID, START_GID, draw_run, read_curves

    marks = (START_GID, RESUME_GID)

    fs = fsspec.filesystem("memory")
    rows = [
        {"step": 4, "knn_bbox_top1_k20": 81.0, "knn_bbox_feature_top1_k20": 22.0, "knn_bbox_images": 400},
        {"step": FINAL, "knn_bbox_top1_k20": 84.0, "knn_bbox_feature_top1_k20": 24.5, "knn_bbox_images": 400},
        {
            "step": FINAL,
            "final": True,
            "knn_bbox_chance_top1": 75.1,
            "knn_bbox_chance_feature_top1": 14.3,
            "random_init_knn_bbox_feature_top1_k20": 28.6,
        },
    ]
    text = (resumed_run / "metrics.jsonl").read_text() + "".join(json.dumps(row) + "\n" for row in rows)
    fs.pipe("/viz-counts/run/metrics.jsonl", text.encode())
    fs.pipe("/viz-counts/run/run.json", (resumed_run / "run.json").read_bytes())
    figure = draw_run(read_curves("memory://viz-counts/run"))
    panels = {axes.get_title(): axes for axes in figure.axes if axes.get_visible() and axes.get_title()}
    knn, counts = panels[KNN_TITLE], panels[COUNTS_TITLE]
    twins = [other for other in figure.axes if other is not knn and other.bbox.bounds == knn.bbox.bounds]
    assert not twins  # no second axis to hide a count on
    curves = {line.get_label(): list(line.get_ydata()) for line in knn.get_lines() if line.get_gid() not in marks}
    assert curves["knn_bbox_top1_k20"] == [81.0, 84.0] and curves["knn_bbox_feature_top1_k20"] == [22.0, 24.5]
    assert curves["chance (top1)"] == [75.1, 75.1] and curves["chance (feature top1)"] == [14.3, 14.3]
    assert curves["random init: knn_bbox_feature_top1_k20"] == [28.6]
    assert all(0 <= value <= 100 for values in curves.values() for value in values)
    assert not any("images" in label for label in curves if not label.startswith("random init"))
    (count,) = [line for line in counts.get_lines() if line.get_gid() not in marks]
    assert count.get_label() == "knn_bbox_images" and list(count.get_ydata()) == [400.0, 400.0]
    for title, axes in panels.items():
        starts = [line for line in axes.get_lines() if line.get_gid() == START_GID]
        assert [list(line.get_xdata()) for line in starts] == [[0, 0]], title
        assert axes.get_xlim()[0] < 0 <= axes.get_xlim()[1], title


def test_plot_adds_knn_results_and_reads_a_remote_run_in_progress(resumed_run, tmp_path):
    """A run dir on fsspec's memory:// store, with k-NN rows and a half-written last line, plots."""
    import fsspec

    from flsl_cli.viz.plot import KNN_TITLE, draw_run, read_curves

    fs = fsspec.filesystem("memory")
    text = (resumed_run / "metrics.jsonl").read_text()
    text += json.dumps({"step": FINAL, "epoch": 0.4, "knn_bbox_top1_k20": 12.5}) + "\n" + '{"step": 10, "lo'
    fs.pipe("/viz-remote/run/metrics.jsonl", text.encode())
    fs.pipe("/viz-remote/run/run.json", (resumed_run / "run.json").read_bytes())
    figure = draw_run(read_curves("memory://viz-remote/run"))
    knn = [axes for axes in figure.axes if axes.get_title() == KNN_TITLE]
    assert len(knn) == 1
    (line,) = [line for line in knn[0].get_lines() if line.get_label() == "knn_bbox_top1_k20"]
    assert list(line.get_xdata()) == [FINAL] and list(line.get_ydata()) == [12.5]


# --- TensorBoard ----------------------------------------------------------------------------


def test_tensorboard_holds_one_value_per_step_after_a_resume(resumed_run):
    """TensorBoard's reader sees steps 1..9 once each, with metrics.jsonl's values: what the first
    attempt logged for steps 6 and 7 is discarded."""
    pytest.importorskip("tensorboard", reason="needs pip install 'flsl[tensorboard]'")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows = _metrics(resumed_run)
    accumulator = EventAccumulator(str(resumed_run / "tensorboard"))
    accumulator.Reload()
    tags = accumulator.Tags()["scalars"]
    assert {
        "loss/total",
        "loss/intra",
        "loss/inter",
        "loss/volume",
        "schedule/lr",
        "schedule/weight_decay",
        "schedule/teacher_temp",
        "schedule/teacher_momentum",
        "speed/images_per_s",
        "data/samples_seen",
        "data/bad_samples",
    } == set(tags)
    for tag, key in (("loss/total", "loss"), ("schedule/lr", "lr"), ("data/samples_seen", "seen")):
        events = accumulator.Scalars(tag)
        assert [e.step for e in events] == list(range(1, FINAL + 1)), tag
        np.testing.assert_allclose([e.value for e in events], [r[key] for r in rows], rtol=1e-6)
    # The raw files: the resumed attempt's starts with the purge marker at step 6 and logs no step
    # up to the checkpoint it resumed from.
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    first, second = sorted((resumed_run / "tensorboard").glob("events.out.tfevents.*"))
    starts = [
        e.step
        for e in EventFileLoader(str(second)).Load()
        if e.HasField("session_log") and e.session_log.status == e.session_log.START
    ]
    assert starts == [RESUMED_AT + 1]

    def logged(path):
        return sorted({e.step for e in EventFileLoader(str(path)).Load() if e.HasField("summary")})

    assert logged(first) == list(range(1, STOP + 1))
    assert logged(second) == list(range(RESUMED_AT + 1, FINAL + 1))


def test_knn_rows_reach_tensorboard(tmp_path):
    """A k-NN row of metrics.jsonl (its own step, no loss terms) becomes knn/ scalars."""
    pytest.importorskip("tensorboard", reason="needs pip install 'flsl[tensorboard]'")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from flsl_cli.train.tensorboard import TENSORBOARD_DIR, TensorBoardLog

    log = TensorBoardLog(tmp_path, start_step=0)
    log.write({"step": 24, "epoch": 1.0, "knn_bbox_top1_k20": 41.25, "knn_bbox_feature_top1_k20": 30.5})
    log.close()
    accumulator = EventAccumulator(str(tmp_path / TENSORBOARD_DIR))
    accumulator.Reload()
    assert set(accumulator.Tags()["scalars"]) == {"knn/knn_bbox_top1_k20", "knn/knn_bbox_feature_top1_k20"}
    (event,) = accumulator.Scalars("knn/knn_bbox_top1_k20")
    assert (event.step, event.value) == (24, 41.25)


def test_a_recipe_asking_for_tensorboard_without_it_is_refused(monkeypatch):
    """logging.tensorboard: true without the package: a recipe problem naming the pip extra."""
    from flsl_cli.config.load import load_recipe
    from flsl_cli.errors import RecipeError
    from flsl_cli.train import tensorboard

    recipe = load_recipe("recipes/demo.yaml", overrides=["logging.tensorboard=true"])
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(RecipeError) as caught:
        tensorboard.check_tensorboard(recipe, source="demo.yaml")
    assert "logging.tensorboard" in caught.value.problems[0]
    assert "pip install 'flsl[tensorboard]'" in caught.value.problems[0]


# --- bad input ------------------------------------------------------------------------------


def _export_of_another_architecture(folder: Path) -> Path:
    """A timm export (config.json + model.safetensors) of a patch-16 ViT."""
    import timm
    from safetensors.torch import save_file

    folder.mkdir()
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"architecture": "vit_tiny_patch16_224", "model_args": {}}))
    return folder


def test_bad_visualize_input_is_refused_and_writes_nothing(resumed_run, photos, tmp_path):
    """Each bad input: exit 2, one message saying what and how to fix it, nothing in --out."""
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    other = _export_of_another_architecture(tmp_path / "patch16")
    out = tmp_path / "out"
    cases = [
        ((resumed_run, tmp_path / "missing.png"), ["missing.png", "the image does not exist"]),
        ((resumed_run, photos["cat"], broken), ["broken.jpg", "cannot read the image"]),
        ((resumed_run, photos["cat"], "--points", "451,10"), ["the point 451,10 lies outside the image", "451 x 300"]),
        ((resumed_run, photos["cat"], "--points", "3;4"), ["not of the form X,Y"]),
        ((resumed_run, photos["cat"], "--layers", "1,3"), ["layer 3 is beyond the depth", "2 blocks"]),
        ((resumed_run, photos["cat"], "--compare", other), ["patch 16", "patch 8", "same patch size"]),
    ]
    for args, needles in cases:
        code, output = _invoke("visualize", *args, "--out", out, "--size", 64)
        assert code == 2, (args, output)
        assert "Traceback" not in output
        for needle in needles:
            assert needle in output, (needle, output)
        assert not out.exists(), args
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")], args


def test_bad_plot_input_is_refused(resumed_run, tmp_path):
    """A run with no metrics yet, a folder that is not a run: exit 2 and a remedy; no PNG."""
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    shutil.copy(resumed_run / "run.json", fresh / "run.json")
    (fresh / "metrics.jsonl").write_text("")
    for run_dir, needles in (
        (fresh, ["no metrics yet", "flsl status"]),
        (tmp_path / "nowhere", ["does not exist"]),
        (resumed_run / "checkpoints", ["not a flsl run directory"]),
    ):
        code, output = _invoke("plot", run_dir, "--out", tmp_path / "p.png")
        assert code == 2, output
        for needle in needles:
            assert needle in output, (needle, output)
        assert not (tmp_path / "p.png").exists()


def test_missing_matplotlib_names_the_extra(resumed_run, tmp_path, monkeypatch):
    """Without matplotlib: exit 2 and the pip command with the extra's name, brackets intact."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    code, output = _invoke("plot", resumed_run, "--out", tmp_path / "p.png")
    assert code == 2
    assert "pip install 'flsl[viz]'" in output
    assert not (tmp_path / "p.png").exists()


# --- a run dir on S3 ------------------------------------------------------------------------


def test_remote_run_dir_gets_tensorboard_events_and_plots(demo_data, tmp_path):
    """--run-dir s3://... with logging.tensorboard: the event files reach the bucket, and
    `flsl plot s3://...` draws the run from there."""
    pytest.importorskip("s3fs")
    pytest.importorskip("moto")
    pytest.importorskip("tensorboard")
    import os
    import subprocess
    import sys

    import s3fs
    from conftest import REPO
    from servers import S3_ENV, moto_server

    server = moto_server().start()
    try:
        endpoint = f"http://127.0.0.1:{server.port}"
        fs = s3fs.S3FileSystem(key="testing", secret="testing", client_kwargs={"endpoint_url": endpoint})
        fs.mkdir("runs")
        env = {
            **os.environ,
            **S3_ENV,
            "AWS_ENDPOINT_URL": endpoint,
            "FSSPEC_S3_ENDPOINT_URL": endpoint,
            "COLUMNS": "200",
        }
        common = tiny_overrides(
            demo_data / "train", data__num_workers=0, logging__tensorboard="true", optim__max_steps=3
        )

        def flsl(*args):
            return subprocess.run(
                [sys.executable, "-m", "flsl_cli", *map(str, args)],
                cwd=REPO,
                env=env,
                capture_output=True,
                text=True,
                timeout=600,
            )

        done = flsl("pretrain", "recipes/demo.yaml", *common, "--run-dir", "s3://runs/tb")
        assert done.returncode == 0, done.stderr
        fs.invalidate_cache()
        events = [p for p in fs.ls("runs/tb/tensorboard") if "tfevents" in p]
        assert len(events) == 1 and fs.size(events[0]) > 0
        plotted = flsl("plot", "s3://runs/tb", "--out", tmp_path / "remote.png")
        assert plotted.returncode == 0, plotted.stderr
        assert _png_size(tmp_path / "remote.png")[0] > 1000
    finally:
        server.kill()
