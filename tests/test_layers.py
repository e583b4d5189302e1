"""The layer contract of the package (issue 22): each top-level unit of megatron_inpo/ belongs to one layer, and no
module imports a unit of a higher layer, function-local imports included (they hid the cycles that the review
found). Units of one layer may import each other.

    entry        __main__
    commands     cli
    driver       driver
    services     rollout, judge, serving, engine, convert, task, evaluate, nash_meter
    foundations  objectives, data, config, identity, files, events, nash, errors, the package itself

Read from the source with `ast`, so the check imports nothing and sees imports inside functions and under `if`.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "megatron_inpo"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE
LAYERS = (
    ("entry", {"__main__"}),
    ("commands", {"cli"}),
    ("driver", {"driver"}),
    ("services", {"rollout", "judge", "serving", "engine", "convert", "task", "evaluate", "nash_meter"}),
    ("foundations", {"objectives", "data", "config", "identity", "files", "events", "nash", "errors", "__init__"}),
)
RANK = {unit: rank for rank, (_, units) in enumerate(LAYERS) for unit in units}
"""unit -> its layer's index; a lower index is a higher layer."""


def _unit(path: Path, root: Path) -> str:
    """The top-level unit of a module: its package directory or its module name."""
    return path.relative_to(root).parts[0].removesuffix(".py")


def _imported_units(tree: ast.AST, package: str) -> list[tuple[str, int]]:
    """(unit, line) of every import of `package` in the tree, wherever it stands."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == package:  # `from megatron_inpo import cli` or `import __version__`
                out += [(a.name if a.name in RANK else "__init__", node.lineno) for a in node.names]
            elif node.module.startswith(package + "."):
                out.append((node.module.split(".")[1], node.lineno))
        elif isinstance(node, ast.Import):
            out += [(a.name.split(".")[1], node.lineno) for a in node.names if a.name.startswith(package + ".")]
    return out


def violations(root: Path, package: str = PACKAGE) -> list[str]:
    """'file:line: unit (layer) imports unit (layer)' for each import of a higher layer, and each unit that has no
    layer."""
    out = []
    for path in sorted(root.rglob("*.py")):
        unit = _unit(path, root)
        if unit not in RANK:
            out.append(f"{path}: unit {unit!r} has no layer in tests/test_layers.py")
            continue
        for target, line in _imported_units(ast.parse(path.read_text(encoding="utf-8")), package):
            if target not in RANK:
                out.append(f"{path}:{line}: imports {target!r}, which has no layer")
            elif RANK[target] < RANK[unit]:
                out.append(f"{path}:{line}: {unit} ({LAYERS[RANK[unit]][0]}) imports {target} "
                           f"({LAYERS[RANK[target]][0]})")
    return out


def test_no_module_imports_a_higher_layer():
    assert violations(ROOT) == []


@pytest.mark.parametrize("where, source", [
    ("engine/checkpoint.py", "def save():\n    from megatron_inpo.cli.loader import one_line\n"),  # inside a function
    ("rollout/pipeline.py", "import megatron_inpo.driver.manifest\n"),
    ("files.py", "from megatron_inpo import engine\n"),
    ("data/prompts.py", "if True:\n    from megatron_inpo.task import synthetic\n"),
])
def test_an_upward_import_is_caught(tmp_path, where, source):
    """The contract fails when a lower layer imports an upper one: the checker on a copy of the tree with one such
    import added (the kinds the review found: a function-local import, a plain import, `from package import`)."""
    import shutil

    tree = tmp_path / PACKAGE
    shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns("__pycache__"))
    with open(tree / where, "a", encoding="utf-8") as f:
        f.write("\n\n" + source)
    found = violations(tree)
    assert len(found) == 1 and found[0].startswith(f"{tree / where}:"), found


def test_every_unit_has_a_layer(tmp_path):
    import shutil

    tree = tmp_path / PACKAGE
    shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns("__pycache__"))
    (tree / "planner.py").write_text("x = 1\n")
    assert violations(tree) == [f"{tree / 'planner.py'}: unit 'planner' has no layer in tests/test_layers.py"]


def test_no_product_signature_takes_a_test_hook():
    """Fault injection listens on megatron_inpo/events.py from the tests (tests/helpers/faults.py): no function of
    the package takes a `fault` (or `hold`) argument, and nothing in it imports the tests."""
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                names = {x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs)}
                found += [f"{path}:{node.lineno}: {node.name}({n})" for n in names & {"fault", "hold"}]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "tests":
                found.append(f"{path}:{node.lineno}: imports {node.module}")
    assert found == []


def test_no_function_is_longer_than_80_lines():
    """Long functions mixed concerns (validation, shard mapping and file layout in one converter function): each
    is split into pieces that can be read and tested alone."""
    long = []
    for path in sorted(ROOT.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 80:
                    long.append(f"{path}:{node.lineno}: {node.name} has {n} lines")
    assert long == []
