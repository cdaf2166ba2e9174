"""Run every task on real scans the project never trained on, as a new user would, and
report what the tool did with each: ran, warned or refused, why, and for each result that
was made whether it is aligned with its input, uncropped and marked synthetic.

    .venv/bin/python scripts/real_scans_report.py [--work /tmp/real-scans] [--docs docs]

The scans come from Debian's mricron-data (Colin27 with and without skull) and
insighttoolkit5-examples (ITK's head T1, 2x2x3 mm), and pydicom's echo cine
(``scripts/setup_tools.sh`` installs the Debian ones). A second visit is the same scan in
another head pose: its affine rotated and shifted, the voxels untouched, so the true
transform between the visits is known. Every case runs the ``longdiff`` command line in a
subprocess, exactly as a user would type it. The table goes between the ``cases`` markers
of ``docs/real-scans.md``; one picture per case that made a result goes to
``docs/images/real_<case>.png`` (inputs and result side by side, same world slice).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

HERE = Path(__file__).resolve().parent.parent
MRICRON = Path("/usr/share/mricron/templates")
ITK = Path("/usr/share/doc/insighttoolkit5-examples/examples/Data")
BEGIN, END = "<!-- cases:begin -->", "<!-- cases:end -->"


@dataclass
class Case:
    name: str
    what: str
    argv: list[str]
    out: Path | None = None
    inputs: list[Path] = field(default_factory=list)
    # filled by run()
    code: int | None = None
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    error: str = ""
    figures: dict[str, str] = field(default_factory=dict)


def _pose(affine: np.ndarray, degrees: float, shift_mm: tuple[float, float, float]) -> np.ndarray:
    """``affine`` moved by a rotation about S (through the image's centre) and a shift."""
    a = np.deg2rad(degrees)
    rot = np.eye(4)
    rot[:2, :2] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
    rot[:3, 3] = shift_mm
    return rot @ affine


def _write(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(np.asarray(data, np.float32), affine), str(path))
    return path


def prepare(work: Path) -> dict[str, Path]:
    """The scans of the cases, written under ``work``."""
    work.mkdir(parents=True, exist_ok=True)
    bet, head, itk = nib.load(str(MRICRON / "ch2bet.nii.gz")), nib.load(str(MRICRON / "ch2.nii.gz")), None
    itk = nib.load(str(ITK / "KmeansTest_T1UCharRaw.nii.gz"))
    scans = {
        "ch2bet": MRICRON / "ch2bet.nii.gz",
        "ch2": MRICRON / "ch2.nii.gz",
        "itk": ITK / "KmeansTest_T1UCharRaw.nii.gz",
        "ch2bet_posed": _write(work / "ch2bet_posed.nii.gz", bet.dataobj, _pose(bet.affine, 10.0, (15.0, -10.0, 5.0))),
        "ch2_posed": _write(work / "ch2_posed.nii.gz", head.dataobj, _pose(head.affine, -8.0, (-12.0, 8.0, 0.0))),
        "itk_posed": _write(work / "itk_posed.nii.gz", itk.dataobj, _pose(itk.affine, 7.0, (10.0, 10.0, -6.0))),
        "ch2bet_far": _write(work / "ch2bet_far.nii.gz", bet.dataobj, _pose(bet.affine, 0.0, (200.0, 0.0, 0.0))),
        "zero": _write(work / "zero.nii.gz", np.zeros(bet.shape, np.float32), bet.affine),
    }
    try:
        from pydicom import dcmread
        from pydicom.data import get_testdata_file

        frames = dcmread(get_testdata_file("examples_ybr_color.dcm")).pixel_array[..., 0].astype(np.float32)
        for i in (0, 10):
            scans[f"echo{i}"] = _write(work / f"echo{i:02d}.nii.gz", frames[i].T[:, :, None], np.diag([0.3, 0.3, 1, 1]))
    except Exception as exc:  # the echo needs pydicom with a JPEG decoder (Pillow)
        print(f"echo cine not available: {exc}", file=sys.stderr)
    return scans


def _manifest(work: Path, name: str, rows: list[tuple[Path, float, str]]) -> Path:
    folder = work / name
    folder.mkdir(parents=True, exist_ok=True)
    text = "file\tage\tmodality\tsession\n" + "".join(f"{p}\t{a}\t{m}\tses-{a:g}\n" for p, a, m in rows)
    (folder / "manifest.tsv").write_text(text, encoding="utf-8")
    return folder / "manifest.tsv"


def cases(work: Path, scans: dict[str, Path]) -> list[Case]:
    out = work / "results"

    def ages(manifest: str, *missing: str) -> list[str]:
        return ["complete-ages", manifest, "--model", "interval-demo", "--ages", *missing]

    def visits(name, a, b, age_a=12, age_b=24):
        return str(_manifest(work, name, [(scans[a], age_a, "T1w"), (scans[b], age_b, "T1w")]))

    raw = ["--no-preprocess"]
    cs = [
        Case("brain_two_poses", "Colin27 brain (ch2bet, 1 mm) at 12 months and in another pose (10 deg, 19 mm) at 24;"
             " missing 18 months (preprocessing by default: visits aligned, atlas space, back)",
             ages(visits("brain_two_poses", "ch2bet", "ch2bet_posed"), "18")),
        Case("brain_two_poses_raw", "the same with --no-preprocess",
             [*ages(visits("brain_two_poses_raw", "ch2bet", "ch2bet_posed"), "18"), *raw]),
        Case("head_with_skull", "Colin27 head with skull (ch2, 1 mm), two poses; missing 18 months "
             "(preprocessing: N4, alignment)", ages(visits("head_with_skull", "ch2", "ch2_posed"), "18")),
        Case("head_with_skull_raw", "the same with --no-preprocess",
             [*ages(visits("head_with_skull_raw", "ch2", "ch2_posed"), "18"), *raw]),
        Case("itk_head", "ITK head T1 (128x128x62 at 2x2x3 mm, skull), two poses; missing 18 months",
             ages(visits("itk_head", "itk", "itk_posed"), "18")),
        Case("itk_head_raw", "the same with --no-preprocess",
             [*ages(visits("itk_head_raw", "itk", "itk_posed"), "18"), *raw]),
        Case("visits_200mm_apart", "Colin27 brain and the same brain 200 mm away in world space",
             ages(visits("visits_200mm_apart", "ch2bet", "ch2bet_far"), "18")),
        Case("visits_200mm_apart_raw", "the same with --no-preprocess",
             [*ages(visits("visits_200mm_apart_raw", "ch2bet", "ch2bet_far"), "18"), *raw]),
        Case("blank_neighbour", "an all-zero scan at 6 months beside Colin27 at 12; missing 9 months",
             ages(visits("blank_neighbour", "zero", "ch2bet", 6, 12), "9")),
        Case("adult_ages", "Colin27 brain declared at 6 and 18 years (72, 216 months); missing 24 months",
             ages(visits("adult_ages", "ch2bet", "ch2bet_posed", 72, 216), "24")),
        Case("one_scan_three_contrasts", "Colin27 T1 given as T1w, T1ce and T2w to synthesise FLAIR (cWDM)",
             ["synthesize-modality", str(_manifest(work, "one_scan_three_contrasts",
                                                   [(scans["ch2bet"], 12, m) for m in ("T1w", "T1ce", "T2w")])),
              "--session", "ses-12", "--modality", "FLAIR", "--model", "cwdm-demo"]),
        Case("brain_to_heart_model", "two Colin27 poses given to the heart-phantom frame model (DDM)",
             ["interpolate", str(scans["ch2bet"]), str(scans["ch2bet_posed"]), "--frames", "4", "--model", "ddm-demo"]),
    ]  # fmt: skip
    if "echo0" in scans:
        cs.append(
            Case("echo_single_slice", "two frames of a real echo cine (320x240, one slice) to the frame model (DDM)",
                 ["interpolate", str(scans["echo0"]), str(scans["echo10"]), "--frames", "4", "--model", "ddm-demo"])
        )  # fmt: skip
    for c in cs:
        c.out = out / c.name
        c.argv = [*c.argv, "--out", str(c.out), "--steps", "10"]
    return cs


def run(case: Case) -> None:
    if case.out is not None and case.out.exists():
        shutil.rmtree(case.out)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "LongitudinalDiffusionLib", "-q", *case.argv],
        capture_output=True, text=True, env=env, cwd=HERE, timeout=1800,
    )  # fmt: skip
    case.seconds = time.perf_counter() - t0
    case.code = proc.returncode
    for line in proc.stderr.splitlines():
        if line.startswith("longdiff: WARNING: "):
            case.warnings.append(line[len("longdiff: WARNING: ") :])
        elif ": error: " in line:
            case.error = line.split(": error: ", 1)[1]
    if proc.returncode not in (0, 2):
        case.error = case.error or proc.stderr.strip().splitlines()[-1]


