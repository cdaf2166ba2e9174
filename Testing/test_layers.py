"""The import contract of the library: layers point down only.

Read from the source (AST; nothing is imported), every import counts, at the top of a file or
inside a function: the library never imports the Slicer module, slicer, Qt, VTK or the
training code, never edits ``sys.path``, and its modules import each other without a circle.
The same graph is drawn by scripts/draw_imports.py into docs/images/architecture.png.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIB = ROOT / "LongitudinalDiffusionLib"
_spec = importlib.util.spec_from_file_location("draw_imports", ROOT / "scripts" / "draw_imports.py")
draw_imports = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(draw_imports)

#: what lives above the library (the Slicer application and module, the training code)
FORBIDDEN = {"slicer", "qt", "ctk", "vtk", "PythonQt", "PySide6", "LongitudinalDiffusionSlicer", "training", "bench"}


def test_the_library_imports_nothing_from_the_layers_above_it():
    offenders = sorted(
        f"{module}:{line} imports {name}"
        for module, names in draw_imports.external_imports().items()
        for name, line in names
        if name in FORBIDDEN
    )
    assert offenders == []


def test_the_library_never_edits_sys_path():
    offenders = []
    for path in sorted(LIB.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Attribute)
                and node.attr == "path"
                and isinstance(node.value, ast.Name)
                and node.value.id == "sys"
            ):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []


def test_the_checker_sees_an_upward_import_and_a_circle(tmp_path):
    """The contract can fail: a small package with both faults is caught."""
    lib = tmp_path / "LongitudinalDiffusionLib"
    lib.mkdir()
    (lib / "__init__.py").write_text("")
    (lib / "a.py").write_text("from . import b\n")
    (lib / "b.py").write_text("def f():\n    from .a import g\n    import slicer\n")
    graph = draw_imports.import_graph(lib)
    assert draw_imports.cycles(graph) == [["a", "b"]]
    assert ("slicer", 3) in draw_imports.external_imports(lib)["b"]


def _cycles(inside_worker: bool) -> list[list[str]]:
    found = draw_imports.cycles(draw_imports.import_graph())
    return [c for c in found if all(m.startswith("worker.") for m in c) == inside_worker]


def test_no_import_circle_between_library_modules():
    assert _cycles(inside_worker=False) == []


def test_no_import_circle_inside_the_worker():
    assert _cycles(inside_worker=True) == []


def test_the_rooms_have_layers_and_every_arrow_points_down():
    rooms = draw_imports.room_graph(draw_imports.import_graph())
    depth = draw_imports.layers(rooms)  # raises on a circle between rooms
    upward = [f"{r} -> {t}" for r, targets in rooms.items() for t in targets if depth[t] >= depth[r]]
    assert upward == []
    assert depth["errors"] == 0 and depth["cli"] == max(depth.values())
