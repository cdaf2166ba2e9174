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
import hmac
import json
import logging
import re
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, File, Form, Header, Query, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel

from .. import __version__
from ..errors import InputError
from ..jobs import FINAL_KINDS, JobExpired, JobSpec, UnknownJob
from . import API_VERSION
from .settings import Settings
from .store import Store
from .uploads import UploadRejected, store_upload

log = logging.getLogger(__name__)

UPLOAD_REF = re.compile(r"^upload:(\d{1,4})$")
JOB_ID = re.compile(r"^[0-9a-f]{32}$")
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")


class Problem(BaseModel):
    """Every error answer: one line, no traceback, no server path."""

    detail: str


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for the error statuses a route can answer."""
    meaning = {
        400: "malformed job spec",
        401: "missing or wrong access token",
        404: "no such job (never submitted or deleted)",
        409: "the job has no result (yet)",
        410: "the job expired: it and its result were deleted",
        413: "request, file or image too large",
        422: "unusable image or unknown model",
    }
    return {c: {"model": Problem, "description": meaning[c]} for c in (401, *codes)}


class WorkerError(Exception):
    """An error answered as ``{"detail": message}`` with ``status``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


# ----------------------------------------------------------------------------- front door


PUBLIC_PATHS = frozenset({"/v1/health"})


def token_ok(header: bytes | None, token: str) -> bool:
    """Whether an ``Authorization`` header carries ``token`` (constant-time comparison)."""
    if not header:
        return False
    scheme, _, value = header.partition(b" ")
    if scheme.lower() != b"bearer":
        return False
    return hmac.compare_digest(value.strip(), token.encode())


class Guard:
    """The worker's front door, before any route runs or any body byte is read.

    * Every path but ``/v1/health`` needs the bearer token: a request without it gets 401
      at once, so an unauthenticated client cannot make the worker receive, parse or
      spool an upload.
    * Request bodies over the limit get 413: by ``Content-Length`` at once, and while
      streaming (chunked uploads) as soon as the limit is passed - the application then
      sees a disconnected client and whatever it would answer is dropped.
    """

    def __init__(self, app: Any, limit: int, token: str) -> None:
        self.app, self.limit, self.token = app, limit, token

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if scope.get("path") not in PUBLIC_PATHS and not token_ok(headers.get(b"authorization"), self.token):
            problem = "wrong access token" if headers.get(b"authorization") else "missing access token"
            detail = f"{problem} (send 'Authorization: Bearer <token>')"
            return await _send_json(send, 401, detail, [(b"www-authenticate", b"Bearer")])
        message = f"request body exceeds this worker's upload limit of {self.limit / 2**20:g} MB"
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await _send_json(send, 413, message)
        seen, started, refused = 0, False, False

        async def limited() -> dict:
            nonlocal seen, refused
            if refused:
                return {"type": "http.disconnect"}
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    if not started:
                        await _send_json(send, 413, message)
                    refused = True
                    return {"type": "http.disconnect"}
            return msg

        async def guarded_send(msg: dict) -> None:
            nonlocal started
            if refused:
                return  # the 413 has been answered; the application's reply goes nowhere
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        await self.app(scope, limited, guarded_send)


