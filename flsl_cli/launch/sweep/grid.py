"""A sweep's grid: `--grid KEY=V1,V2,...` (every combination), `--list KEY=V1,V2,...` (values
that move together), or a small YAML file of the same, read into the members of the sweep,
each a set of recipe values; then every member checked against the schema, which types its
values (`optim.base_lr=1e-3` is the float 0.001, `model.arch=vit_small` a string).

    spec = read_grid(grid=["optim.base_lr=1e-3,5e-4"], lists=[], from_file=None)
    members = spec.members()            # [{"optim.base_lr": "1e-3"}, {"optim.base_lr": "5e-4"}]

The file holds the same two kinds of keys:

    grid:
      optim.base_lr: [1.0e-3, 5.0e-4]
    list:
      loss.upsilon: [0.03, 0.1]
      loss.gamma: [5.0, 1.0]

A value is written as `--set` takes it (YAML: `[0.05, 0.4]`, `null`, `'a,b'`); commas inside
brackets or quotes do not split values. Nothing here imports torch.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from flsl_cli.config.load import YamlProblems, apply_overrides, parse_yaml, recipe_to_dict, validate_recipe
from flsl_cli.config.schema import Recipe
from flsl_cli.errors import FlslError, RecipeError


class SweepError(FlslError):
    """A sweep's grid, its sweep dir or its record is not usable."""


GRID_FIX = (
    "Write each swept key once, as --grid KEY=V1,V2,... (every combination) or --list KEY=V1,V2,... "
    "(values that move together), with at least one value; `flsl recipe show RECIPE` lists the keys"
)


@dataclass(frozen=True)
class GridSpec:
    """The swept keys: `grid` combine in every way (the first key varies slowest), `together`
    move in step (all of the same length) and combine with the grid as one more key."""

    grid: dict[str, list[Any]] = field(default_factory=dict)
    together: dict[str, list[Any]] = field(default_factory=dict)

    @property
    def keys(self) -> list[str]:
        return [*self.grid, *self.together]

    def members(self) -> list[dict[str, Any]]:
        """Every member's values, {dotted key: value}, in a fixed order."""
        axes: list[list[dict[str, Any]]] = [[{key: value} for value in values] for key, values in self.grid.items()]
        if self.together:
            length = len(next(iter(self.together.values())))
            axes.append([{key: values[i] for key, values in self.together.items()} for i in range(length)])
        return [{k: v for part in combination for k, v in part.items()} for combination in itertools.product(*axes)]

    def size(self) -> int:
        count = 1
        for values in self.grid.values():
            count *= len(values)
        if self.together:
            count *= len(next(iter(self.together.values())))
        return count


def split_values(text: str) -> list[str]:
    """`1e-3,5e-4` -> ["1e-3", "5e-4"]; commas inside [], {} or quotes stay in their value."""
    values: list[str] = []
    current: list[str] = []
    depth, quote = 0, ""
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            values.append("".join(current).strip())
            current = []
            continue
        current.append(char)
    values.append("".join(current).strip())
    return values


def _parse_value(raw: str) -> Any:
    """One value, read as `--set` reads it (YAML), so that types follow the schema."""
    try:
        return parse_yaml(raw) if raw else ""
    except (YamlProblems, yaml.YAMLError):
        return raw


def read_grid(*, grid: list[str], lists: list[str], from_file: Path | None) -> GridSpec:
    """The swept keys from the command line's options and the grid file; every problem at once."""
    problems: list[str] = []
    found: dict[str, dict[str, list[Any]]] = {"grid": {}, "list": {}}
    where: dict[str, str] = {}

    def add(kind: str, key: str, values: list[Any], origin: str) -> None:
        if not key or not all(key.split(".")):
            problems.append(
                f"{origin}: expected KEY=V1,V2,... with a dotted KEY, e.g. --{kind} optim.base_lr=1e-3,5e-4"
            )
            return
        if key in where:
            problems.append(f"{origin}: {key} is swept twice (also by {where[key]}); give its values once")
            return
        if not values or values == [""]:
            problems.append(f"{origin}: no values for {key}; give at least one, e.g. --{kind} {key}=A,B")
            return
        seen: list[str] = []
        for value in values:
            shown = json.dumps(value, sort_keys=True)
            if shown in seen and kind == "grid":
                problems.append(f"{origin}: {key} lists the value {value!r} twice: two members would be the same run")
                return
            seen.append(shown)
        where[key] = origin
        found[kind][key] = values

    for kind, items in (("grid", grid), ("list", lists)):
        for item in items:
            key, sep, raw = item.partition("=")
            key = key.strip()
            origin = f"--{kind} {item}"
            if not sep:
                problems.append(f"{origin}: expected KEY=V1,V2,..., e.g. --{kind} optim.base_lr=1e-3,5e-4")
                continue
            add(kind, key, [_parse_value(v) for v in split_values(raw)] if raw.strip() else [], origin)
    if from_file is not None:
        for kind, key, values in _read_grid_file(from_file, problems):
            add(kind, key, values, f"{from_file}: {kind}: {key}")
    lengths = {key: len(values) for key, values in found["list"].items()}
    if len(set(lengths.values())) > 1:
        shown = ", ".join(f"{key} has {n}" for key, n in lengths.items())
        problems.append(f"the --list keys move together, so they need as many values each: {shown}")
    if not problems and not found["grid"] and not found["list"]:
        problems.append("the grid is empty: no key to sweep")
    if problems:
        raise SweepError("; ".join(problems), fix=GRID_FIX)
    return GridSpec(grid=found["grid"], together=found["list"])