def measure(case: Case) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Alignment, crop and marking figures of a result; the panels for its picture."""
    from LongitudinalDiffusionLib.domain import foreground
    from LongitudinalDiffusionLib.imaging import load_image

    listing = json.loads((case.out / "result.json").read_text(encoding="utf-8"))
    generated = [e for e in listing["images"] if e["kind"] in ("generated", "mean")]
    panels = []
    for entry in generated[:1]:
        out_path = case.out / entry["file"]
        out = load_image(out_path)
        header = nib.load(str(out_path)).header["descrip"].item().decode("ascii", "replace").strip("\x00 ")
        prov = listing.get("provenance") or {}
        sources = [Path(i["file"]) for i in prov.get("inputs", []) if i.get("file")]
        ref = next((load_image(p) for p in sources if load_image(p).same_geometry(out)), None)
        case.figures["marked"] = "yes" if header.startswith("SYNTHETIC") else f"no ({header!r})"
        if ref is None:
            case.figures["aligned"] = "no input shares the result's grid"
            continue
        fg_in, fg_out = foreground(ref), foreground(out)
        shift = float(np.linalg.norm(fg_out.center_ras - fg_in.center_ras)) if fg_out.center_ras is not None else np.nan
        lost = float(1.0 - (fg_out.mask & fg_in.mask).sum() / max(fg_in.mask.sum(), 1))
        case.figures["aligned"] = f"on {Path(ref.meta['source']).name}'s grid; foreground centres {shift:.1f} mm apart"
        case.figures["uncropped"] = f"{100 * lost:.1f} % of the input's foreground missing in the result"
        others = [p for p in dict.fromkeys(sources) if Path(p) != Path(ref.meta["source"])]
        panels = [(Path(p).name, load_image(p).array, load_image(p).affine) for p in [ref.meta["source"], *others][:2]]
        panels.append((f"generated ({entry.get('age_months')} mo), SYNTHETIC", out.array, out.affine))
    return panels


def _slice_on(array: np.ndarray, affine: np.ndarray, grid_affine: np.ndarray, shape, k: int) -> np.ndarray:
    """``array`` (voxel-to-RAS ``affine``) sampled in world space on slice ``k`` of a grid."""
    from scipy.ndimage import map_coordinates

    ii, jj = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    vox = np.stack([ii, jj, np.full_like(ii, k), np.ones_like(ii)]).reshape(4, -1).astype(np.float64)
    src = np.linalg.inv(affine) @ grid_affine @ vox
    return map_coordinates(np.asarray(array, np.float32), src[:3], order=1, cval=0.0).reshape(shape[:2])


def picture(case: Case, panels, images: Path) -> Path | None:
    """Inputs and result on the result's grid, one axial slice through the result's head:
    each input sampled at the same world points (a visit in another pose shows it), the
    result outlined with its input's head (red) to show where it landed."""
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from LongitudinalDiffusionLib.domain import foreground
    from LongitudinalDiffusionLib.imaging import Image

    _, out_array, out_affine = panels[-1]
    shape = out_array.shape[:3]
    fg = foreground(Image(np.asarray(out_array, np.float32), out_affine)).mask
    k = int(np.round(np.argwhere(fg)[:, 2].mean())) if fg.any() else shape[2] // 2
    near = foreground(Image(np.asarray(panels[0][1], np.float32), panels[0][2])).mask.astype(np.float32)
    outline = _slice_on(near, panels[0][2], out_affine, shape, k)
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6))
    for n, (ax, (title, array, affine)) in enumerate(zip(np.atleast_1d(axes), panels)):
        ax.imshow(_slice_on(array, affine, out_affine, shape, k).T, origin="lower", cmap="gray")
        if n == len(panels) - 1:
            ax.contour(outline.T, levels=[0.5], colors="red", linewidths=0.7)
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    fig.suptitle(
        f"{case.name}: real scans (left, as placed in the scanner) and the SYNTHETIC result "
        "(right; red: the head of the scan it was placed on)",
        fontsize=8,
    )
    fig.tight_layout()
    path = images / f"real_{case.name}.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def table(cs: list[Case]) -> str:
    rows = ["| case | what the user gave | the tool | why | result figures | time |", "|---|---|---|---|---|---|"]
    for c in cs:
        if c.code == 0:
            outcome = "warned, ran" if c.warnings else "ran"
            why = "; ".join(c.warnings) or "-"
        else:
            outcome, why = "refused", c.error or "(no message)"
        figures = "; ".join(f"{k}: {v}" for k, v in c.figures.items()) or "-"
        pic = f" ([picture](images/real_{c.name}.png))" if (c.figures and c.code == 0) else ""
        rows.append(f"| `{c.name}`{pic} | {c.what} | {outcome} | {why} | {figures} | {c.seconds:.0f} s |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/real-scans"))
    parser.add_argument("--docs", type=Path, default=HERE / "docs")
    parser.add_argument("--only", nargs="*", help="case names to run")
    parser.add_argument("--redraw", action="store_true", help="only redraw the pictures of results already made")
    args = parser.parse_args()
    scans = prepare(args.work)
    cs = [c for c in cases(args.work, scans) if not args.only or c.name in args.only]
    images = args.docs / "images"
    images.mkdir(parents=True, exist_ok=True)
    for c in cs:
        if args.redraw:
            if not (c.out / "result.json").is_file():
                continue
            c.code = 0
        else:
            run(c)
        panels = measure(c) if c.code == 0 else []
        picture(c, panels, images)
        print(f"{c.name}: exit {c.code} in {c.seconds:.0f} s; {c.error or '; '.join(c.warnings)[:200]}", flush=True)
    text = table(cs)
    doc = args.docs / "real-scans.md"
    body = doc.read_text(encoding="utf-8") if doc.exists() else "# Real scans\n"
    block = f"{BEGIN}\n{text}\n\nMade by `.venv/bin/python scripts/real_scans_report.py`.\n{END}"
    if BEGIN in body and END in body:
        body = body[: body.index(BEGIN)] + block + body[body.index(END) + len(END) :]
    else:
        body = body.rstrip() + "\n\n## Each task on real scans\n\n" + block + "\n"
    doc.write_text(body, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
