"""The Python versions Slicer ships: 3.9 (Slicer 5.8) and 3.12 (Slicer 5.10 and newer).

``scripts/run_compat.sh`` runs the torch-free test files (``Testing/torchfree.txt``) under
3.9 and 3.12; this file checks the two things that run cannot see from the 3.11 venv:

* the code that only runs with torch (models, samplers, tasks) uses nothing newer than 3.9
  either: an AST scan for ``match``, ``dataclass(kw_only=/slots=)``, ``zip(strict=)`` and
  ``X | Y`` evaluated at run time (``isinstance``/``issubclass``, or annotations in a file
  without ``from __future__ import annotations``);
* the files on the torch-free list really import no torch (collected with torch blocked).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TESTING = ROOT / "Testing"
#: Everything that runs inside Slicer: the library (less the worker server, which is not
#: packaged into the extension) and the module.
SLICER_CODE = [
    p
    for p in sorted((ROOT / "LongitudinalDiffusionLib").rglob("*.py"))
    if "worker" not in p.relative_to(ROOT / "LongitudinalDiffusionLib").parts
] + sorted((ROOT / "LongitudinalDiffusion").rglob("*.py"))


def torchFreeFiles() -> list[Path]:
    lines = (TESTING / "torchfree.txt").read_text(encoding="utf-8").splitlines()
    return [TESTING / line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _isBitOr(node: ast.AST) -> bool:
    return isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr)


def newerThan39(path: Path) -> list[str]:
    """What in ``path`` needs Python 3.10 or newer (one line per finding)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    future = any(
        isinstance(n, ast.ImportFrom) and n.module == "__future__" and any(a.name == "annotations" for a in n.names)
        for n in tree.body
    )
    found = []
    for node in ast.walk(tree):
        where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}"
        if type(node).__name__ == "Match":
            found.append(f"{where}: match statement")
        elif isinstance(node, ast.Call):
            name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
            keywords = {k.arg for k in node.keywords}
            if name == "dataclass" and keywords & {"kw_only", "slots"}:
                found.append(f"{where}: dataclass({', '.join(sorted(keywords & {'kw_only', 'slots'}))}=)")
            if name == "zip" and "strict" in keywords:
                found.append(f"{where}: zip(strict=)")
            if name in ("isinstance", "issubclass") and len(node.args) == 2 and _isBitOr(node.args[1]):
                found.append(f"{where}: {name} with X | Y")
        elif not future and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.AnnAssign)):
            annotations = (
                [node.annotation]
                if isinstance(node, ast.AnnAssign)
                else [a.annotation for a in node.args.args + node.args.kwonlyargs] + [node.returns]
            )
            if any(a is not None and any(_isBitOr(n) for n in ast.walk(a)) for a in annotations):
                found.append(
                    f"{where}: X | Y annotation evaluated at run time (no `from __future__ import annotations`)"
                )
    return found


def test_the_code_that_runs_in_slicer_needs_nothing_newer_than_python_3_9():
    assert len(SLICER_CODE) > 40
    found = [line for path in SLICER_CODE for line in newerThan39(path)]
    assert found == [], "Slicer 5.8 runs Python 3.9:\n" + "\n".join(found)


@pytest.mark.skipif(sys.version_info < (3, 10), reason="Python 3.9 cannot parse the probe's match statement")
def test_the_scan_finds_what_python_3_9_cannot_run():
    bad = ROOT / "Testing" / "_compat_probe_tmp.py"
    source = (
        "from dataclasses import dataclass\n"
        "@dataclass(kw_only=True)\nclass A:\n    x: int\n"
        "def f(a: int | None):\n    return isinstance(a, int | float), list(zip([1], [2], strict=True))\n"
        "match 1:\n    case 1:\n        pass\n"
    )
    bad.write_text(source, encoding="utf-8")
    try:
        found = newerThan39(bad)
    finally:
        bad.unlink()
    kinds = " ".join(found)
    for what in ("kw_only", "zip(strict=)", "isinstance with X | Y", "annotation evaluated", "match statement"):
        assert what in kinds


def test_the_torch_free_list_names_real_test_files_and_the_compat_run_uses_it():
    files = torchFreeFiles()
    assert files and all(p.is_file() and p.name.startswith("test_") for p in files)
    assert Path(__file__) in files
    script = (ROOT / "scripts" / "run_compat.sh").read_text(encoding="utf-8")
    assert "Testing/torchfree.txt" in script and "3.9" in script and "3.12" in script
    assert "run_compat.sh" in (ROOT / "scripts" / "run_tests.sh").read_text(encoding="utf-8")


def test_the_torch_free_files_import_no_torch():
    """Collect the listed files with torch, monai and slicer blocked: none of them may import them."""
    files = [str(p) for p in torchFreeFiles()]
    probe = (
        "import sys\n"
        "for name in ('torch', 'monai', 'slicer', 'vtk'):\n"
        "    sys.modules[name] = None  # any import of them raises ImportError\n"
        "import pytest\n"
        f"sys.exit(pytest.main(['--collect-only', '-q', '-p', 'no:cacheprovider', *{files!r}]))\n"
    )
    env_path = f"{ROOT}:{ROOT / 'LongitudinalDiffusion'}"
    done = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": env_path, "QT_QPA_PLATFORM": "offscreen"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_everything_that_runs_in_slicer_compiles_on_this_python():
    for path in SLICER_CODE:
        compile(path.read_text(encoding="utf-8"), str(path), "exec")
