"""Pictures of a DAVIS evaluation (`flsl eval davis --out DIR --draw`): one PNG per sequence,
the first frame with its annotation and a few propagated frames spread over the sequence (top
row: the prediction; bottom row: the annotation), masks blended over the frames in the DAVIS
palette with each object outlined. Drawn with PIL alone, from the predicted PNGs and the DAVIS folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from flsl_cli.config.schema import DavisEvalConfig
from flsl_cli.eval.davis.frames import read_image
from flsl_cli.eval.davis.layout import Sequence, read_layout

PANEL_WIDTH = 320
COLUMNS = 5  # the first frame and four propagated ones
ALPHA = 0.55
LABEL_PX = 16


def draw_sequences(settings: DavisEvalConfig, *, predictions: Path, out: Path, names: list[str]) -> list[Path]:
    """One picture per sequence named in `names`, from the PNGs in `predictions`/SEQ/; returns
    the files written into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    sequences = {s.name: s for s in read_layout(settings.davis, split=settings.split, sequences=names)}
    return [
        draw_sequence(sequences[name], predictions=Path(predictions, name), path=out / f"{name}.png") for name in names
    ]


def draw_sequence(sequence: Sequence, *, predictions: Path, path: Path) -> Path:
    count = len(sequence.frames)
    picks = sorted({round(i * (count - 1) / (COLUMNS - 1)) for i in range(COLUMNS)})
    top, bottom = [], []
    for index in picks:
        frame = read_image(sequence.frames[index]).convert("RGB")
        truth = read_image(sequence.masks[index])
        predicted = Image.open(predictions / sequence.frame_name(index))
        palette = np.array(
            (truth.getpalette() or predicted.getpalette() or [0] * 768)[:768] + [0] * 768, dtype=np.uint8
        )[:768].reshape(256, 3)
        what = "first frame (given)" if index == 0 else f"frame {index}: propagated"
        top.append(_panel(frame, np.asarray(predicted), palette, label=what))
        bottom.append(_panel(frame, np.asarray(truth), palette, label=f"frame {index}: annotation"))
    width, height = top[0].size
    sheet = Image.new("RGB", (width * len(picks), height * 2), "white")
    for column, (upper, lower) in enumerate(zip(top, bottom)):
        sheet.paste(upper, (column * width, 0))
        sheet.paste(lower, (column * width, height))
    sheet.save(path, format="PNG")
    return path


def _panel(frame: Image.Image, ids_hw: np.ndarray, palette: np.ndarray, *, label: str) -> Image.Image:
    pixels = np.asarray(frame, dtype=np.float32)
    ids = np.where(ids_hw == 255, 0, ids_hw).astype(np.int64)
    colours = palette[ids].astype(np.float32)
    blended = np.where((ids > 0)[..., None], (1 - ALPHA) * pixels + ALPHA * colours, pixels)
    edges = np.zeros(ids.shape, bool)  # each object's outline in its full colour
    edges[:, 1:] |= ids[:, 1:] != ids[:, :-1]
    edges[1:, :] |= ids[1:, :] != ids[:-1, :]
    outline = edges & (ids > 0)
    blended[outline] = colours[outline]
    image = Image.fromarray(blended.clip(0, 255).astype(np.uint8))
    height = round(PANEL_WIDTH * image.height / image.width)
    image = image.resize((PANEL_WIDTH, height), Image.Resampling.BILINEAR)
    panel = Image.new("RGB", (PANEL_WIDTH, height + LABEL_PX), "white")
    panel.paste(image, (0, LABEL_PX))
    ImageDraw.Draw(panel).text((4, 2), label, fill="black")
    return panel
