"""The layout's promises: no module-level import cycle in hftl/, and no code outside the task package asking a
task whether it has a hook (every hook exists on `hftl.tasks.base.Task`)."""

import ast
import re
from pathlib import Path

import hftl

PACKAGE = Path(hftl.__file__).resolve().parent


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ["hftl", *path.relative_to(PACKAGE).with_suffix("").parts]
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(path: Path, modules: dict) -> set[str]:
    """hftl modules imported at module level (function-level imports are deliberate and lazy)."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "hftl":
            names |= {
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module for a in node.names
            }
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.split(".")[0] == "hftl"}
    return {n for n in names if n in modules}


def test_no_module_level_import_cycle():
    modules = _modules()
    graph = {name: _imports(path, modules) for name, path in modules.items()}
    state, cycles = {}, []

    def visit(name, stack):
        state[name] = "open"
        for dep in graph[name]:
            if state.get(dep) == "open" and not name.startswith(dep + "."):  # a submodule may import its package
                cycles.append(" -> ".join([*stack[stack.index(dep) :], name, dep]))
            elif dep not in state:
                visit(dep, [*stack, name])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
    assert not cycles, cycles
    assert graph["hftl.system"] == set()  # the low module everyone may import imports nothing from hftl
    assert "hftl.trainer" not in graph["hftl.fastpaths.decoded_images"]


def test_no_hook_probing_outside_the_task_package():
    probe = re.compile(r"\b(hasattr|getattr)\(task\b")
    offenders = [
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if "tasks" not in path.relative_to(PACKAGE).parts and probe.search(path.read_text())
    ]
    assert not offenders, offenders
