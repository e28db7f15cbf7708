"""The package's imports follow the stages: no import circle, and no import against the flow.

The allowed arrows are written down once, here: a module may import from its own group and
from the groups its group names. Imports inside functions count as much as those at the top.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pipeline

PACKAGE = Path(pipeline.__file__).parent

# group -> its modules (dotted under pipeline; "store.*": every module of a subpackage)
GROUPS = {
    "base": {"__init__", "errors", "config", "structured", "objects", "aws_profile", "serving"},  # structured: JSON Schema rules only; objects: bucket I/O
    "cost": {"cost.__init__", "cost.tokens", "cost.pricing", "cost.budget"},
    "store": {"store.*"},
    "prepare": {"manifest", "image_file", "images", "fetch", "payload"},
    "request": {"limits", "events", "completion", "client", "sender", "rows", "quality"},
    "engines": {"engines.*"},
    "simulator": {"simulator.*"},
    # what the commands run: a run (runner picks the engine), estimate, report, the CLI
    "commands": {"runner", "cost.estimate", "report", "export.*", "view.*", "cli", "__main__"},
}
# group -> the other groups it may import
ALLOWED = {
    "base": set(),
    "cost": {"base"},
    "store": {"base"},
    "prepare": {"base", "cost"},
    "request": {"base", "cost", "prepare", "store"},
    "engines": {"base", "cost", "prepare", "request", "store"},
    "simulator": {"base", "cost"},  # the config models and the image-token rules, nothing of the client
    "commands": {"base", "cost", "prepare", "request", "store", "engines", "simulator"},
}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        found[".".join(path.relative_to(PACKAGE).with_suffix("").parts)] = path
    return found


def _group(module: str) -> str:
    for group, members in GROUPS.items():
        for member in members:
            if module == member or (member.endswith(".*") and module.startswith(member[:-1])):
                return group
    raise AssertionError(f"pipeline.{module} is in no group of tests/test_layout.py: add it")


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that `module` imports, wherever in the file."""
    package = module.split(".")[:-1]  # a package's __init__ imports relative to the package itself
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - node.level + 1]
            target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            for alias in node.names:
                child = f"{target}.{alias.name}" if target else alias.name
                if child in known:
                    found.add(child)
                elif target in known:
                    found.add(target)
                elif f"{target}.__init__" in known:
                    found.add(f"{target}.__init__")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipeline"):
            raise AssertionError(f"pipeline.{module} imports {node.module} by name: import within the package relatively")
    found.discard(module)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {module: _imports(module, path, set(modules)) for module, path in modules.items()}


def test_every_import_follows_the_allowed_arrows_between_groups() -> None:
    against = [f"pipeline.{module} ({_group(module)}) imports pipeline.{target} ({_group(target)})"
               for module, targets in _graph().items() for target in sorted(targets)
               if _group(target) != _group(module) and _group(target) not in ALLOWED[_group(module)]]
    assert against == []


def _engine(module: str) -> str:
    """engines.ray.stages -> ray, engines.local -> local; the driver and the package's own
    __init__ are what every engine shares."""
    return module.split(".")[1]


def test_no_engine_imports_another() -> None:
    shared = {"driver", "__init__"}
    crossing = [f"{module} imports {target}" for module, targets in _graph().items() if _group(module) == "engines"
                for target in targets if _group(target) == "engines" and _engine(target) not in shared
                and _engine(target) != _engine(module)]
    assert crossing == []


def test_there_is_no_import_circle() -> None:
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    circles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                circles.append(" -> ".join([*path[path.index(target):], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert circles == []


def test_the_rules_catch_an_arrow_against_the_flow(tmp_path: Path) -> None:
    source = "from ..engines.driver import Driver\n"  # the store reaching up into an engine
    path = tmp_path / "parts.py"
    path.write_text(source)
    found = _imports("store.parts", path, set(_modules()))
    assert found == {"engines.driver"} and "engines" not in ALLOWED[_group("store.parts")]
