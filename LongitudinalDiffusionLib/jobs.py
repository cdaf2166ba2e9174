"""Jobs: one JSON-serialisable description of a task, its event stream, and the Backend protocol.

A :class:`JobSpec` says what to run (task, model, the subject's input images and the
task's parameters, the sampling options); :func:`run_job` runs it with the library's
:mod:`~LongitudinalDiffusionLib.tasks`. The same spec runs on a :class:`Backend`: the
local one (a warm child process, :mod:`.backends.local` and :mod:`.backends.process`) or the remote worker
(:mod:`.backends.remote`). A caller (the Slicer panel, the CLI, a script) submits a spec,
drains :class:`JobEvent` objects with ``poll`` on a timer, may ``cancel``, and finally
takes the :class:`~LongitudinalDiffusionLib.tasks.Result`.

Parameters of each task (``JobSpec.params``):

* ``complete-ages``: ``{"ages": [months, ...], "modality": "T1w"}`` (modality optional:
  the model's own by default);
* ``synthesize-modality``: ``{"target": "FLAIR", "session": "ses-02"}`` (a session label of
  the inputs, or an age in months);
* ``interpolate``: ``{"source": i, "target": j, "n_frames": N}``, indices into ``inputs``;
  the source input's ``labels`` (if any) are carried along the deformation.

Importing this module does not import torch: specs can be built and checked anywhere.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from .diffusion.samplers import SAMPLERS
from .errors import InputError, LongitudinalDiffusionError
from .progress import CancelToken, ProgressCallback, ProgressEvent
from .subject import parse_age, parse_modality

if TYPE_CHECKING:  # pragma: no cover
    from .subject import Subject
    from .tasks import Result

__all__ = [
    "EVENT_KINDS",
    "FINAL_KINDS",
    "JOB_TASKS",
    "OPTION_FIELDS",
    "Backend",
    "JobEvent",
    "JobInput",
    "JobNotFinished",
    "JobExpired",
    "JobSpec",
    "UnknownJob",
    "run_job",
]

JOB_TASKS = ("complete-ages", "synthesize-modality", "interpolate")
EVENT_KINDS = ("queued", "started", "progress", "log", "done", "failed", "cancelled")
#: the kinds that end a job: no event follows them
FINAL_KINDS = ("done", "failed", "cancelled")
#: RunOptions fields a spec may set, with the JSON types each accepts
OPTION_FIELDS: dict[str, tuple[type, ...]] = {
    "sampler": (str, type(None)),
    "steps": (int, type(None)),
    "eta": (int, float, type(None)),
    "guidance": (int, float, type(None)),
    "seed": (int, type(None)),
    "capture": (int,),
    "n_samples": (int,),
    "two_sided": (bool,),
    "preprocess": (bool, type(None)),
    "device": (str,),
    "threads": (int, type(None)),
}
_PARAMS = {
    "complete-ages": ({"ages"}, {"modality"}),
    "synthesize-modality": ({"target", "session"}, set()),
    "interpolate": ({"source", "target", "n_frames"}, set()),
}
#: generous caps that keep a malformed spec from asking for absurd work
MAX_INPUTS = 256
MAX_AGES = 64
MAX_FRAMES = 256
MAX_STEPS = 10_000
MAX_SAMPLES = 64
#: sampler steps captured as frames (each is a full volume held in memory)
MAX_CAPTURE = 64
#: seeds: what every random generator of the library accepts
MAX_SEED = 2**32 - 1
#: a subject id names output files (and, on a worker, nothing else): letters, digits, '.', '_', '-'
SUBJECT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")


def safe_subject_id(text: str) -> str:
    """``text`` made a valid subject id (other characters become '_'; e.g. a folder name)."""
    out = re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).replace("..", "_").lstrip("._-")[:64]
    return out or "subject"


class UnknownJob(LongitudinalDiffusionError, KeyError):
    """No job with this id (never submitted, or deleted)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "unknown job"


class JobExpired(UnknownJob):
    """The job ended long enough ago that a worker deleted it and its result (its expiry)."""


class JobNotFinished(LongitudinalDiffusionError):
    """The job has no result yet: it is queued or running."""


