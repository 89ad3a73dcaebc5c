"""Reading ImageNet's side files: class names, flat-val labels and bounding boxes.

Formats accepted (every problem is a `DataError` naming the file and line, or file and element):

* class names (`--class-names`): ImageNet's `LOC_synset_mapping.txt`, one `SYNSET NAME` a line
  (`n01440764 tench, Tinca tinca`); blank lines are ignored.
* labels of a flat directory (`--labels`), keyed by the image's file name without extension:
  - `LOC_val_solution.csv` (`ImageId,PredictionString`): the label is the first synset of the
    prediction string;
  - a text file of `FILENAME SYNSET` or `FILENAME LABEL` lines (`ILSVRC2012_val_00000001.JPEG
    n01751748`, or `... 65` with LABEL a 0-based index into the class list); one kind per file.
* boxes (`--boxes`):
  - a directory of PASCAL-VOC XML files (ILSVRC `Annotation/`, flat or one folder per synset),
    matched to images by file name without extension; each `<object>` gives `<name>` (a synset)
    and `<bndbox>` (`xmin ymin xmax ymax`);
  - a `LOC_train_solution.csv` / `LOC_val_solution.csv` file: `ImageId,PredictionString` with
    `SYNSET X0 Y0 X1 Y1` repeated.

Boxes keep the annotation's pixel coordinates as written (ILSVRC: xmin/ymin/xmax/ymax of the
original image).
"""

from __future__ import annotations

import csv
import os
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from flsl_cli import storage
from flsl_cli.errors import DataError

_LOC_HEADER = ("imageid", "predictionstring")


@dataclass(frozen=True, slots=True)
class RawBox:
    """One annotated box before its synset is mapped to a label; `where` names its file/line."""

    synset: str
    bbox: tuple[float, float, float, float]
    where: str


# -- class names ------------------------------------------------------------------------------


def read_class_names(path: Path) -> dict[str, str]:
    """{synset: human-readable name} from a `LOC_synset_mapping.txt`-style file."""
    names: dict[str, str] = {}
    for number, line in _lines(path, what="class-names file"):
        synset, _, name = line.strip().partition(" ")
        name = name.strip()
        if not name:
            raise DataError(
                f"expected 'SYNSET NAME', found {line.strip()!r}",
                where=f"{path}:{number}",
                fix="Give a file like ImageNet's LOC_synset_mapping.txt (`n01440764 tench, Tinca tinca` on each line)",
            )
        if synset in names:
            raise DataError(
                f"synset {synset} is listed twice", where=f"{path}:{number}", fix="Keep one line per synset"
            )
        names[synset] = name
    if not names:
        raise DataError(
            "the class-names file lists no classes",
            where=str(path),
            fix="Give a file like ImageNet's LOC_synset_mapping.txt",
        )
    return names


# -- labels of a flat directory ---------------------------------------------------------------


def read_labels(path: Path) -> dict[str, tuple[str | int, str]]:
    """{image file name without extension: (synset (str) or 0-based label (int), "file:line")}."""
    lines = list(_lines(path, what="labels file"))
    if not lines:
        raise DataError(
            "the labels file is empty",
            where=str(path),
            fix="Give LOC_val_solution.csv or a text file of `FILENAME SYNSET` lines",
        )
    if "," in lines[0][1]:
        return {image_id: (boxes[0].synset, boxes[0].where) for image_id, boxes in _loc_rows(path, lines)}

    labels: dict[str, tuple[str | int, str]] = {}
    kinds: set[type] = set()
    for number, line in lines:
        where = f"{path}:{number}"
        parts = line.split()
        if len(parts) != 2:
            raise DataError(
                f"expected 'FILENAME SYNSET' or 'FILENAME LABEL', found {line.strip()!r}",
                where=where,
                fix="Give LOC_val_solution.csv or a text file with two columns",
            )
        filename, value = parts
        label: str | int = int(value) if value.lstrip("-").isdigit() else value
        kinds.add(type(label))
        if len(kinds) > 1:
            raise DataError(
                f"this line gives a {'number' if isinstance(label, int) else 'synset'}, earlier lines the other kind",
                where=where,
                fix="Use synsets on every line or labels on every line",
            )
        if isinstance(label, int) and label < 0:
            raise DataError(f"label {label} is negative", where=where, fix="Labels are 0-based class indices")
        stem = image_stem(filename)
        if stem in labels:
            raise DataError(f"image {stem} is listed twice", where=where, fix="Keep one line per image")
        labels[stem] = (label, where)
    return labels


# -- boxes ------------------------------------------------------------------------------------


def read_loc_csv(path: Path) -> dict[str, list[RawBox]]:
    """{ImageId: boxes} from a `LOC_*_solution.csv` file."""
    return dict(_loc_rows(path, list(_lines(path, what="box file"))))


