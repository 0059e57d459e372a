"""docs/ARCHITECTURE.md names real files and functions: every path, every ``file.py: Name`` and
every ``Class.method`` it cites exists in the source (checked on the syntax tree, no imports)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.conftest import REPO

DOC = REPO / "docs" / "ARCHITECTURE.md"
PACKAGES = ("engine", "trainer", "planner_gui")


def _names(path: Path) -> dict[str, set[str]]:
    """Top-level names of a module -> their member names (methods, class attributes)."""
    out: dict[str, set[str]] = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out[node.name] = set()
        elif isinstance(node, ast.ClassDef):
            members = set()
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    members.add(item.name)
                elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    members.add(item.target.id)
            out[node.name] = members
        elif isinstance(node, ast.Assign):
            out.update({t.id: set() for t in node.targets if isinstance(t, ast.Name)})
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out[node.target.id] = set()
    return out


def _exists(names: dict[str, set[str]], dotted: str) -> bool:
    head, _, member = dotted.partition(".")
    return head in names and (not member or member in names[head])


def unresolved(doc: str, root: Path) -> list[str]:
    """The citations of ``doc`` that do not exist under ``root``."""
    all_names: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in (root / package).rglob("*.py"):
            for name, members in _names(path).items():
                all_names.setdefault(name, set()).update(members)
    missing = []
    for token in re.findall(r"`([^`]+)`", doc):
        cited = re.match(r"^([\w/.]+\.py): (\w+(?:\.\w+)?)", token)
        if cited:
            path = root / cited[1]
            if not path.is_file() or not _exists(_names(path), cited[2]):
                missing.append(token)
        elif re.fullmatch(r"[\w.]+/[\w./]*", token):
            if not (root / token).exists():
                missing.append(token)
        elif re.match(r"^[A-Z]\w*\.\w+\b", token) and "/" not in token:
            if not _exists(all_names, re.match(r"^([A-Z]\w*\.\w+)", token)[1]):
                missing.append(token)
    return missing


def test_every_cited_file_and_function_exists():
    assert unresolved(DOC.read_text(), REPO) == []


def test_a_stale_citation_is_caught(tmp_path):
    (tmp_path / "engine").mkdir()
    (tmp_path / "engine" / "runtime.py").write_text("class DoseEngine:\n    def _run(self): ...\n")
    doc = ("`engine/runtime.py: DoseEngine._run` `engine/runtime.py: DoseEngine._gone` "
           "`engine/missing.py` `DoseEngine._run(...)` `Session.set_gantry`")
    assert unresolved(doc, tmp_path) == ["engine/runtime.py: DoseEngine._gone",
                                         "engine/missing.py", "Session.set_gantry"]