# ----------------------------------------------------------------------------- spec


@dataclass
class JobInput:
    """One input image of a job.

    Args:
        path: the NIfTI file (on the machine that runs the job; the remote backend uploads it).
        age_months: the subject's age at the scan.
        modality: T1w, T2w, FLAIR or T1ce (aliases accepted).
        session: the session label (e.g. ``"ses-02"``), when known.
        labels: a label map of the same scan (interpolate carries the source's along).
    """

    path: str
    age_months: float
    modality: str
    session: str | None = None
    labels: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str = "input") -> JobInput:
        if not isinstance(data, Mapping):
            raise InputError(where, f"must be a JSON object, not {type(data).__name__}")
        unknown = sorted(set(data) - {"path", "age_months", "modality", "session", "labels"})
        if unknown:
            raise InputError(where, f"unknown field(s) {', '.join(unknown)}")
        for key in ("path", "age_months", "modality"):
            if key not in data:
                raise InputError(where, f"missing '{key}'")
        out = cls(data["path"], data["age_months"], data["modality"], data.get("session"), data.get("labels"))
        out.check(where)
        return out

    def check(self, where: str = "input") -> None:
        if not isinstance(self.path, (str, os.PathLike)) or not str(self.path).strip():
            raise InputError(where, "'path' must be a non-empty string")
        self.path = str(self.path)
        if isinstance(self.age_months, bool) or not isinstance(self.age_months, (int, float)):
            raise InputError(where, f"'age_months' must be a number, not {self.age_months!r}")
        self.age_months = parse_age(self.age_months, "months", where)
        self.modality = parse_modality(self.modality, where).value
        for key in ("session", "labels"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, (str, os.PathLike)) or not str(value).strip()):
                raise InputError(where, f"'{key}' must be a non-empty string or null")
            if value is not None:
                setattr(self, key, str(value))


