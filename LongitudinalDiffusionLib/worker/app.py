"""The worker's HTTP API (FastAPI). All routes live under ``/v1``; every one but
``/v1/health`` needs ``Authorization: Bearer <token>``.

=========================  ======  ==========================================================
``/v1/health``             GET     liveness, versions (no token)
``/v1/info``               GET     version, devices and GPU memory, limits, models and cards
``/v1/jobs``               POST    submit: multipart ``spec`` (JSON) + ``files`` (NIfTI, gz)
``/v1/jobs``               GET     the jobs on this worker, newest first
``/v1/jobs/{id}``          GET     a job's state, queue position and last progress
``/v1/jobs/{id}/events``   GET     server-sent events (``Last-Event-ID`` / ``after`` resume)
``/v1/jobs/{id}/cancel``   POST    cancel (queued: at once; running: within a sampler step)
``/v1/jobs/{id}/result``   GET     the result folder as a zip (NIfTI, frames, result.json)
``/v1/jobs/{id}``          DELETE  cancel if needed, then delete inputs, result and record
=========================  ======  ==========================================================

In the spec sent with a job, each input's ``path`` (and ``labels``) is ``upload:N``, the
N-th uploaded file; the server stores the files under names it makes itself.
"""

import asyncio
import json
import logging
import re
import shutil
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any, Optional

from fastapi import APIRouter, Depends, FastAPI, File, Form, Header, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..errors import InputError, LongitudinalDiffusionError, ModelNotFound
from ..jobs import FINAL_KINDS, JobExpired, JobInput, JobSpec, UnknownJob
from . import API_VERSION
from .guard import USER_KEY, Guard
from .hub import EventHub
from .problems import data_folder_problem, storage_problem, validation_message
from .settings import Settings
from .state import WorkerState
from .store import Store
from .uploads import UploadRejected, store_upload
from .users import Audit, User, Users

log = logging.getLogger(__name__)

UPLOAD_REF = re.compile(r"^upload:(\d{1,4})\Z")
JOB_ID = re.compile(r"^[0-9a-f]{32}\Z")
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}\Z")
#: an idle event stream sends a comment this often (proxies and clients see it is alive)
KEEPALIVE_SECONDS = 15.0


class InputForm(BaseModel):
    """One input of a submitted job spec, as sent (types checked strictly: no "3" for 3)."""

    # Optional: pydantic evaluates these annotations, and Python 3.9 has no "X | None"
    model_config = ConfigDict(extra="forbid", strict=True)

    path: str
    age_months: float
    modality: str
    session: Optional[str] = None
    labels: Optional[str] = None


class SpecForm(BaseModel):
    """The ``spec`` form field of ``POST /v1/jobs``: the shape of a job spec. The values
    (task names, ranges, the task's parameters) are checked by :meth:`JobSpec.validate`."""

    model_config = ConfigDict(extra="forbid", strict=True)

    task: str
    model: str
    subject_id: str = "subject"
    inputs: list[InputForm]
    params: Optional[dict[str, Any]] = None
    options: Optional[dict[str, Any]] = None

    def to_spec(self) -> JobSpec:
        inputs = [JobInput(**item.model_dump()) for item in self.inputs]
        params, options = dict(self.params or {}), dict(self.options or {})
        return JobSpec(self.task, self.model, self.subject_id, inputs, params, options).validate()


def spec_problem(exc: ValidationError) -> str:
    """The first problem of a spec's shape as one line: 'where: what' (and how many more)."""
    errors = exc.errors()
    first = errors[0]
    loc = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in first["loc"]).lstrip(".")
    kind = first["type"]
    if kind == "model_type" and not loc:
        what = "job spec", "must be a JSON object"
    elif kind == "missing":
        what = loc.rpartition(".")[0] or "job spec", f"missing '{loc.rpartition('.')[2]}'"
    elif kind == "extra_forbidden":
        what = loc.rpartition(".")[0] or "job spec", f"unknown field '{loc.rpartition('.')[2]}'"
    else:
        what = loc or "job spec", str(first["msg"]).splitlines()[0]
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return f"{what[0]}: {what[1]}{more}"