def find_voc_files(root: Path) -> dict[str, Path]:
    """{file name without extension: path} of every `.xml` file under `root`, sorted walk."""
    found: dict[str, Path] = {}
    for directory, subdirs, files in os.walk(root, followlinks=True):
        subdirs.sort()
        for name in sorted(files):
            if name.lower().endswith(".xml") and not name.startswith("."):
                stem = name[: -len(".xml")]
                if stem in found:
                    raise DataError(
                        f"two annotation files for image {stem}: {found[stem]} and {Path(directory, name)}",
                        where=str(root),
                        fix="Keep one XML file per image",
                    )
                found[stem] = Path(directory, name)
    return found


def read_voc_xml(path: Path) -> list[RawBox]:
    """The boxes of one PASCAL-VOC annotation file."""
    fix = "Fix or remove the file (ILSVRC annotations hold <object><name>SYNSET</name><bndbox>...)"
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        line, column = err.position
        raise DataError(
            f"malformed XML at line {line}, column {column} ({_parse_reason(err)})", where=f"{path}:{line}", fix=fix
        ) from None
    except OSError as err:
        raise DataError(
            f"cannot read the annotation file ({err.strerror or err})",
            where=str(path),
            fix="Check the file's permissions",
        ) from None
    boxes = []
    for number, obj in enumerate(root.iter("object"), start=1):
        where = f"{path} <object> #{number}"
        synset = (obj.findtext("name") or "").strip()
        if not synset:
            raise DataError("has no <name>", where=where, fix=fix)
        values = []
        for tag in ("xmin", "ymin", "xmax", "ymax"):
            text = obj.findtext(f"bndbox/{tag}")
            if text is None:
                raise DataError(f"has no <bndbox>/<{tag}>", where=where, fix=fix)
            values.append(_number(text, where=f"{where} <{tag}>", fix=fix))
        boxes.append(RawBox(synset, (values[0], values[1], values[2], values[3]), where))
    return boxes


# -- helpers ----------------------------------------------------------------------------------


def image_stem(filename: str) -> str:
    """The name an image is matched by: its base name without the extension."""
    base = filename.replace("\\", "/").rsplit("/", 1)[-1]
    stem, dot, _ = base.rpartition(".")
    return stem if dot else base


def _lines(path: Path, *, what: str) -> list[tuple[int, str]]:
    """(line number, text) of the non-blank lines of a UTF-8 text file."""
    text = storage.read_text_file(path, what=what, error=DataError)
    return [(number, line) for number, line in enumerate(text.splitlines(), start=1) if line.strip()]


def _loc_rows(path: Path, lines: list[tuple[int, str]]) -> Iterable[tuple[str, list[RawBox]]]:
    fix = "Rows are `ImageId,SYNSET X0 Y0 X1 Y1 [SYNSET X0 Y0 X1 Y1 ...]` (ImageNet's LOC_*_solution.csv)"
    seen: set[str] = set()
    for index, (number, line) in enumerate(lines):
        where = f"{path}:{number}"
        try:
            row = next(csv.reader([line]))
        except csv.Error as err:
            raise DataError(f"malformed CSV ({err})", where=where, fix=fix) from None
        if index == 0 and tuple(cell.strip().lower() for cell in row) == _LOC_HEADER:
            continue
        if len(row) != 2 or not row[0].strip():
            raise DataError(f"expected 2 columns (ImageId,PredictionString), found {len(row)}", where=where, fix=fix)
        image_id, tokens = row[0].strip(), row[1].split()
        if not tokens or len(tokens) % 5:
            raise DataError(
                f"the prediction string has {len(tokens)} fields, expected groups of 5 (SYNSET X0 Y0 X1 Y1)",
                where=where,
                fix=fix,
            )
        if image_id in seen:
            raise DataError(f"image {image_id} is listed twice", where=where, fix="Keep one row per image")
        seen.add(image_id)
        boxes = []
        for start in range(0, len(tokens), 5):
            synset = tokens[start]
            coords = [_number(token, where=where, fix=fix) for token in tokens[start + 1 : start + 5]]
            boxes.append(RawBox(synset, (coords[0], coords[1], coords[2], coords[3]), where))
        yield image_id, boxes


def _number(text: str, *, where: str, fix: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise DataError(f"{text.strip()!r} is not a number", where=where, fix=fix) from None
    if value != value or value in (float("inf"), float("-inf")):
        raise DataError(f"{text.strip()!r} is not a finite number", where=where, fix=fix)
    return value


def _parse_reason(err: ET.ParseError) -> str:
    message = str(err)
    return message.split(":", 1)[0] if ":" in message else message