@dataclass
class JobSpec:
    """What to run: the task, the model, the subject's inputs, the task's parameters and
    the sampling options (JSON fields of :class:`~LongitudinalDiffusionLib.tasks.RunOptions`).

    ``model`` is a catalog name (what a remote worker understands) or, locally, the path of
    a model card. See the module's docstring for ``params``.
    """

    task: str
    model: str
    subject_id: str
    inputs: list[JobInput]
    params: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)

    # ---------------------------------------------------------------- building

    @classmethod
    def from_subject(
        cls,
        subject: Subject,
        task: str,
        model: str | os.PathLike,
        params: Mapping[str, Any] | None = None,
        options: Mapping[str, Any] | None = None,
        *,
        staging: str | os.PathLike | None = None,
    ) -> JobSpec:
        """A spec from a loaded subject: one input per timepoint (label maps only for interpolate).

        Timepoints held only in memory (no ``source`` file, e.g. Slicer volumes) are written
        to ``staging`` as NIfTI first; without ``staging`` they are refused.
        """
        inputs = []
        for i, tp in enumerate(subject.timepoints):
            path = tp.source
            if path is None:
                if staging is None or tp.image is None:
                    raise InputError(f"timepoint {tp.describe()}", "has no file; give a staging folder to write it to")
                from .imaging import save_image

                folder = Path(staging)
                folder.mkdir(parents=True, exist_ok=True)
                path = save_image(tp.image, folder / f"input-{i:03d}.nii.gz")
            inputs.append(
                JobInput(
                    str(path),
                    tp.age,
                    tp.modality.value,
                    tp.session,
                    # label maps only serve interpolation (carried along the deformation)
                    None if tp.labels is None or task != "interpolate" else str(tp.labels),
                )
            )
        sid = subject.subject_id if SUBJECT_ID.match(subject.subject_id) else safe_subject_id(subject.subject_id)
        spec = cls(task, str(model), sid, inputs, dict(params or {}), dict(options or {}))
        spec.validate()
        return spec

    @classmethod
    def for_interpolation(
        cls,
        source: str | os.PathLike,
        target: str | os.PathLike,
        n_frames: int,
        model: str | os.PathLike,
        *,
        labels: str | os.PathLike | None = None,
        options: Mapping[str, Any] | None = None,
        subject_id: str = "frames",
    ) -> JobSpec:
        """A spec for ``interpolate`` between two image files (labels: the source's)."""
        inputs = [
            JobInput(str(source), 0.0, "T1w", labels=None if labels is None else str(labels)),
            JobInput(str(target), 0.0, "T1w"),
        ]
        params = {"source": 0, "target": 1, "n_frames": int(n_frames)}
        spec = cls("interpolate", str(model), subject_id, inputs, params, dict(options or {}))
        spec.validate()
        return spec

    # ---------------------------------------------------------------- JSON

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "model": self.model,
            "subject_id": self.subject_id,
            "inputs": [i.to_dict() for i in self.inputs],
            "params": dict(self.params),
            "options": dict(self.options),
        }

    @classmethod
    def from_dict(cls, data: Any) -> JobSpec:
        """Read and :meth:`validate` a spec; :class:`InputError` names the faulty field."""
        if not isinstance(data, Mapping):
            raise InputError("job spec", f"must be a JSON object, not {type(data).__name__}")
        unknown = sorted(set(data) - {"task", "model", "subject_id", "inputs", "params", "options"})
        if unknown:
            raise InputError("job spec", f"unknown field(s) {', '.join(unknown)}")
        for key in ("task", "model", "inputs"):
            if key not in data:
                raise InputError("job spec", f"missing '{key}'")
        raw_inputs = data["inputs"]
        if not isinstance(raw_inputs, list):
            raise InputError("job spec", "'inputs' must be a list")
        inputs = [JobInput.from_dict(x, f"inputs[{i}]") for i, x in enumerate(raw_inputs)]
        params, options = data.get("params") or {}, data.get("options") or {}
        for key, value in (("params", params), ("options", options)):
            if not isinstance(value, Mapping):
                raise InputError("job spec", f"'{key}' must be a JSON object")
        spec = cls(data["task"], data["model"], data.get("subject_id", "subject"), inputs, dict(params), dict(options))
        spec.validate()
        return spec

    # ---------------------------------------------------------------- checks

    def validate(self) -> JobSpec:
        """Check every field (types, ranges, the task's parameters); files are not opened.

        Raises:
            InputError: naming the field and the problem.
        """
        where = "job spec"
        if self.task not in JOB_TASKS:
            raise InputError(where, f"unknown task {self.task!r}; expected one of {', '.join(JOB_TASKS)}")
        if not isinstance(self.model, (str, os.PathLike)) or not str(self.model).strip():
            raise InputError(where, "'model' must be a model name (or the path of a model card)")
        self.model = str(self.model)
        if not isinstance(self.subject_id, str) or not SUBJECT_ID.match(self.subject_id) or ".." in self.subject_id:
            raise InputError(
                where,
                "'subject_id' must be 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit "
                "(no '..')",
            )
        if not isinstance(self.inputs, list) or not self.inputs:
            raise InputError(where, "'inputs' must be a non-empty list of images")
        if len(self.inputs) > MAX_INPUTS:
            raise InputError(where, f"{len(self.inputs)} inputs; at most {MAX_INPUTS} are accepted")
        for i, item in enumerate(self.inputs):
            if not isinstance(item, JobInput):
                raise InputError(f"inputs[{i}]", f"must be a JobInput, not {type(item).__name__}")
            item.check(f"inputs[{i}]")
        self._check_params()
        self._check_options()
        return self

    def _check_params(self) -> None:
        where = f"params of {self.task}"
        p = self.params
        if not isinstance(p, dict):
            raise InputError(where, "must be a JSON object")
        required, optional = _PARAMS[self.task]
        missing = sorted(required - set(p))
        if missing:
            raise InputError(where, f"missing {', '.join(repr(m) for m in missing)}")
        unknown = sorted(set(p) - required - optional)
        if unknown:
            raise InputError(where, f"unknown parameter(s) {', '.join(unknown)}")
        if self.task == "complete-ages":
            ages = p["ages"]
            if not isinstance(ages, list) or not ages:
                raise InputError(where, "'ages' must be a non-empty list of ages in months")
            if len(ages) > MAX_AGES:
                raise InputError(where, f"{len(ages)} ages; at most {MAX_AGES} per job")
            for a in ages:
                if isinstance(a, bool) or not isinstance(a, (int, float)):
                    raise InputError(where, f"age {a!r} is not a number")
                parse_age(a, "months", where)
            if p.get("modality") is not None:
                parse_modality(p["modality"], where)
        elif self.task == "synthesize-modality":
            parse_modality(p["target"], where)
            session = p["session"]
            if isinstance(session, bool) or not isinstance(session, (str, int, float)) or str(session).strip() == "":
                raise InputError(where, "'session' must be a session label or an age in months")
        else:
            for key in ("source", "target"):
                idx = p[key]
                if isinstance(idx, bool) or not isinstance(idx, int) or not 0 <= idx < len(self.inputs):
                    raise InputError(where, f"'{key}' must be an index into inputs (0..{len(self.inputs) - 1})")
            if p["source"] == p["target"]:
                raise InputError(where, "'source' and 'target' are the same input")
            n = p["n_frames"]
            if isinstance(n, bool) or not isinstance(n, int) or not 2 <= n <= MAX_FRAMES:
                raise InputError(where, f"'n_frames' must be an integer from 2 to {MAX_FRAMES}")

    def _check_options(self) -> None:
        where = "options"
        o = self.options
        if not isinstance(o, dict):
            raise InputError(where, "must be a JSON object")
        unknown = sorted(set(o) - set(OPTION_FIELDS))
        if unknown:
            raise InputError(where, f"unknown option(s) {', '.join(unknown)}; known: {', '.join(OPTION_FIELDS)}")
        for key, value in o.items():
            types = OPTION_FIELDS[key]
            if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
                raise InputError(where, f"'{key}' has the wrong type ({type(value).__name__})")
            if isinstance(value, float) and not math.isfinite(value):
                raise InputError(where, f"'{key}' must be finite")
        if o.get("sampler") is not None and o["sampler"] not in SAMPLERS:
            raise InputError(where, f"unknown sampler {o['sampler']!r}; expected one of {', '.join(SAMPLERS)}")
        if o.get("steps") is not None and not 1 <= o["steps"] <= MAX_STEPS:
            raise InputError(where, f"'steps' must lie in 1..{MAX_STEPS}")
        if o.get("eta") is not None and not 0.0 <= o["eta"] <= 1.0:
            raise InputError(where, "'eta' must lie in [0, 1]")
        if "n_samples" in o and not 1 <= o["n_samples"] <= MAX_SAMPLES:
            raise InputError(where, f"'n_samples' must lie in 1..{MAX_SAMPLES}")
        if "capture" in o and not 0 <= o["capture"] <= MAX_CAPTURE:
            raise InputError(where, f"'capture' must lie in 0..{MAX_CAPTURE}")
        if o.get("threads") is not None and not 1 <= o["threads"] <= 1024:
            raise InputError(where, "'threads' must lie in 1..1024")
        if o.get("seed") is not None and not 0 <= o["seed"] <= MAX_SEED:
            raise InputError(where, f"'seed' must lie in 0..{MAX_SEED}")

    def input_files(self) -> list[str]:
        """Every file the job reads: images, then label maps."""
        return [i.path for i in self.inputs] + [i.labels for i in self.inputs if i.labels]