class Problem(BaseModel):
    """Every error answer: one line, no traceback, no server path."""

    detail: str


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for the error statuses a route can answer."""
    meaning = {
        400: "malformed job spec or request",
        401: "missing or wrong access token",
        404: "no such job (never submitted, deleted, or another user's)",
        409: "the job has no result (yet)",
        410: "the job expired: it and its result were deleted",
        413: "request, file, image or capture too large",
        422: "unusable image, unknown model or invalid parameter",
        429: "too many open event streams",
        507: "the worker cannot write its data folder",
    }
    return {c: {"model": Problem, "description": meaning[c]} for c in (401, 422, 507, *codes)}


class WorkerError(Exception):
    """An error answered as ``{"detail": message}`` with ``status``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


# ----------------------------------------------------------------------------- event push


class CountedStream(StreamingResponse):
    """A streaming response that gives its slot back however it ends (finished, cut, never started)."""

    def __init__(self, content: Any, release: Any, **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._release = release

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


# ----------------------------------------------------------------------------- application


def create_app(settings: Settings) -> FastAPI:
    """The worker application for ``settings`` (nothing is read from the environment here)."""
    users = Users(settings.users_path, settings.token)
    if not len(users):
        log.warning("no users and no token: every request but /v1/health is refused "
                    "(add one with `longdiff-worker token add NAME`)")  # fmt: skip
    app = FastAPI(
        title="LongitudinalDiffusion worker",
        version=API_VERSION,
        description="Runs LongitudinalDiffusion jobs (complete missing ages, synthesise a missing modality, "
        "interpolate frames) for Slicer panels and the longdiff command line.",
        lifespan=_lifespan,
        openapi_url=None,  # served under /v1 behind the token instead
        docs_url=None,
        redoc_url=None,
    )
    app.state.worker = WorkerState(settings, users)
    app.add_middleware(Guard, limit=settings.max_upload_bytes, users=users, body_timeout=settings.body_timeout)
    for kind, handler in EXCEPTION_HANDLERS:
        app.add_exception_handler(kind, handler)
    app.include_router(public)
    app.include_router(api)
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Opens the store, starts the runner (embedded or Celery) and stops and closes them at the end."""
    state: WorkerState = app.state.worker
    settings = state.settings
    store = Store(settings.data)
    hub = EventHub(asyncio.get_running_loop())
    store.listeners.append(hub.notify)
    from .runner import CeleryDispatcher, EmbeddedRunner  # the engine (torch): only when the worker starts

    runner: EmbeddedRunner | CeleryDispatcher
    if settings.broker:
        runner = CeleryDispatcher(store, settings.broker, settings.expiry_hours, settings.expiry_sweep_seconds)
    else:
        interrupted = store.recover()
        for job_id in interrupted:
            log.warning("job %s was running when the worker stopped: marked failed", job_id)
        runner = EmbeddedRunner(store, settings.devices, settings.expiry_hours, settings.expiry_sweep_seconds)
    runner.start()
    state.store, state.runner, state.hub, state.audit = store, runner, hub, Audit(settings.data)
    try:
        yield
    finally:
        runner.stop()
        store.listeners.remove(hub.notify)
        store.close()


# ----------------------------------------------------------------------------- error answers


async def _worker_error(request: Request, exc: WorkerError) -> JSONResponse:
    return JSONResponse({"detail": exc.message}, status_code=exc.status, headers=exc.headers)


async def _unknown(request: Request, exc: UnknownJob) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=410 if isinstance(exc, JobExpired) else 404)


async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse({"detail": validation_message(exc)}, status_code=422)


async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
    return JSONResponse({"detail": " ".join(detail.split())}, status_code=exc.status_code, headers=exc.headers)


async def _os_error(request: Request, exc: OSError) -> JSONResponse:
    problem = storage_problem(exc)
    if problem is None:
        log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"detail": "internal error of the worker (see its log)"}, status_code=500)
    log.error("%s %s: %s", request.method, request.url.path, exc)
    return JSONResponse({"detail": problem}, status_code=507)


async def _db_error(request: Request, exc: sqlite3.Error) -> JSONResponse:
    problem = storage_problem(exc)
    log.error("%s %s: %s", request.method, request.url.path, exc, exc_info=problem is None)
    if problem is None:
        return JSONResponse({"detail": "internal error of the worker's job database (see its log)"}, 500)
    return JSONResponse({"detail": problem}, status_code=507)


async def _crash(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": "internal error of the worker (see its log)"}, status_code=500)


#: (exception class, handler) in the order create_app installs them
EXCEPTION_HANDLERS: list[tuple[type[Exception], Any]] = [
    (WorkerError, _worker_error),
    (UnknownJob, _unknown),
    (RequestValidationError, _invalid),
    (StarletteHTTPException, _http),
    (OSError, _os_error),
    (sqlite3.Error, _db_error),
    (Exception, _crash),
]


# ----------------------------------------------------------------------------- dependencies


bearer = HTTPBearer(auto_error=False, description="the worker's access token")


def authorized(request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> User:
    # the Guard has read the header and found the user: the dependency declares the
    # security in the OpenAPI description and makes sure no route runs without a user
    user = request.scope.get(USER_KEY)
    if user is None:
        raise WorkerError(401, "missing access token (send 'Authorization: Bearer <token>')",
                          {"WWW-Authenticate": "Bearer"})  # fmt: skip
    return user


def worker_state(request: Request) -> WorkerState:
    """The state of the application serving ``request`` (see :func:`create_app`)."""
    return request.app.state.worker


Caller = Annotated[User, Depends(authorized)]
State = Annotated[WorkerState, Depends(worker_state)]


def owner(user: User) -> str | None:
    return None if user.admin else user.name


def job_of(state: WorkerState, job_id: str, user: User) -> dict[str, Any]:
    """The job's record if ``user`` may see it (else 404, as if it did not exist)."""
    if not JOB_ID.match(job_id):
        raise WorkerError(404, f"no job {job_id[:40]!r} on this worker (malformed id)")
    return state.store.get(job_id, owner(user))


# ----------------------------------------------------------------------------- routes

public = APIRouter(prefix="/v1", tags=["health"])

UNWRITABLE: dict[int | str, dict[str, Any]] = {
    503: {"model": Problem, "description": "the worker cannot write its data folder"}
}


@public.get("/health", summary="Liveness and versions (no token needed)", responses=UNWRITABLE)
async def health(state: State) -> JSONResponse:
    checked, problem = state.health
    if time.monotonic() - checked > 1.0:  # at most one probe a second, whatever the load
        problem = data_folder_problem(state.settings.data)
        state.health = (time.monotonic(), problem)
    body: dict[str, Any] = {"status": "ok", "version": __version__, "api_version": API_VERSION}
    if problem:
        body.update(status="error", detail=problem)
        return JSONResponse(body, status_code=503)
    return JSONResponse(body)


api = APIRouter(prefix="/v1", dependencies=[Depends(authorized)])

JOB_ERRORS = _errors(404, 410)


@api.get("/info", tags=["info"], summary="Version, devices, GPU memory, limits, models and their cards",
         responses=_errors())  # fmt: skip
def info(user: Caller, state: State) -> dict[str, Any]:
    return _info(state, user)


@api.get("/openapi.json", tags=["info"], summary="This API's OpenAPI description", responses=_errors())
def openapi(request: Request) -> dict[str, Any]:
    return request.app.openapi()


@api.post("/jobs", status_code=202, tags=["jobs"], summary="Submit a job: its spec and input images",
          responses=_errors(400, 413))  # fmt: skip
def submit(
    user: Caller,
    spec: Annotated[str, Form(description="the job spec (JSON); input paths are 'upload:N'")],
    files: Annotated[list[UploadFile], File(description="the input images (NIfTI, gzip welcome)")],
    state: State,
) -> dict[str, Any]:
    return _submit(state, spec, files, user)


@api.get("/jobs", tags=["jobs"], summary="The jobs on this worker (yours; an admin's: all), newest first",
         responses=_errors())  # fmt: skip
def jobs(user: Caller, state: State, limit: Annotated[int, Query(ge=1, le=10000)] = 1000) -> list[dict[str, Any]]:
    return state.store.list(limit, owner(user))


@api.get("/jobs/{job_id}", tags=["jobs"], summary="A job's state, queue position and last progress",
         responses=JOB_ERRORS)  # fmt: skip
def status(job_id: str, user: Caller, state: State) -> dict[str, Any]:
    job_of(state, job_id, user)
    return state.store.status(job_id, owner(user))


@api.get(
    "/jobs/{job_id}/events",
    tags=["jobs"],
    summary="Server-sent events of a job, from the start or after an event id",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}, **_errors(404, 410, 429)},
)
async def events(
    job_id: str,
    user: Caller,
    state: State,
    after: Annotated[int, Query(ge=-1, le=2**62)] = -1,
    last_event_id: Annotated[str | None, Header()] = None,
) -> StreamingResponse:
    job_of(state, job_id, user)
    if last_event_id and last_event_id.isdigit() and len(last_event_id) < 18:
        after = max(after, int(last_event_id))
    release = _take_stream(state, user)
    return CountedStream(
        _stream(state.store, state.hub, job_id, after, owner(user)),
        release,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _take_stream(state: WorkerState, user: User) -> Callable[[], None]:
    """Counts one more open event stream of ``user`` (429 over a limit); gives back its release."""
    settings, streams = state.settings, state.streams
    retry = {"Retry-After": "5"}
    if sum(streams.values()) >= settings.max_streams:
        raise WorkerError(429, f"this worker has {settings.max_streams} event streams open, its limit; "
                          "try again later", retry)  # fmt: skip
    if streams.get(user.name, 0) >= settings.max_streams_per_user:
        raise WorkerError(429, f"you have {settings.max_streams_per_user} event streams open on this worker, "
                          "its limit per user; close one first", retry)  # fmt: skip
    streams[user.name] = streams.get(user.name, 0) + 1

    def release() -> None:
        streams[user.name] -= 1
        if not streams[user.name]:
            del streams[user.name]

    return release


@api.post("/jobs/{job_id}/cancel", status_code=202, tags=["jobs"], summary="Cancel a job", responses=JOB_ERRORS)
def cancel(job_id: str, user: Caller, state: State) -> dict[str, Any]:
    if job_of(state, job_id, user)["state"] not in FINAL_KINDS:
        state.runner.cancel(job_id)
    state.audit(user, "cancel", job_id)
    return state.store.status(job_id)


@api.get(
    "/jobs/{job_id}/result",
    tags=["jobs"],
    summary="The result as a zip: NIfTI images, frames, result.json",
    response_class=FileResponse,
    responses={200: {"content": {"application/zip": {}}}, **_errors(404, 409, 410)},
)
def result(job_id: str, user: Caller, state: State) -> FileResponse:
    row = job_of(state, job_id, user)
    if row["state"] != "done":
        why = f": {row['message']}" if row["message"] else ""
        raise WorkerError(409, f"job {job_id} has no result: it is {row['state']}{why}")
    path = state.store.result_zip(job_id)
    if not path.is_file():
        raise WorkerError(410, f"the result of job {job_id} is gone from the worker's disk")
    state.audit(user, "download", job_id)
    return FileResponse(path, media_type="application/zip", filename=f"{job_id}.zip")


@api.delete("/jobs/{job_id}", status_code=204, tags=["jobs"], summary="Cancel if needed, then delete",
            responses=JOB_ERRORS)  # fmt: skip
def delete(job_id: str, user: Caller, state: State) -> Response:
    if job_of(state, job_id, user)["state"] not in FINAL_KINDS:
        state.runner.cancel(job_id)
    state.store.delete(job_id)
    state.audit(user, "delete", job_id)
    return Response(status_code=204)


# ----------------------------------------------------------------------------- handlers


def _info(state: WorkerState, user: User) -> dict[str, Any]:
    import torch

    from ..catalog import list_models
    from ..diffusion.device import describe_device

    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            gpus.append(
                {
                    "index": i,
                    "name": torch.cuda.get_device_name(i),
                    "memory_total_mb": total // 2**20,
                    "memory_free_mb": free // 2**20,
                }
            )
    settings = state.settings
    devices = list(getattr(state.runner, "devices", ()))
    return {
        "version": __version__,
        "api_version": API_VERSION,
        "mode": "celery" if settings.broker else "embedded",
        "devices": [{"device": d, "description": describe_device(torch.device(d))} for d in devices],
        "gpus": gpus,
        "user": {"name": user.name, "admin": user.admin},
        "limits": {
            "max_upload_mb": settings.max_upload_mb,
            "max_file_mb": settings.max_file_mb,
            "max_job_mb": settings.max_job_mb,
            "max_voxels": settings.max_voxels,
            "max_dim": settings.max_dim,
            "max_inputs": settings.max_inputs,
            "max_capture": settings.max_capture,
            "max_streams_per_user": settings.max_streams_per_user,
            "max_streams": settings.max_streams,
            "expiry_hours": settings.expiry_hours,
        },
        "jobs": state.store.counts(None if user.admin else user.name),
        "models": [{"name": m.name, "method": m.method, "trained": m.trained, "card": m.card} for m in list_models()],
    }


def _submit(state: WorkerState, text: str, files: list[UploadFile], user: User) -> dict[str, Any]:
    settings, store = state.settings, state.store
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise WorkerError(400, f"job spec is not valid JSON ({exc})") from exc
    except RecursionError:
        # the cause is a traceback as deep as the nesting: noise in the worker's log
        raise WorkerError(400, "job spec is not valid JSON (nested too deeply)") from None
    try:
        spec = SpecForm.model_validate(data).to_spec()
    except ValidationError as exc:
        raise WorkerError(400, f"invalid job spec: {spec_problem(exc)}") from exc
    except InputError as exc:
        raise WorkerError(400, f"invalid job spec: {exc}") from exc
    refs = [("path", i, item.path) for i, item in enumerate(spec.inputs)]
    refs += [("labels", i, item.labels) for i, item in enumerate(spec.inputs) if item.labels]
    if len(files) > settings.max_inputs:
        raise WorkerError(413, f"{len(files)} files; this worker takes at most {settings.max_inputs} per job")
    used: dict[int, str] = {}
    numbers: dict[str, int] = {}  # the file number each checked 'upload:N' reference names
    for key, i, ref in refs:
        m = UPLOAD_REF.match(ref)
        if not m:
            raise WorkerError(400, f"invalid job spec: inputs[{i}].{key} must name an uploaded file ('upload:N')")
        n = numbers[ref] = int(m.group(1))
        if n >= len(files):
            raise WorkerError(400, f"invalid job spec: inputs[{i}].{key} refers to file {n}; {len(files)} were sent")
        used[n] = key
    unused = sorted(set(range(len(files))) - set(used))
    if unused:
        raise WorkerError(400, f"uploaded file(s) {unused} are not used by the job spec")
    capture = spec.options.get("capture", 0)
    if capture > settings.max_capture:
        raise WorkerError(413, f"capture of {capture} frames; this worker captures at most {settings.max_capture}")
    _check_model(spec)
    job_id = store.new_id()
    folder = store.job_dir(job_id)
    folder.mkdir(parents=True)
    per_file, per_job = int(settings.max_file_mb * 2**20), int(settings.max_job_mb * 2**20)
    left = per_job
    try:
        for n in sorted(used):
            dest = folder / f"input-{n:03d}.nii.gz"
            upload = files[n]
            upload.file.seek(0)
            if left < per_file:
                cap, budget = left, f" per job ({settings.max_job_mb:g} MB; {left / 2**20:.1f} MB left for it)"
            else:
                cap, budget = per_file, " per file"
            left -= store_upload(
                upload.file,
                dest,
                f"file {n}",
                max_voxels=settings.max_voxels,
                max_dim=settings.max_dim,
                labels=used[n] == "labels",
                max_bytes=cap,
                budget=budget,
            )
        rel = f"jobs/{job_id}"
        for item in spec.inputs:
            item.path = f"{rel}/input-{numbers[item.path]:03d}.nii.gz"
            if item.labels:
                item.labels = f"{rel}/input-{numbers[item.labels]:03d}.nii.gz"
        store.add(job_id, spec, user.name)
    except UploadRejected as exc:
        shutil.rmtree(folder, ignore_errors=True)
        raise WorkerError(exc.status, f"rejected upload: {exc}") from exc
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    state.runner.submitted(job_id)
    state.audit(user, "submit", job_id, task=spec.task, model=spec.model, files=len(files))
    return store.status(job_id)


def _check_model(spec: JobSpec) -> None:
    from ..catalog import find_model
    from ..models import method_task

    if not MODEL_NAME.match(spec.model):
        raise WorkerError(422, f"model {spec.model[:80]!r}: give the name of a model installed on this worker")
    try:
        card = find_model(spec.model)
    except ModelNotFound as exc:  # the folders searched are the worker's own business
        installed = ", ".join(exc.installed) or "none"
        raise WorkerError(422, f"no model named '{exc.name}' on this worker (installed: {installed})") from exc
    except InputError as exc:
        raise WorkerError(422, str(exc) + _installed()) from exc
    try:
        task = method_task(card.method)
    except LongitudinalDiffusionError as exc:
        raise WorkerError(422, f"model {spec.model!r} has an unknown method {card.method!r}") from exc
    if task != spec.task:
        raise WorkerError(422, f"model {spec.model!r} is for '{task}', not for '{spec.task}'")


def _installed() -> str:
    from ..catalog import list_models

    names = ", ".join(m.name for m in list_models()) or "none"
    return f" on this worker (installed: {names})"


async def _stream(store: Store, hub: EventHub, job_id: str, after: int, owner: str | None) -> AsyncIterator[bytes]:
    """The job's events as server-sent events, woken by the store's news of the job (no polling)."""
    wake = hub.subscribe(job_id)
    try:
        while True:
            wake.clear()  # before reading: news that comes while reading is not lost
            try:
                events = store.events(job_id, after)
                if not events:
                    store.get(job_id, owner)  # deleted or expired meanwhile: end (a reconnect gets 404/410)
            except (UnknownJob, JobExpired):
                return
            except Exception:
                log.exception("event stream of job %s ended on an error", job_id)
                return
            for e in events:
                after = e.seq
                yield f"id: {e.seq}\nevent: {e.kind}\ndata: {json.dumps(e.to_dict())}\n\n".encode()
                if e.kind in FINAL_KINDS:
                    return
            if events:
                continue
            try:
                await asyncio.wait_for(wake.wait(), KEEPALIVE_SECONDS)
            except asyncio.TimeoutError:
                yield b": keep-alive\n\n"
    finally:
        hub.unsubscribe(job_id, wake)
