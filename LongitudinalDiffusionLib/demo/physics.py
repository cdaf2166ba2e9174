"""MR physics of the simulated scans: sequences, signal equations, bias field and noise.

Image contrast is never painted on. Each voxel holds a mixture of tissues, each tissue has
relaxation times (T1, T2) and a proton density (PD) that depend on age (see
``development``), and the scanner's signal follows the textbook steady-state equations
(Haacke et al., *Magnetic Resonance Imaging: Physical Principles and Sequence Design*,
1999, ch. 8 and 18; Bernstein et al., *Handbook of MRI Pulse Sequences*, 2004):

* spin echo, ``S = PD * (1 - exp(-TR/T1)) * exp(-TE/T2)`` (T1w and T2w),
* inversion recovery with magnitude reconstruction,
  ``S = PD * |1 - 2 exp(-TI/T1) + exp(-TR/T1)| * exp(-TE/T2)`` (FLAIR, with TI chosen to null
  CSF, :func:`csf_null_ti`),
* contrast-enhanced T1w: the same spin echo with the longitudinal relaxation rate raised by
  the gadolinium concentration, ``R1 = 1/T1 + r1 * C`` (r1 about 4.5 /s/mM at 3 T for
  macrocyclic agents; Rohrer et al., Invest. Radiol. 2005). Only tissue without a
  blood-brain barrier (the lesion's rim, the dura and scalp vessels) takes up contrast.

Partial volumes mix signals, not parameters, except within one tissue where water is in
fast exchange (white matter myelination mixes relaxation *rates*). Signal is measured as
a complex value with Gaussian noise in both channels and shown as its magnitude, which makes
the noise Rician (Gudbjartsson & Patz, MRM 1995). A smooth multiplicative field models the
receive-coil bias (Sled et al., IEEE TMI 1998).

The relaxation times of ``development`` are 3 T values. A sequence at another field strength
(:attr:`Sequence.field_t`) sees each tissue's T1 through :func:`t1_at_field`: free water's
relaxation rate does not depend on the field, the macromolecular part of the rate falls as
``B0 ** -0.49``. One exponent fits both Rooney et al.'s white- and grey-matter fits
(MRM 2007; T1 = 583 * B0**0.382 ms and 857 * B0**0.376 ms: 887 -> 681 ms and 1295 -> 998 ms
from 3 T to 1.5 T, reproduced within 1.5 %), and CSF keeps its T1, as measured. T2 and the
gadolinium relaxivity change by less than 10 % between 1.5 and 3 T and are kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Gadolinium relaxivity r1 at 3 T, 1/(s * mM).
R1_GADOLINIUM = 4.5


@dataclass(frozen=True)
class Sequence:
    """An acquisition; times in milliseconds.

    Attributes:
        kind: ``"spin_echo"`` or ``"inversion_recovery"``.
        tr, te, ti: repetition, echo and inversion times (ms; ``ti`` only for IR).
        contrast: True when gadolinium has been injected before this scan.
        field_t: the scanner's field strength in tesla (the tissues' T1 follow it).
    """

    name: str
    kind: str
    tr: float
    te: float
    ti: float = 0.0
    contrast: bool = False
    field_t: float = 3.0

    def bids_sidecar(self) -> dict:
        """BIDS acquisition fields (seconds, as BIDS requires)."""
        out = {
            "MagneticFieldStrength": int(self.field_t) if float(self.field_t).is_integer() else self.field_t,
            "ScanningSequence": "IR" if self.kind == "inversion_recovery" else "SE",
            "RepetitionTime": self.tr / 1000.0,
            "EchoTime": self.te / 1000.0,
        }
        if self.kind == "inversion_recovery":
            out["InversionTime"] = self.ti / 1000.0
        if self.contrast:
            out["ContrastBolusIngredient"] = "GADOLINIUM"
        return out


T1_CSF_MS = 4300.0
#: Field strength (T) of the simulator's relaxation times.
REFERENCE_FIELD_T = 3.0
#: The macromolecular part of a tissue's R1 scales as ``B0 ** -FIELD_EXPONENT``.
FIELD_EXPONENT = 0.49


def t1_at_field(t1_ms, field_t: float):
    """T1 (ms) at ``field_t`` tesla of tissue whose T1 at 3 T is ``t1_ms``.

    ``R1 = R1_water + (R1_3T - R1_water) * (3 / B0) ** FIELD_EXPONENT``, with free water's
    ``R1_water = 1 / T1_CSF_MS`` (field independent); at 3 T the input is returned as is.
    """
    if field_t <= 0:
        raise ValueError(f"field strength must be > 0 T, got {field_t}")
    if field_t == REFERENCE_FIELD_T:
        return t1_ms
    r1_water = 1.0 / T1_CSF_MS
    r1 = (
        r1_water
        + (1.0 / np.asarray(t1_ms, dtype=np.float64) - r1_water) * (REFERENCE_FIELD_T / field_t) ** FIELD_EXPONENT
    )
    return 1.0 / r1


def csf_null_ti(tr: float, t1: float = T1_CSF_MS) -> float:
    """Inversion time (ms) that nulls a tissue of longitudinal relaxation ``t1`` at ``tr``.

    Solves ``1 - 2 exp(-TI/T1) + exp(-TR/T1) = 0``; tends to ``T1 ln 2`` when TR >> T1.
    """
    return float(-t1 * np.log((1.0 + np.exp(-tr / t1)) / 2.0))


#: The four modalities, keyed by the library's modality names.
SEQUENCES: dict[str, Sequence] = {
    "T1w": Sequence("T1w", "spin_echo", tr=600.0, te=12.0),
    "T2w": Sequence("T2w", "spin_echo", tr=5000.0, te=120.0),
    "FLAIR": Sequence("FLAIR", "inversion_recovery", tr=9000.0, te=120.0, ti=round(csf_null_ti(9000.0))),
    "T1ce": Sequence("T1ce", "spin_echo", tr=600.0, te=12.0, contrast=True),
}


def signal(seq: Sequence, t1, t2, pd, gd_mm=0.0):
    """Noise-free signal of tissue with relaxation times ``t1``, ``t2`` (ms) and density ``pd``.

    Args:
        seq: the acquisition.
        t1, t2, pd: arrays (broadcastable) of tissue parameters.
        gd_mm: gadolinium concentration (mM); used only when ``seq.contrast``.
    """
    r1 = 1.0 / np.asarray(t1_at_field(t1, seq.field_t), dtype=np.float64)
    if seq.contrast:
        r1 = r1 + R1_GADOLINIUM * np.asarray(gd_mm) / 1000.0  # rates per ms
    t2_decay = np.exp(-seq.te / np.asarray(t2, dtype=np.float64))
    if seq.kind == "spin_echo":
        long = 1.0 - np.exp(-seq.tr * r1)
    elif seq.kind == "inversion_recovery":
        long = np.abs(1.0 - 2.0 * np.exp(-seq.ti * r1) + np.exp(-seq.tr * r1))
    else:  # pragma: no cover - Sequence is only built here
        raise ValueError(f"unknown sequence kind {seq.kind!r}")
    return np.asarray(pd) * long * t2_decay


def bias_field(rng: np.random.Generator, shape: tuple[int, int, int], strength: float = 0.18) -> np.ndarray:
    """A smooth multiplicative receive field: exp of a random cubic polynomial.

    ``strength`` is roughly the standard deviation of the log-field over the FOV
    (0.18 is about +-20 %, typical of a head coil at 3 T before correction).
    """
    axes = [np.linspace(-1, 1, n, dtype=np.float32) for n in shape]
    x, y, z = np.meshgrid(*axes, indexing="ij", sparse=True)
    log_field = np.zeros(shape, np.float32)
    for i in range(4):
        for j in range(4 - i):
            for k in range(4 - i - j):
                if i + j + k == 0:
                    continue
                log_field = log_field + rng.normal(0, 1) / (i + j + k) * x**i * y**j * z**k
    log_field -= log_field.mean()
    log_field *= strength / max(float(log_field.std()), 1e-6)
    return np.exp(log_field)


def rician(rng: np.random.Generator, magnitude: np.ndarray, sigma: float) -> np.ndarray:
    """Magnitude of ``magnitude`` plus complex Gaussian noise of std ``sigma`` per channel.

    Works in float32 when ``magnitude`` is float32 (half the memory and time), else float64.
    """
    magnitude = np.asarray(magnitude)
    dtype = np.float32 if magnitude.dtype == np.float32 else np.float64
    real = magnitude + dtype(sigma) * rng.standard_normal(magnitude.shape, dtype=dtype)
    imag = dtype(sigma) * rng.standard_normal(magnitude.shape, dtype=dtype)
    return np.sqrt(real * real + imag * imag)
