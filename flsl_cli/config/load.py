"""Loading recipes: YAML file + `--set KEY=VALUE` overrides -> a validated `Recipe`.

All problems are collected and raised together as one `RecipeError`, each naming the dotted
key, what was expected and what was found, and what to write instead (the allowed range and
the default, or "did you mean ...?" for misspelt keys). YAML is read as `yaml.safe_load` reads
it, except that a key written twice in one mapping is refused instead of the last one winning.
"""

from __future__ import annotations

import copy
import difflib
import shlex
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from flsl_cli import storage
from flsl_cli.config.schema import Recipe
from flsl_cli.errors import FlslError, RecipeError

MAX_YAML_VALUES = 100_000  # far above any recipe; stops alias "bombs" before they are expanded


class UniqueKeyLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses a mapping holding the same key twice (PyYAML keeps the
    last one silently), an alias inside its own anchor (a recursive value) and aliases that
    expand to more than MAX_YAML_VALUES values. Keys brought in by a `<<` merge may still be
    overridden."""

    def get_single_data(self) -> Any:
        node = self.get_single_node()
        if node is None:
            return None
        scan = _NodeScan()
        scan.visit(node, path=())
        if scan.duplicates or scan.problems:
            raise YamlProblems(scan.duplicates, other=scan.problems)
        return self.construct_document(node)


class YamlProblems(yaml.YAMLError):
    """Keys given twice: (dotted key, line of the first, line of the second) each; `other`
    holds the problems that are not duplicates (recursive or exploding aliases)."""

    def __init__(self, duplicates: list[tuple[str, int, int]], *, other: tuple[str, ...] | list[str] = ()) -> None:
        self.duplicates = duplicates
        self.other = list(other)
        super().__init__(", ".join(key for key, _, _ in duplicates))

    def problems(self, *, prefix: str = "", lines: bool = True) -> list[str]:
        return [
            f"{prefix}{key}: given twice"
            + (f" (lines {first} and {second})" if lines else "")
            + "; YAML would silently keep the second; delete one of them"
            for key, first, second in self.duplicates
        ] + [f"{prefix}{p}" for p in self.other]


class _NodeScan:
    """One walk over the composed YAML nodes, before any Python object is built."""

    def __init__(self) -> None:
        self.duplicates: list[tuple[str, int, int]] = []
        self.problems: list[str] = []
        self.sizes: dict[int, int] = {}  # expanded size of each node already walked (aliases share nodes)
        self.open: set[int] = set()  # nodes on the current path

    def visit(self, node: yaml.Node, *, path: tuple[str, ...]) -> int:
        if id(node) in self.open:
            self.problems.append(
                f"{'.'.join(path) or '(top level)'}: a YAML alias (line {node.start_mark.line + 1}) "
                "refers to a value that contains it, which never ends; write the value out"
            )
            return 1
        if id(node) in self.sizes:
            return self.sizes[id(node)]
        self.open.add(id(node))
        size = 1
        if isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                size += self.visit(item, path=path + (str(index),))
        elif isinstance(node, yaml.MappingNode):
            first_line: dict[str, int] = {}
            for key_node, value_node in node.value:
                key = key_node.value if isinstance(key_node, yaml.ScalarNode) else "?"
                if key_node.tag != "tag:yaml.org,2002:merge" and isinstance(key_node, yaml.ScalarNode):
                    line = key_node.start_mark.line + 1
                    if key in first_line:
                        self.duplicates.append((".".join(path + (key,)), first_line[key], line))
                    else:
                        first_line[key] = line
                size += self.visit(value_node, path=path + (key,))
        self.open.discard(id(node))
        self.sizes[id(node)] = size
        if size > MAX_YAML_VALUES and not any("through YAML aliases" in p for p in self.problems):
            self.problems.append(
                f"{'.'.join(path) or '(top level)'}: expands to more than {MAX_YAML_VALUES} "
                "values through YAML aliases; write the recipe without them"
            )
        return size


def parse_yaml(text: str) -> Any:
    """`yaml.safe_load`, refusing duplicate keys and runaway aliases (raises YamlProblems, a
    yaml.YAMLError)."""
    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def recheck_command(path: str | Path, overrides: list[str] | None = None, *, devices: int | None = None) -> str:
    """The command that checks the same recipe again."""
    words = ["flsl", "recipe", "validate", str(path)]
    for item in overrides or []:
        words += ["--set", item]
    if devices is not None:
        words += ["--devices", str(devices)]
    return shlex.join(words)


@contextmanager
def recheck_with(path: str | Path, overrides: list[str] | None = None, *, devices: int | None = None) -> Iterator[None]:
    """A RecipeError raised in the block says how to check the recipe again (once fixed)."""
    try:
        yield
    except RecipeError as exc:
        if exc.recheck is None:
            exc.recheck = recheck_command(path, overrides, devices=devices)
        raise


def read_recipe_file(path: str | Path) -> dict[str, Any]:
    """Read a recipe YAML file into a plain dict (no validation yet)."""
    path = Path(path)
    text = storage.read_text_file(
        path,
        what="recipe file",
        missing_fix=(
            "Pass a recipe .yaml file; the shipped recipes are in the recipes/ folder of flsl "
            "(recipes/demo.yaml, recipes/vits16_300ep.yaml, ...)"
        ),
    )
    try:
        data = parse_yaml(text)
    except YamlProblems as exc:
        raise RecipeError(exc.problems(), source=str(path)) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError([f"not valid YAML{where}: {problem}; fix the syntax there"], source=str(path)) from None
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
        if not sep or not key or not all(key.split(".")):
            problems.append(f"--set {item!r}: expected KEY=VALUE with a dotted KEY, e.g. --set optim.epochs=10")
            continue
        try:
            value = parse_yaml(raw) if raw.strip() else ""
        except YamlProblems as exc:
            problems.extend(exc.problems(prefix=f"--set {key}=...: {key}.", lines=False))
            continue
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                problems.append(
                    f"--set {key}: {'.'.join(parts[: depth + 1])} is not a section; "
                    f"set {'.'.join(parts[: depth + 1])} itself, or check the key's spelling"
                )
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
        raise RecipeError(validation_problems(exc), source=source) from None


def validate_options(data: dict[str, Any], *, section: tuple[str, ...], options: dict[str, str], fix: str) -> Any:
    """The recipe section at `section` (e.g. ("slurm",)) validated from `data`, values that
    come from command-line options. Every problem is described as for a recipe, its key named
    by the option (`options`: field -> option, e.g. nodes -> --nodes) where it has one."""
    model = _section_model(section)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        prefix = ".".join(section) + "."
        problems = []
        for problem in validation_problems(exc, section=section):
            key, sep, rest = problem.partition(": ")
            field, _, item = (key[len(prefix) :] if key.startswith(prefix) else "").partition(".")
            option = options.get(field) if sep else None
            problems.append(f"{option}{f'[{item}]' if item else ''}: {rest}" if option else problem)
        raise FlslError("; ".join(problems), fix=fix) from None


def validation_problems(exc: ValidationError, *, section: tuple[str, ...] = ()) -> list[str]:
    """Every problem pydantic found, one line each: the dotted key (under `section`, for a model
    of one recipe section), what is wrong, and what to write instead. The one way a schema
    error becomes a message."""
    errors = [{**err, "loc": section + tuple(err["loc"])} for err in _without_union_tags(exc.errors())]
    return _merge_union_errors([_describe(err) for err in errors])


def _section_model(section: tuple[str, ...]) -> type[BaseModel]:
    model: type[BaseModel] = Recipe
    for part in section:
        annotation = model.model_fields[part].annotation
        model = next(
            c
            for c in (annotation, *getattr(annotation, "__args__", ()))
            if isinstance(c, type) and issubclass(c, BaseModel)
        )
    return model


_UNION_TAGS = {"str", "int", "bool", "float", "none"}


def _without_union_tags(errors: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """pydantic names the member of a union (`str`, `int`, ...) in the location; drop it."""
    return [
        {**err, "loc": tuple(p for p in err["loc"] if not (isinstance(p, str) and (p in _UNION_TAGS or "[" in p)))}
        for err in errors
    ]


def _merge_union_errors(problems: list[str]) -> list[str]:
    """One line per key: 'k: expected a valid string, found 1' and 'k: expected a valid integer,
    found 1' become 'k: expected a valid string or a valid integer, found 1'."""
    merged: dict[tuple[str, str], list[str]] = {}
    for problem in problems:
        key, sep, rest = problem.partition(": expected ")
        expected, found_sep, found = rest.rpartition(", found ")
        if sep and found_sep and ";" not in found:
            merged.setdefault((key, found), []).append(expected)
        else:
            merged.setdefault((problem, ""), [])
    return [
        f"{key}: expected {' or '.join(dict.fromkeys(expected))}, found {found}" if expected else key
        for (key, found), expected in merged.items()
    ]


