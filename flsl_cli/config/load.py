"""Loading recipes: YAML file + `--set KEY=VALUE` overrides -> a validated `Recipe`.

All problems are collected and raised together as one `RecipeError`, each naming the dotted
key, what was expected and what was found, with "did you mean ...?" for misspelt keys.
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from flsl_cli.config.schema import Recipe
from flsl_cli.errors import RecipeError


def read_recipe_file(path: str | Path) -> dict[str, Any]:
    """Read a recipe YAML file into a plain dict (no validation yet)."""
    path = Path(path)
    if not path.exists():
        raise RecipeError([f"file not found: {path}"], source=str(path))
    if path.is_dir():
        raise RecipeError([f"{path} is a directory, expected a recipe .yaml file"], source=str(path))
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError([f"cannot read the file: {exc}"], source=str(path)) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError([f"not valid YAML{where}: {problem}"], source=str(path)) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(
            [f"expected a mapping of sections (model:, data:, ...) at the top, found {type(data).__name__}"],
            source=str(path),
        )
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str], *, source: str) -> dict[str, Any]:
    """Apply `KEY=VALUE` strings (VALUE parsed as YAML, so typed like the schema)."""
    data = copy.deepcopy(data)
    problems = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            problems.append(f"--set {item!r}: expected KEY=VALUE, e.g. --set optim.epochs=10")
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                problems.append(f"--set {key}: {'.'.join(parts[: depth + 1])} is not a section")
                break
            node = child
        else:
            node[parts[-1]] = value
    if problems:
        raise RecipeError(problems, source=source)
    return data


def validate_recipe(data: dict[str, Any], *, source: str) -> Recipe:
    """Validate a recipe dict against the schema, reporting every problem at once."""
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError([_describe(err) for err in exc.errors()], source=source) from None


def load_recipe(path: str | Path, *, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe file."""
    source = str(path)
    data = apply_overrides(read_recipe_file(path), overrides or [], source=source)
    return validate_recipe(data, source=source)


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """The fully resolved recipe as plain YAML-able data (tuples become lists)."""
    return recipe.model_dump(mode="json")


def recipe_to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False)


def check_for_world(recipe: Recipe, *, world_size: int, source: str) -> None:
    """Rules that depend on how many processes will train."""
    batch = recipe.optim.global_batch_size
    if batch % world_size:
        raise RecipeError(
            [
                f"optim.global_batch_size: expected a multiple of the number of processes "
                f"({world_size}), found {batch}; use e.g. {max(world_size, batch // world_size * world_size)}"
            ],
            source=source,
        )


def changed_keys(old: dict[str, Any], new: dict[str, Any], *, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two resolved recipe dicts."""
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        dotted = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            keys.extend(changed_keys(a, b, prefix=dotted + "."))
        elif a != b:
            keys.append(dotted)
    return keys


def _describe(err: dict[str, Any]) -> str:
    loc = [str(p) for p in err["loc"]]
    key = ".".join(loc) or "(top level)"
    kind = err["type"]
    found = err.get("input")
    if kind == "extra_forbidden":
        known = _field_names(loc[:-1])
        guesses = _suggest(loc[-1], known)
        hint = f"; did you mean {' or '.join('.'.join(loc[:-1] + [g]) for g in guesses)}?" if guesses else ""
        where = ".".join(loc[:-1]) or "the top level"
        return f"{key}: unknown key{hint} (known keys in {where}: {', '.join(known)})"
    if kind == "missing":
        return f"{key}: required key is missing"
    message = err["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, "):]
        field, sep, rest = message.partition(": ")
        if sep and field in _field_names(loc):
            return f"{'.'.join(loc + [field])}: {rest}"
        return f"{key}: {message}" if loc else message
    return f"{key}: expected {_expected(message)}, found {found!r}"


def _suggest(typed: str, known: list[str]) -> list[str]:
    """Up to two known keys the user probably meant: close spellings, or keys containing it."""
    close = difflib.get_close_matches(typed, known, n=1, cutoff=0.6)
    if close:
        return close
    lowered = typed.lower()
    return [k for k in known if len(lowered) >= 2 and (lowered in k or k in lowered)][:2]


def _expected(message: str) -> str:
    message = message[0].lower() + message[1:]
    for prefix in ("input should be ", "value should be "):
        if message.startswith(prefix):
            return message[len(prefix):]
    return message


def _field_names(loc: list[str]) -> list[str]:
    model: type[BaseModel] = Recipe
    for part in loc:
        field = model.model_fields.get(part)
        if field is None:
            return []
        annotation = field.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        nested = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not nested:
            return []
        model = nested[0]
    return list(model.model_fields)
