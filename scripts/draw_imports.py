"""The import map of LongitudinalDiffusionLib, computed from the source (AST, nothing imported),
drawn into docs/images/architecture.png.

    python scripts/draw_imports.py            # redraw docs/images/architecture.png
    python scripts/draw_imports.py --print    # the edges as text

Each box is a room of the library (a module, or a package drawn as one box: ``demo`` - the
simulator; its ``showcase``, the demo run, is a box of its own -, ``diffusion``, ``models``,
``backends``, ``worker``, ``tasks``); an arrow A -> B means A imports B, at
the top of the file or inside a function (an import made on first use is a dependency too).
Rooms are placed in layers: every arrow points down (to a lower layer) or sideways within
a package. Testing/test_layers.py checks the same graph: no arrow up, no circle.
"""

from __future__ import annotations

import argparse
import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIB = ROOT / "LongitudinalDiffusionLib"
PACKAGE = "LongitudinalDiffusionLib"
#: packages drawn as one box in the picture
GROUPED = ("demo", "diffusion", "models", "backends", "worker", "tasks")


def module_name(path: Path, lib: Path = LIB) -> str:
    """``diffusion/sampling.py`` -> ``diffusion.sampling``; ``models/__init__.py`` -> ``models``."""
    parts = list(path.relative_to(lib).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts) or "__init__"


def imports_of(path: Path, lib: Path = LIB) -> list[tuple[str, int]]:
    """Every import in ``path`` as (absolute dotted name, line); library names keep the
    ``LongitudinalDiffusionLib.`` prefix, names imported from a package are listed as
    ``package.name`` (the caller decides whether that is a submodule)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    here = [PACKAGE, *module_name(path, lib).split(".")] if module_name(path, lib) != "__init__" else [PACKAGE]
    if path.name != "__init__.py":
        here = here[:-1]  # the package the module sits in
    found: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((target, node.lineno))
            found += [(f"{target}.{a.name}", node.lineno) for a in node.names]
    return found


def import_graph(lib: Path = LIB) -> dict[str, set[str]]:
    """module -> the library modules it imports (names relative to the package)."""
    files = {module_name(p, lib): p for p in sorted(lib.rglob("*.py")) if "__pycache__" not in p.parts}
    modules = set(files)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in files.items():
        for name, _ in imports_of(path, lib):
            if name != PACKAGE and not name.startswith(PACKAGE + "."):
                continue
            rel = name[len(PACKAGE) + 1 :] if name != PACKAGE else "__init__"
            if rel in modules:
                target = rel
            elif rel.rpartition(".")[0] in modules:  # `from .pkg import name`: the package itself
                target = rel.rpartition(".")[0]
            else:
                continue
            if target != mod:
                graph[mod].add(target)
    # `from .pkg import sub` lists both pkg and pkg.sub: keep pkg only when a name of its own is used
    for mod, targets in graph.items():
        for t in list(targets):
            if any(other.startswith(t + ".") for other in targets) and _only_submodules(files, mod, t, lib):
                targets.discard(t)
    return graph


def _only_submodules(files: dict[str, Path], mod: str, package: str, lib: Path) -> bool:
    """True when every import of ``package`` in ``mod`` names one of its submodules."""
    for name, _ in imports_of(files[mod], lib):
        if name == f"{PACKAGE}.{package}":
            continue
        if name.startswith(f"{PACKAGE}.{package}.") and name[len(PACKAGE) + 1 :] not in files:
            return False
    return True


def external_imports(lib: Path = LIB) -> dict[str, set[tuple[str, int]]]:
    """module -> the top-level names of everything outside the library it imports, with lines."""
    out: dict[str, set[tuple[str, int]]] = defaultdict(set)
    for path in sorted(lib.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        for name, line in imports_of(path, lib):
            top = name.split(".")[0]
            if top and top != PACKAGE:
                out[module_name(path, lib)].add((top, line))
    return dict(out)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def room(module: str) -> str:
    """The box a module is drawn in."""
    top = module.split(".")[0]
    if module == "demo.showcase":  # the demo run sits above the tasks; the simulator below them
        return module
    return top if top in GROUPED else module


def room_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    rooms: dict[str, set[str]] = defaultdict(set)
    for mod, targets in graph.items():
        if mod in ("__init__", "__main__"):
            continue
        rooms[room(mod)]
        for t in targets:
            if room(t) != room(mod) and t not in ("__init__", "__main__"):
                rooms[room(mod)].add(room(t))
    return dict(rooms)


def layers(rooms: dict[str, set[str]]) -> dict[str, int]:
    """Layer of each room: 0 for rooms that import no other room, else 1 + the highest layer
    it imports (defined because the room graph has no circle)."""
    depth: dict[str, int] = {}

    def of(r: str, seen: tuple[str, ...] = ()) -> int:
        if r in depth:
            return depth[r]
        if r in seen:
            raise ValueError(f"import circle through {' -> '.join((*seen, r))}")
        d = 1 + max((of(t, (*seen, r)) for t in rooms[r]), default=-1)
        depth[r] = d
        return d

    for r in rooms:
        of(r)
    return depth


def draw(out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    rooms = room_graph(import_graph())
    depth = layers(rooms)
    by_layer: dict[int, list[str]] = defaultdict(list)
    for r, d in depth.items():
        by_layer[d].append(r)
    top = max(by_layer)
    width = max(len(v) for v in by_layer.values())
    fig, ax = plt.subplots(figsize=(max(12.0, 2.0 * width), 1.1 * (top + 1) + 1.2))
    pos: dict[str, tuple[float, float]] = {}
    for d, names in by_layer.items():
        names.sort()
        for i, name in enumerate(names):
            pos[name] = ((i + 0.5) * 1.5 * width / len(names), float(d))
    for r, targets in rooms.items():
        for t in targets:
            ax.add_patch(
                FancyArrowPatch(
                    pos[r],
                    pos[t],
                    arrowstyle="-|>",
                    mutation_scale=9,
                    color="#7a869a",
                    alpha=0.5,
                    lw=0.8,
                    shrinkA=14,
                    shrinkB=14,
                    connectionstyle="arc3,rad=0.06",
                )
            )
    for name, (x, y) in pos.items():
        package = name in GROUPED
        label = f"{name}/" if package else name
        ax.add_patch(
            FancyBboxPatch(
                (x - 0.62, y - 0.2),
                1.24,
                0.4,
                boxstyle="round,pad=0.02",
                fc="#dbe9f6" if package else "#f4f4f4",
                ec="#2f5f8a" if package else "#555555",
                lw=1.0,
                zorder=3,
            )
        )
        ax.text(x, y, label, ha="center", va="center", fontsize=9, zorder=4, family="monospace")
    ax.set_xlim(-0.3, 1.5 * width + 0.3)
    ax.set_ylim(-0.7, top + 0.7)
    ax.axis("off")
    ax.set_title(
        "LongitudinalDiffusionLib: who imports whom (arrows point down; packages in blue; "
        "drawn by scripts/draw_imports.py from the source)",
        fontsize=10,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--print", action="store_true", help="print the room graph instead of drawing it")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images" / "architecture.png")
    args = parser.parse_args(argv)
    if args.print:
        rooms = room_graph(import_graph())
        for r, d in sorted(layers(rooms).items(), key=lambda kv: (-kv[1], kv[0])):
            print(f"{d:2d} {r:14s} -> {', '.join(sorted(rooms[r])) or '-'}")
        return 0
    print(draw(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