def _read_grid_file(path: Path, problems: list[str]) -> list[tuple[str, str, list[Any]]]:
    try:
        data = parse_yaml(Path(path).read_text())
    except OSError as exc:
        problems.append(f"{path}: cannot read the grid file ({exc.strerror or exc})")
        return []
    except YamlProblems as exc:
        problems.extend(exc.problems(prefix=f"{path}: "))
        return []
    except yaml.YAMLError as exc:
        problems.append(f"{path}: not valid YAML ({str(exc).splitlines()[0]})")
        return []
    if not isinstance(data, dict) or not set(data) <= {"grid", "list"}:
        problems.append(f"{path}: expected a mapping with `grid:` and/or `list:`, each of KEY: [V1, V2, ...]")
        return []
    entries = []
    for kind, section in data.items():
        if not isinstance(section, dict):
            problems.append(f"{path}: {kind}: expected KEY: [V1, V2, ...] entries, found {section!r}")
            continue
        for key, values in section.items():
            entries.append((kind, str(key), list(values) if isinstance(values, list) else [values]))
    return entries


def refuse_set_of_swept_keys(spec: GridSpec, overrides: list[str]) -> None:
    """A key both swept and given with --set: which value would win is not clear, so neither does."""
    problems = []
    for item in overrides:
        key = item.partition("=")[0].strip()
        for swept in spec.keys:
            if key == swept or swept.startswith(key + ".") or key.startswith(swept + "."):
                problems.append(f"--set {item}: {swept} is swept by the grid")
    if problems:
        raise SweepError("; ".join(problems), fix="Drop the --set of a swept key, or drop the key from the grid")


def member_overrides(values: dict[str, Any]) -> list[str]:
    """A member's values as `--set` items (JSON is YAML: the value reads back as it was)."""
    return [f"{key}={json.dumps(value)}" for key, value in values.items()]


def dotted(data: dict[str, Any], key: str) -> Any:
    """The value at a dotted key of a resolved recipe dict."""
    node: Any = data
    for part in key.split("."):
        node = node[part]
    return node


@dataclass(frozen=True)
class CheckedMember:
    """One member after the schema check: its name, its typed values and its recipe."""

    name: str
    values: dict[str, Any]
    recipe: Recipe


def check_members(base: dict[str, Any], *, spec: GridSpec, overrides: list[str], source: str) -> list[CheckedMember]:
    """Every member's recipe (`base` with `overrides`, then its values) validated; its values
    typed by the schema. Every problem of every member at once: one that every member has is
    said once, one of some members names them."""
    members = spec.members()
    names = member_names(members)
    checked: list[CheckedMember] = []
    problems: dict[str, list[str]] = {}
    for name, values in zip(names, members):
        try:
            data = apply_overrides(base, overrides + member_overrides(values), source=source)
            recipe = validate_recipe(data, source=source)
        except RecipeError as exc:
            for problem in exc.problems:
                problems.setdefault(problem, []).append(name)
            continue
        resolved = recipe_to_dict(recipe)
        checked.append(CheckedMember(name=name, values={k: dotted(resolved, k) for k in values}, recipe=recipe))
    if problems:
        raise RecipeError(
            [
                problem if len(who) == len(members) else f"member {', '.join(who)}: {problem}"
                for problem, who in problems.items()
            ],
            source=source,
        )
    return checked


def typed_spec(spec: GridSpec, members: list[CheckedMember]) -> GridSpec:
    """The grid with its values as the schema typed them in the members (`1e-3` -> 0.001)."""

    def column(key: str) -> list[Any]:
        seen: dict[str, Any] = {}
        for member in members:
            seen.setdefault(json.dumps(member.values[key], sort_keys=True), member.values[key])
        return list(seen.values())

    # the --list values are the product's last axis, which varies fastest: the first members take them in turn
    length = len(next(iter(spec.together.values()), []))
    together = {key: [m.values[key] for m in members[:length]] for key in spec.together}
    return GridSpec(grid={key: column(key) for key in spec.grid}, together=together)


def member_names(members: list[dict[str, Any]]) -> list[str]:
    """`03-base_lr=0.0005-arch=vit_small`: the index, then each value under its key's last part
    (the whole key where two swept keys end alike); safe as a directory name."""
    keys = list(members[0]) if members else []
    ends = [key.rsplit(".", 1)[-1] for key in keys]
    shown = {key: (end if ends.count(end) == 1 else key) for key, end in zip(keys, ends)}
    width = len(str(len(members) - 1))
    names = []
    for index, values in enumerate(members):
        parts = [f"{shown[key]}={_short(value)}" for key, value in values.items()]
        name = re.sub(r"[^A-Za-z0-9._=+-]+", "_", "-".join(parts))[:80]
        names.append(f"{index:0{width}d}-{name}" if name else f"{index:0{width}d}")
    return names


def _short(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
