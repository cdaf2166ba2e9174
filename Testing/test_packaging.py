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
    twice = sorted({i for i in items if items.count(i) > 1})
    assert not twice, f"{cmake}: listed twice in {variable}: {twice}"
    if module:
        items = [i.replace("${MODULE_NAME}", module.group(1)) for i in items]
    return set(items)


#: Never installed into Slicer: the remote worker's server (it runs on a GPU machine) and the
#: module's test and docs helper that renders slice views with trame-slicer.
NOT_PACKAGED_LIB = ("worker/",)
# longdiff_scene.py: the command line with the scene export, run outside Slicer
NOT_PACKAGED_MODULE = ("LongitudinalDiffusionSlicer/sliceviews.py", "longdiff_scene.py")


def test_every_library_file_slicer_runs_is_packaged_and_the_worker_is_not():
    lib = ROOT / "LongitudinalDiffusionLib"
    cmake = lib / "CMakeLists.txt"
    files = {p.relative_to(lib).as_posix() for p in lib.rglob("*.py")}
    scripts = {f for f in files if not f.startswith(NOT_PACKAGED_LIB)}
    listed = _listed(cmake, "LIB_PYTHON_SCRIPTS")
    assert listed == scripts, (
        f"LongitudinalDiffusionLib/CMakeLists.txt LIB_PYTHON_SCRIPTS: add {sorted(scripts - listed)}, "
        f"remove {sorted(listed - scripts)} (Slicer installs only the files listed there)"
    )
    assert any(f.startswith("worker/") for f in files)  # it exists, and stays out
    data = {
        p.relative_to(lib).as_posix()
        for p in lib.rglob("*")
        if p.is_file() and p.suffix != ".py" and "__pycache__" not in p.parts and p.name != "CMakeLists.txt"
    }
    assert _listed(cmake, "LIB_PYTHON_RESOURCES") == {f for f in data if not f.startswith(NOT_PACKAGED_LIB)}


def test_packaged_code_never_imports_what_is_left_out():
    """What is installed must not need the worker server or the test helpers."""
    lib = ROOT / "LongitudinalDiffusionLib"
    packaged = [lib / f for f in _listed(lib / "CMakeLists.txt", "LIB_PYTHON_SCRIPTS")]
    mod = ROOT / "LongitudinalDiffusion"
    packaged += [mod / f for f in _listed(mod / "CMakeLists.txt", "MODULE_PYTHON_SCRIPTS")]
    bad = re.compile(r"^\s*(from|import)\s+(\S*worker\b|\S*sliceviews\b|\.+\s+import\s+.*\bsliceviews\b)", re.M)
    offenders = [p.name for p in packaged if bad.search(p.read_text())]
    assert offenders == []


def test_every_module_file_is_packaged_but_the_test_helpers():
    mod = ROOT / "LongitudinalDiffusion"
    cmake = mod / "CMakeLists.txt"
    scripts = {p.relative_to(mod).as_posix() for p in mod.rglob("*.py")}
    assert _listed(cmake, "MODULE_PYTHON_SCRIPTS") == scripts - set(NOT_PACKAGED_MODULE)
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
    # the repository (history included) must stay well under the Extensions Index's 100 MB
    assert total < 40e6, f"bundled models take {total / 1e6:.1f} MB"


def test_self_test_is_registered_and_old_slicers_are_refused():
    module = (ROOT / "LongitudinalDiffusion" / "CMakeLists.txt").read_text()
    assert re.search(r"if\(BUILD_TESTING\)\s+slicer_add_python_unittest\(SCRIPT \$\{MODULE_NAME\}\.py\)", module)
    top = (ROOT / "CMakeLists.txt").read_text()
    minimum = re.search(r'set\(LongitudinalDiffusion_MINIMUM_SLICER_VERSION "([\d.]+)"\)', top).group(1)
    assert minimum == "5.8"
    assert "VERSION_LESS LongitudinalDiffusion_MINIMUM_SLICER_VERSION" in top and "FATAL_ERROR" in top
    assert top.index("include(${Slicer_USE_FILE})") < top.index("VERSION_LESS")  # Slicer_VERSION is known by then
    assert "Slicer 5.8" in (ROOT / "docs" / "slicer.md").read_text()


def test_extension_metadata():
    top = (ROOT / "CMakeLists.txt").read_text()
    assert "LongitudinalDiffusion developers" not in top  # a placeholder, not a contributor
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
    assert "dependencies.ensureDependencies" in text  # which asks before installing (test_panel_module.py)
    assert "pydeps" not in source
