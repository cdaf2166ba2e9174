"""Everything the extension needs at run time is listed for Slicer's packaging.

Slicer packages only the scripts and resources its CMakeLists name; a forgotten file works
in a source checkout and breaks in every installed copy. These tests compare the lists with
the files on disk, and check the pieces the Extensions Index validates.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _listed(cmake: Path, variable: str) -> set[str]:
    text = cmake.read_text()
    match = re.search(rf"set\({variable}\s+(.*?)\)", text, re.S)
    assert match, f"{cmake}: no set({variable} ...)"
    module = re.search(r"set\(MODULE_NAME\s+(\S+)\)", text)
    items = match.group(1).split()
    if module:
        items = [i.replace("${MODULE_NAME}", module.group(1)) for i in items]
    return set(items)


def test_every_library_file_is_packaged():
    lib = ROOT / "LongitudinalDiffusionLib"
    cmake = lib / "CMakeLists.txt"
    scripts = {p.relative_to(lib).as_posix() for p in lib.rglob("*.py")}
    assert _listed(cmake, "LIB_PYTHON_SCRIPTS") == scripts
    data = {
        p.relative_to(lib).as_posix()
        for p in lib.rglob("*")
        if p.is_file() and p.suffix != ".py" and "__pycache__" not in p.parts and p.name != "CMakeLists.txt"
    }
    assert _listed(cmake, "LIB_PYTHON_RESOURCES") == data


def test_every_module_file_is_packaged():
    mod = ROOT / "LongitudinalDiffusion"
    cmake = mod / "CMakeLists.txt"
    scripts = {p.relative_to(mod).as_posix() for p in mod.rglob("*.py")}
    assert _listed(cmake, "MODULE_PYTHON_SCRIPTS") == scripts
    resources = {p.relative_to(mod).as_posix() for p in (mod / "Resources").rglob("*") if p.is_file()}
    assert _listed(cmake, "MODULE_PYTHON_RESOURCES") == resources


def test_every_bundled_model_is_packaged():
    models = ROOT / "Resources" / "Models"
    bundled = {p.name for p in models.iterdir() if p.suffix in (".json", ".safetensors")}
    assert _listed(ROOT / "CMakeLists.txt", "BUNDLED_MODELS") == bundled
    cards = [p for p in models.glob("*.json")]
    for card in cards:
        assert (models / f"{card.stem}.safetensors").is_file(), card
    total = sum((models / name).stat().st_size for name in bundled)
    assert total < 30e6, f"bundled models take {total / 1e6:.1f} MB"


def test_extension_metadata():
    top = (ROOT / "CMakeLists.txt").read_text()
    assert re.search(r"^project\(LongitudinalDiffusion\)", top, re.M)
    for sub in ("LongitudinalDiffusionLib", "LongitudinalDiffusion"):
        assert f"add_subdirectory({sub})" in top
    assert 'set(EXTENSION_DEPENDS "PyTorch")' in top
    assert (ROOT / "LICENSE").is_file()
    icon = re.search(r'EXTENSION_ICONURL "[^"]*/main/(\S+)"', top).group(1)
    assert (ROOT / icon).is_file(), icon
    shot = re.search(r'EXTENSION_SCREENSHOTURLS "[^"]*/main/(\S+)"', top).group(1)
    assert (ROOT / shot).is_file(), shot


def test_library_never_imports_slicer_qt_or_vtk():
    bad = re.compile(r"^\s*(import|from)\s+(slicer|qt|ctk|vtk|vtkmodules)\b", re.M)
    offenders = [p.name for p in (ROOT / "LongitudinalDiffusionLib").rglob("*.py") if bad.search(p.read_text())]
    assert offenders == []


def test_loaders_and_simulator_do_not_need_torch():
    """Subjects load and the cohort simulates before torch is installed (e.g. in a fresh Slicer)."""
    import subprocess
    import sys

    code = (
        "import sys; import LongitudinalDiffusionLib.cli, LongitudinalDiffusionLib.subject, "
        "LongitudinalDiffusionLib.demo.cohort, LongitudinalDiffusionLib.figures; "
        "print(sorted(m for m in ('torch', 'monai') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert done.stdout.strip() == "[]"


def test_extensions_index_entry():
    """The entry the Extensions Index receives follows its schema's rules (v1.0.2)."""
    import json

    entry = json.loads((ROOT / "LongitudinalDiffusion.json").read_text())
    allowed = {
        "$schema",
        "build_dependencies",
        "build_subdirectory",
        "category",
        "scm_revision",
        "scm_type",
        "scm_url",
        "enabled",
        "tier",
        "dicom_support_rule",
    }
    assert set(entry) <= allowed
    assert {"$schema", "category", "scm_url"} <= set(entry)
    # "Diffusion" on the index's list means diffusion MRI; synthesis is what this does.
    assert entry["category"] == "Image Synthesis"
    top = (ROOT / "CMakeLists.txt").read_text()
    depends = re.search(r'set\(EXTENSION_DEPENDS "([^"]*)"\)', top).group(1).split()
    assert entry["build_dependencies"] == depends
    # The extension name must not start with "Slicer"; the repository's must.
    assert not re.search(r"project\((\w+)\)", top).group(1).startswith("Slicer")
    assert entry["scm_url"].rsplit("/", 1)[1].startswith("Slicer")
    assert 1 <= entry["tier"] <= 5


def test_module_requirements_are_lower_bounds_and_leave_torch_to_the_pytorch_extension():
    lines = [
        line.split("#")[0].strip()
        for line in (ROOT / "LongitudinalDiffusion" / "Resources" / "requirements.txt").read_text().splitlines()
    ]
    reqs = [line for line in lines if line]
    assert reqs and all(">=" in r and "==" not in r for r in reqs)
    names = {re.split(r"[<>=!~ ]", r)[0].lower() for r in reqs}
    assert not names & {"torch", "numpy", "simpleitk", "requests"}


def test_module_file_follows_the_slicer_template_and_installs_nothing_at_import():
    """Module, Widget, Logic and Test classes; pip only inside a method (first use, with consent)."""
    import ast

    source = (ROOT / "LongitudinalDiffusion" / "LongitudinalDiffusion.py").read_text()
    tree = ast.parse(source)
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    assert set(classes) == {
        "LongitudinalDiffusion",
        "LongitudinalDiffusionWidget",
        "LongitudinalDiffusionLogic",
        "LongitudinalDiffusionTest",
    }
    top_level = [node for node in tree.body if not isinstance(node, (ast.ClassDef, ast.FunctionDef))]
    calls = {
        node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        for stmt in top_level
        for node in ast.walk(stmt)
        if isinstance(node, ast.Call)
    }
    assert not calls & {"pip_install", "pip_ensure", "installTorch"}
    ensure = next(
        f for f in classes["LongitudinalDiffusionLogic"].body if getattr(f, "name", "") == "ensureDependencies"
    )
    text = ast.get_source_segment(source, ensure)
    assert "confirmOkCancelDisplay" in text and "pip_ensure" in text  # asks before installing