async def _send_json(send: Any, status: int, message: str, extra: list | None = None) -> None:
    body = json.dumps({"detail": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += extra or []
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# ----------------------------------------------------------------------------- application


def create_app(settings: Settings) -> FastAPI:
    """The worker application for ``settings`` (nothing is read from the environment here)."""
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = Store(settings.data)
        if settings.broker:
            from .runner import CeleryDispatcher

            runner: Any = CeleryDispatcher(store, settings.broker, settings.expiry_hours, settings.expiry_sweep_seconds)
        else:
            from .runner import EmbeddedRunner

            interrupted = store.recover()
            for job_id in interrupted:
                log.warning("job %s was running when the worker stopped: marked failed", job_id)
            runner = EmbeddedRunner(store, settings.devices, settings.expiry_hours, settings.expiry_sweep_seconds)
        runner.start()
        state.update(store=store, runner=runner)
        try:
            yield
        finally:
            runner.stop()
            store.close()

    app = FastAPI(
        title="LongitudinalDiffusion worker",
        version=API_VERSION,
        description="Runs LongitudinalDiffusion jobs (complete missing ages, synthesise a missing modality, "
        "interpolate frames) for Slicer panels and the longdiff command line.",
        lifespan=lifespan,
        openapi_url=None,  # served under /v1 behind the token instead
        docs_url=None,
        redoc_url=None,
    )
    app.add_middleware(Guard, limit=settings.max_upload_bytes, token=settings.token)

    @app.exception_handler(WorkerError)
    async def _worker_error(request: Request, exc: WorkerError) -> JSONResponse:
        return JSONResponse({"detail": exc.message}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(UnknownJob)
    async def _unknown(request: Request, exc: UnknownJob) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=410 if isinstance(exc, JobExpired) else 404)

    bearer = HTTPBearer(auto_error=False, description="the worker's access token")

    def authorized(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
        challenge = {"WWW-Authenticate": "Bearer"}
        if credentials is None or credentials.scheme.lower() != "bearer":
            raise WorkerError(401, "missing access token (send 'Authorization: Bearer <token>')", challenge)
        # checked again here (the Guard already did): the route's security is then declared
        # in the OpenAPI description, and a route can never be reached without the token
        if not hmac.compare_digest(credentials.credentials.encode(), settings.token.encode()):
            raise WorkerError(401, "wrong access token", challenge)

    def store() -> Store:
        return state["store"]

    def job_id_ok(job_id: str) -> str:
        if not JOB_ID.match(job_id):
            raise WorkerError(404, f"no job {job_id[:40]!r} on this worker (malformed id)")
        return job_id

    public = APIRouter(prefix="/v1", tags=["health"])

    @public.get("/health", summary="Liveness and versions (no token needed)")
    def health() -> dict[str, Any]:
        return {"status": "ok", "version": __version__, "api_version": API_VERSION}

    api = APIRouter(prefix="/v1", dependencies=[Depends(authorized)])

    job_errors = _errors(404, 410)

    @api.get("/info", tags=["info"], summary="Version, devices, GPU memory, limits, models and their cards",
             responses=_errors())  # fmt: skip
    def info() -> dict[str, Any]:
        return _info(settings, state)

    @api.get("/openapi.json", tags=["info"], summary="This API's OpenAPI description", responses=_errors())
    def openapi() -> dict[str, Any]:
        return app.openapi()

    @api.post("/jobs", status_code=202, tags=["jobs"], summary="Submit a job: its spec and input images",
              responses=_errors(400, 413, 422))  # fmt: skip
    def submit(
        spec: Annotated[str, Form(description="the job spec (JSON); input paths are 'upload:N'")],
        files: Annotated[list[UploadFile], File(description="the input images (NIfTI, gzip welcome)")],
    ) -> dict[str, Any]:
        return _submit(settings, state, spec, files)

    @api.get("/jobs", tags=["jobs"], summary="The jobs on this worker, newest first", responses=_errors())
    def jobs(limit: Annotated[int, Query(ge=1, le=10000)] = 1000) -> list[dict[str, Any]]:
        return store().list(limit)

    @api.get("/jobs/{job_id}", tags=["jobs"], summary="A job's state, queue position and last progress",
             responses=job_errors)  # fmt: skip
    def status(job_id: str) -> dict[str, Any]:
        return store().status(job_id_ok(job_id))

    @api.get(
        "/jobs/{job_id}/events",
        tags=["jobs"],
        summary="Server-sent events of a job, from the start or after an event id",
        response_class=StreamingResponse,
        responses={200: {"content": {"text/event-stream": {}}}, **job_errors},
    )
    async def events(
        job_id: str,
        request: Request,
        after: Annotated[int, Query(ge=-1, le=2**62)] = -1,
        last_event_id: Annotated[str | None, Header()] = None,
    ) -> StreamingResponse:
        job_id_ok(job_id)
        store().get(job_id)
        if last_event_id and last_event_id.isdigit() and len(last_event_id) < 18:
            after = max(after, int(last_event_id))
        return StreamingResponse(
            _stream(store(), job_id, after, request),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @api.post("/jobs/{job_id}/cancel", status_code=202, tags=["jobs"], summary="Cancel a job", responses=job_errors)
    def cancel(job_id: str) -> dict[str, Any]:
        job_id_ok(job_id)
        if store().get(job_id)["state"] not in FINAL_KINDS:
            state["runner"].cancel(job_id)
        return store().status(job_id)

    @api.get(
        "/jobs/{job_id}/result",
        tags=["jobs"],
        summary="The result as a zip: NIfTI images, frames, result.json",
        response_class=FileResponse,
        responses={200: {"content": {"application/zip": {}}}, **_errors(404, 409, 410)},
    )
    def result(job_id: str) -> FileResponse:
        row = store().get(job_id_ok(job_id))
        if row["state"] != "done":
            why = f": {row['message']}" if row["message"] else ""
            raise WorkerError(409, f"job {job_id} has no result: it is {row['state']}{why}")
        path = store().result_zip(job_id)
        if not path.is_file():
            raise WorkerError(410, f"the result of job {job_id} is gone from the worker's disk")
        return FileResponse(path, media_type="application/zip", filename=f"{job_id}.zip")

    @api.delete("/jobs/{job_id}", status_code=204, tags=["jobs"], summary="Cancel if needed, then delete",
                responses=job_errors)  # fmt: skip
    def delete(job_id: str) -> Response:
        job_id_ok(job_id)
        if store().get(job_id)["state"] not in FINAL_KINDS:
            state["runner"].cancel(job_id)
        store().delete(job_id)
        return Response(status_code=204)

    app.include_router(public)
    app.include_router(api)
    return app


# ----------------------------------------------------------------------------- handlers


def _info(settings: Settings, state: dict[str, Any]) -> dict[str, Any]:
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
    runner = state["runner"]
    devices = list(getattr(runner, "devices", ()))
    return {
        "version": __version__,
        "api_version": API_VERSION,
        "mode": "celery" if settings.broker else "embedded",
        "devices": [{"device": d, "description": describe_device(torch.device(d))} for d in devices],
        "gpus": gpus,
        "limits": {
            "max_upload_mb": settings.max_upload_mb,
            "max_voxels": settings.max_voxels,
            "max_dim": settings.max_dim,
            "max_inputs": settings.max_inputs,
            "expiry_hours": settings.expiry_hours,
        },
        "jobs": state["store"].counts(),
        "models": [{"name": m.name, "method": m.method, "trained": m.trained, "card": m.card} for m in list_models()],
    }


def _submit(settings: Settings, state: dict[str, Any], text: str, files: list[UploadFile]) -> dict[str, Any]:
    store: Store = state["store"]
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise WorkerError(400, f"job spec is not valid JSON ({exc})") from None
    except RecursionError:
        raise WorkerError(400, "job spec is not valid JSON (nested too deeply)") from None
    try:
        spec = JobSpec.from_dict(data)
    except InputError as exc:
        raise WorkerError(400, f"invalid job spec: {exc}") from None
    refs = [("path", i, item.path) for i, item in enumerate(spec.inputs)]
    refs += [("labels", i, item.labels) for i, item in enumerate(spec.inputs) if item.labels]
    if len(files) > settings.max_inputs:
        raise WorkerError(413, f"{len(files)} files; this worker takes at most {settings.max_inputs} per job")
    used: dict[int, str] = {}
    for key, i, ref in refs:
        m = UPLOAD_REF.match(ref)
        if not m:
            raise WorkerError(400, f"invalid job spec: inputs[{i}].{key} must name an uploaded file ('upload:N')")
        n = int(m.group(1))
        if n >= len(files):
            raise WorkerError(400, f"invalid job spec: inputs[{i}].{key} refers to file {n}; {len(files)} were sent")
        used[n] = key
    unused = sorted(set(range(len(files))) - set(used))
    if unused:
        raise WorkerError(400, f"uploaded file(s) {unused} are not used by the job spec")
    _check_model(spec)
    job_id = store.new_id()
    folder = store.job_dir(job_id)
    folder.mkdir(parents=True)
    try:
        for n in sorted(used):
            dest = folder / f"input-{n:03d}.nii"
            upload = files[n]
            upload.file.seek(0)
            store_upload(
                upload.file,
                dest,
                f"file {n}",
                max_voxels=settings.max_voxels,
                max_dim=settings.max_dim,
                labels=used[n] == "labels",
            )
        rel = f"jobs/{job_id}"
        for item in spec.inputs:
            item.path = f"{rel}/input-{int(UPLOAD_REF.match(item.path).group(1)):03d}.nii"
            if item.labels:
                item.labels = f"{rel}/input-{int(UPLOAD_REF.match(item.labels).group(1)):03d}.nii"
        store.add(job_id, spec)
    except UploadRejected as exc:
        shutil.rmtree(folder, ignore_errors=True)
        raise WorkerError(exc.status, f"rejected upload: {exc}") from None
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    state["runner"].submitted(job_id)
    log.info("job %s queued: %s with %s, %d file(s)", job_id, spec.task, spec.model, len(files))
    return store.status(job_id)


def _check_model(spec: JobSpec) -> None:
    from ..catalog import find_model
    from ..models import method_task

    if not MODEL_NAME.match(spec.model):
        raise WorkerError(422, f"model {spec.model[:80]!r}: give the name of a model installed on this worker")
    try:
        card = find_model(spec.model)
    except InputError as exc:
        raise WorkerError(422, str(exc).split(" (installed models")[0] + _installed()) from None
    try:
        task = method_task(card.method)
    except Exception:
        raise WorkerError(422, f"model {spec.model!r} has an unknown method {card.method!r}") from None
    if task != spec.task:
        raise WorkerError(422, f"model {spec.model!r} is for '{task}', not for '{spec.task}'")


def _installed() -> str:
    from ..catalog import list_models

    names = ", ".join(m.name for m in list_models()) or "none"
    return f" on this worker (installed: {names})"


async def _stream(store: Store, job_id: str, after: int, request: Request) -> AsyncIterator[bytes]:
    idle = 0.0
    while True:
        try:
            events = store.events(job_id, after)
            if not events:
                store.get(job_id)  # deleted or expired meanwhile: end the stream (a reconnect gets 404/410)
        except Exception:
            return
        for e in events:
            after = e.seq
            yield f"id: {e.seq}\nevent: {e.kind}\ndata: {json.dumps(e.to_dict())}\n\n".encode()
            if e.kind in FINAL_KINDS:
                return
        if events:
            idle = 0.0
        elif idle >= 15.0:
            idle = 0.0
            yield b": keep-alive\n\n"
        if await request.is_disconnected():
            return
        await asyncio.sleep(0.1)
        idle += 0.1
