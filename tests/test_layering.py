"""The package layering of DESIGN §1, enforced on the source (docs/ARCHITECTURE.md):

* ``planner_gui -> engine`` and ``trainer -> engine`` only: ``engine`` imports neither of them
  nor Qt/VTK, and the GUI and the trainer do not import each other (the GUI starts training as a
  separate process through the trainer's CLI);
* no import cycle among the project's modules, counting imports inside functions too (a lazy
  import is how a cycle hides);
* the only name-based (``importlib``) lookups in ``engine`` are the ones listed here.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

PACKAGES = ("engine", "trainer", "planner_gui")
GUI_LIBRARIES = ("PySide6", "qtpy", "qasync", "vtk", "vtkmodules", "pyvista", "pyvistaqt",
                 "pyqtgraph")
#: engine modules allowed to look modules up by name, and why
DYNAMIC_LOOKUPS = {
    "engine.cli": "COMMAND_MODULES: the trainer's and the GUI's subcommands, skipped when absent",
    "engine.models.checkpoint": "ARCHITECTURES: a bundle's component kind -> its engine.models "
                                "class, imported when a bundle of that kind is loaded",
}


def project_modules(root: Path) -> dict[str, Path]:
    """Module name -> file for every ``.py`` file of the project's packages under ``root``."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def imported_names(module: str, path: Path) -> set[str]:
    """Every module name ``module`` imports anywhere in its file (``from a import b`` gives
    both ``a`` and ``a.b``; relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def import_graph(root: Path) -> dict[str, set[str]]:
    """Project module -> the project modules it imports."""
    modules = project_modules(root)
    return {m: {n for n in imported_names(m, p) if n in modules and n != m}
            for m, p in modules.items()}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def layering_violations(root: Path) -> list[str]:
    """Imports that break the one-way layering, as ``module -> imported`` lines."""
    forbidden = {"engine": ("planner_gui", "trainer", *GUI_LIBRARIES),
                 "trainer": ("planner_gui", *GUI_LIBRARIES),
                 "planner_gui": ("trainer",)}
    out = []
    for module, path in project_modules(root).items():
        banned = forbidden[module.split(".")[0]]
        for name in sorted(imported_names(module, path)):
            if name.split(".")[0] in banned:
                out.append(f"{module} -> {name}")
    return out


def dynamic_lookups(root: Path) -> set[str]:
    """``engine`` modules that call ``importlib.import_module`` or ``__import__``."""
    found = set()
    for module, path in project_modules(root).items():
        if not module.startswith("engine"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and (
                    (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                    or (isinstance(node.func, ast.Name) and node.func.id == "__import__")):
                found.add(module)
    return found


def test_no_import_cycle_among_project_modules():
    assert import_cycles(import_graph(REPO)) == []


def test_dependencies_run_one_way():
    assert layering_violations(REPO) == []


def test_name_based_lookups_in_engine_are_the_listed_ones():
    assert dynamic_lookups(REPO) == set(DYNAMIC_LOOKUPS)


def test_engine_top_level_holds_no_physics_module():
    """The physics reference is one subject: its modules live in ``engine/physics/``."""
    assert sorted(p.name for p in (REPO / "engine").glob("physics*.py")) == []


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_checker_finds_a_lazy_cycle_and_a_forbidden_import(tmp_path):
    """The checks above are only worth something if they fail on a bad tree."""
    _write(tmp_path, {
        "engine/__init__.py": "",
        "engine/io/__init__.py": "",
        "engine/io/reader.py": "def read():\n    from engine.gen import plan\n    return plan\n",
        "engine/gen.py": "from engine.io.reader import read\nplan = 1\n",
        "engine/view.py": "from . import gen\nimport PySide6.QtCore\n",
        "trainer/__init__.py": "",
        "planner_gui/__init__.py": "",
        "planner_gui/app.py": "import importlib\nfrom trainer import loop\n",
    })
    assert import_cycles(import_graph(tmp_path)) == [["engine.gen", "engine.io.reader"]]
    assert layering_violations(tmp_path) == ["engine.view -> PySide6.QtCore",
                                             "planner_gui.app -> trainer",
                                             "planner_gui.app -> trainer.loop"]
    assert import_graph(tmp_path)["engine.view"] == {"engine", "engine.gen"}