def load_recipe(path: str | Path, *, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe file."""
    source = str(path)
    with recheck_with(path, overrides):
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
        return f"{key}: required key is missing; add it" + (
            " (the training shards: a directory, a .tar, a brace pattern or an index.json URL)"
            if key == "data.train"
            else ""
        )
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        known = _field_names(loc)
        example = f" ({', '.join(known[:3])}, ...)" if known else ""
        return (
            f"{key}: expected a section of keys{example}, found {found!r}; write it as `{loc[-1]}:` "
            "followed by indented keys"
        )
    message = err["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
        field, sep, rest = message.partition(": ")
        if sep and field in _field_names(loc):
            return f"{'.'.join(loc + [field])}: {rest}"
        return f"{key}: {message}{_remedy(loc)}" if loc else message
    return f"{key}: expected {_expected(message)}, found {found!r}{_remedy(loc)}"


def _remedy(loc: list[str]) -> str:
    """'; use 1 to 10000 (default 300)' for a field with bounds and a default, else what is known."""
    info = _field_info(loc)
    if info is None:
        return ""
    low = high = None
    for rule in info.metadata:
        for name in ("ge", "gt"):
            if getattr(rule, name, None) is not None:
                low = f"{'above ' if name == 'gt' else ''}{_number(getattr(rule, name))}"
        for name in ("le", "lt"):
            if getattr(rule, name, None) is not None:
                high = f"{'below ' if name == 'lt' else ''}{_number(getattr(rule, name))}"
    parts = []
    if low is not None and high is not None:
        parts.append(f"use a value from {low} to {high}")
    elif low is not None:
        parts.append(f"use a value of at least {low}" if not low.startswith("above") else f"use a value {low}")
    elif high is not None:
        parts.append(f"use a value of at most {high}")
    if info.default is not PydanticUndefined and info.default is not None and not isinstance(info.default, BaseModel):
        default = list(info.default) if isinstance(info.default, tuple) else info.default
        parts.append(f"(default {default})" if parts else f"the default is {default}")
    return "; " + " ".join(parts) if parts else ""


def _number(value: float) -> str:
    """1000000 rather than 1e+06: bounds are meant to be copied into a recipe."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _field_info(loc: list[str]) -> FieldInfo | None:
    """The schema field at a dotted location (list indices dropped), or None."""
    model: type[BaseModel] | None = Recipe
    info = None
    for part in loc:
        if part.isdigit():
            continue
        if model is None:
            return None
        info = model.model_fields.get(part)
        if info is None:
            return None
        annotation = info.annotation
        nested = [
            c
            for c in (annotation, *getattr(annotation, "__args__", ()))
            if isinstance(c, type) and issubclass(c, BaseModel)
        ]
        model = nested[0] if nested else None
    return info


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
            return message[len(prefix) :]
    if message.startswith("string should have at least 1 character"):
        return "a non-empty string"
    return message.replace(" should ", " that should ", 1) if " should " in message else message


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
