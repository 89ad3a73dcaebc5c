"""The package's layers point one way: `cli` -> `launch` -> `train` -> {`eval`, `models`,
`losses`, `data`, ...} -> {`config`, `storage`, `distributed`, `errors`, ...}.

A module may import its own package and anything in a lower layer; inside a layer, a package
may import only the packages listed after it (so siblings never import each other both ways).
Every `flsl_cli` import counts, those inside functions too, so an upward import hidden in a
function (a cycle in waiting) fails as surely as one at the top of a module.
"""

from __future__ import annotations

import ast
import graphlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "flsl_cli"

# Top to bottom. "flsl_cli" is the package's own __init__ (its version); "__main__" runs the CLI.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("__main__", "cli"),
    ("launch", "bench", "viz"),
    ("train",),
    ("export", "eval", "data", "models", "losses"),
    (
        "checkpoint",
        "config",
        "storage",
        "distributed",
        "signals",
        "errors",
        "progress",
        "timestamps",
        "processes",
        "flsl_cli",
    ),
)
RANK = {name: (layer, place) for layer, names in enumerate(LAYERS) for place, name in enumerate(names)}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def imported_modules(module: str, path: Path, known: set[str]) -> set[str]:
    """The flsl_cli modules `module` imports anywhere in its source (module level, functions,
    TYPE_CHECKING blocks); `from pkg import name` counts as pkg.name when that is a module."""
    found: set[str] = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for name in names:
            if name == "flsl_cli" or name.startswith("flsl_cli."):
                while name not in known:  # `import flsl_cli.x.y` of a name that is not a module file
                    name = name.rsplit(".", 1)[0]
                found.add(name)
    found.discard(module)
    return found


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    problems = []
    for module, targets in sorted(graph.items()):
        source = package_of(module)
        for target in sorted(targets):
            imported = package_of(target)
            if imported == source:
                continue
            if source not in RANK or imported not in RANK:
                problems.append(f"{module} -> {target}: package not placed in a layer (add it to LAYERS)")
            elif RANK[imported] <= RANK[source]:
                where = "a higher layer" if RANK[imported][0] < RANK[source][0] else "a package beside it"
                problems.append(f"{module} imports {target}: {imported} is {where} than {source}")
    return problems


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {name: imported_modules(name, path, set(modules)) for name, path in modules.items()}


def test_every_import_points_down():
    """No module imports a package above it or beside it in the wrong direction."""
    assert layer_violations(import_graph()) == []


def test_the_check_fails_on_an_upward_import(tmp_path):
    """The check is able to fail: a planted `from flsl_cli.launch...` in train is reported, as
    is one hidden inside a function of eval."""
    graph = import_graph()
    planted = {
        **graph,
        "flsl_cli.train.loop": graph["flsl_cli.train.loop"] | {"flsl_cli.launch.devices"},
        "flsl_cli.eval.api": graph["flsl_cli.eval.api"] | {"flsl_cli.train.loop"},
    }
    problems = layer_violations(planted)
    assert any(p.startswith("flsl_cli.train.loop imports flsl_cli.launch.devices") for p in problems)
    assert any(p.startswith("flsl_cli.eval.api imports flsl_cli.train.loop") for p in problems)
    hidden = tmp_path / "hidden.py"
    hidden.write_text("def f():\n    from flsl_cli.cli.app import main\n    from .. import launch\n")
    assert imported_modules("flsl_cli.eval.hidden", hidden, set(graph)) == {"flsl_cli.cli.app", "flsl_cli.launch"}


def test_modules_import_in_dependency_order_without_a_cycle():
    """Bottom first, every module imports in a fresh interpreter after the modules it names,
    and importing it loads no flsl_cli module it does not name (no hidden dependency); an
    import cycle, even through function-local imports, has no such order and fails."""
    try:
        order = list(graphlib.TopologicalSorter(import_graph()).static_order())
    except graphlib.CycleError as exc:
        pytest.fail(f"import cycle: {' -> '.join(exc.args[1])}")
    order = [name for name in order if name != "flsl_cli.__main__"]  # importing it runs the CLI
    script = (
        "import importlib, json, sys\n"
        "extra = {}\n"
        "for name in json.loads(sys.argv[1]):\n"
        "    before = {m for m in sys.modules if m.startswith('flsl_cli')}\n"
        "    importlib.import_module(name)\n"
        "    new = {m for m in sys.modules if m.startswith('flsl_cli')} - before - {name}\n"
        "    if new:\n"
        "        extra[name] = sorted(new)\n"
        "print(json.dumps(extra))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, json.dumps(order)], capture_output=True, text=True, cwd=REPO, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    parents = {name.rsplit(".", 1)[0] for name in order}
    extra = {name: [m for m in loaded if m not in parents] for name, loaded in json.loads(result.stdout).items()}
    assert {name: loaded for name, loaded in extra.items() if loaded} == {}