# ----------------------------------------------------------------------------- events


@dataclass
class JobEvent:
    """One thing that happened to a job. ``kind`` is one of :data:`EVENT_KINDS`; progress
    events carry the sampler's ``stage``, ``step``/``total``, ``elapsed`` and ``eta``
    (seconds); ``failed`` events carry the error in ``message``. ``seq`` numbers a job's
    events from 0."""

    job_id: str
    kind: str
    stage: str = ""
    step: int = 0
    total: int = 0
    elapsed: float = 0.0
    eta: float | None = None
    message: str = ""
    seq: int = 0

    @property
    def final(self) -> bool:
        return self.kind in FINAL_KINDS

    @property
    def fraction(self) -> float:
        return self.step / self.total if self.total else (1.0 if self.kind == "done" else 0.0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> JobEvent:
        if not isinstance(data, Mapping) or data.get("kind") not in EVENT_KINDS or "job_id" not in data:
            raise InputError("job event", f"not a job event: {data!r:.200}")
        names = {"job_id", "kind", "stage", "step", "total", "elapsed", "eta", "message", "seq"}
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def from_progress(cls, job_id: str, event: ProgressEvent, seq: int = 0) -> JobEvent:
        """The job event of a progress event; a domain-check warning (stage ``warning``,
        :mod:`.domain`) becomes a ``log`` event whose message starts with "warning: "."""
        if event.stage == "warning":
            return cls(job_id, "log", "warning", message=f"warning: {event.message}", seq=seq)
        return cls(
            job_id, "progress", event.stage, event.step, event.total, event.elapsed, event.eta, event.message, seq
        )


# ----------------------------------------------------------------------------- running


def run_options(spec: JobSpec, progress: ProgressCallback | None = None, cancel: CancelToken | None = None):
    """The :class:`~LongitudinalDiffusionLib.tasks.RunOptions` of a spec."""
    from .tasks import RunOptions

    return RunOptions(**spec.options, progress=progress, cancel=cancel)


def load_subject(spec: JobSpec):
    """The spec's inputs as a :class:`~LongitudinalDiffusionLib.subject.Subject` (images read
    and checked)."""
    from .imaging import load_image
    from .subject import Subject, Timepoint, parse_modality

    timepoints = [
        Timepoint(
            i.age_months,
            parse_modality(i.modality, i.path),
            load_image(i.path),
            Path(i.path),
            i.session,
            None if i.labels is None else Path(i.labels),
        )
        for i in spec.inputs
    ]
    return Subject(spec.subject_id, timepoints)


def run_job(
    spec: JobSpec,
    *,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    model: Any = None,
) -> Result:
    """Run a spec with the library's tasks, in this process. Raises what the task raises
    (:class:`InputError`, :class:`~LongitudinalDiffusionLib.progress.Cancelled`, ...).

    ``model``: the spec's model already loaded (a ``LoadedModel``, e.g. from the warm job
    process's cache); by default it is loaded from ``spec.model``."""
    from .diffusion.threads import job_slot

    with job_slot():  # jobs running at once in this process share its cores
        return _run_job(spec, progress, cancel, model)


def _run_job(spec: JobSpec, progress: ProgressCallback | None, cancel: CancelToken | None, model: Any) -> Result:
    from . import tasks

    spec.validate()
    opts = run_options(spec, progress, cancel)
    p = spec.params
    chosen = spec.model if model is None else model
    if cancel is not None:
        cancel.check("loading")
    if spec.task == "interpolate":
        src, tgt = spec.inputs[p["source"]], spec.inputs[p["target"]]
        return tasks.interpolate_frames(
            src.path, tgt.path, p["n_frames"], chosen, source_labels=src.labels, options=opts
        )
    subject = load_subject(spec)
    if spec.task == "complete-ages":
        return tasks.complete_ages(subject, p["ages"], chosen, modality=p.get("modality"), options=opts)
    return tasks.synthesize_modality(subject, p["session"], p["target"], chosen, options=opts)


# ----------------------------------------------------------------------------- protocol


@runtime_checkable
class Backend(Protocol):
    """Where jobs run. The local backend and the remote worker's client both implement it,
    so a caller does not know which one it has.

    ``poll`` never blocks: it returns the events that arrived since the previous call for
    that job (``queued``, ``started``, ``progress``..., then one of ``done``, ``failed``,
    ``cancelled``). ``result`` raises the job's error if it failed,
    :class:`~LongitudinalDiffusionLib.progress.Cancelled` if it was cancelled and
    :class:`JobNotFinished` while it runs; ``wait`` blocks until the end (for scripts).
    """

    def submit(self, spec: JobSpec) -> str: ...

    def poll(self, job_id: str) -> list[JobEvent]: ...

    def cancel(self, job_id: str) -> None: ...

    def result(self, job_id: str) -> Result: ...

    def wait(self, job_id: str, timeout: float | None = None) -> Result: ...

    def close(self) -> None: ...
