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

from .. import __version__
from ..errors import InputError
from ..jobs import FINAL_KINDS, JobSpec, UnknownJob
from . import API_VERSION
from .settings import Settings
from .store import Store
from .uploads import UploadRejected, store_upload

log = logging.getLogger(__name__)

UPLOAD_REF = re.compile(r"^upload:(\d{1,4})$")
JOB_ID = re.compile(r"^[0-9a-f]{32}$")
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")


class WorkerError(Exception):
    """An error answered as ``{"detail": message}`` with ``status``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


# ----------------------------------------------------------------------------- middleware


class BodyLimit:
    """Refuse request bodies over the limit (413) - by Content-Length at once, and while
    streaming for chunked uploads - before anything is parsed or stored."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = f"request body exceeds this worker's upload limit of {self.limit / 2**20:g} MB"
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await _send_json(send, 413, message)
        seen, sent = 0, False

        async def limited() -> dict:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge(message)
            return msg

        async def tracking_send(msg: dict) -> None:
            nonlocal sent
            if msg["type"] == "http.response.start":
                sent = True
            await send(msg)

        try:
            await self.app(scope, limited, tracking_send)
        except _TooLarge:
            if not sent:
                await _send_json(send, 413, message)


class _TooLarge(Exception):
    pass


async def _send_json(send: Any, status: int, message: str) -> None:
    body = json.dumps({"detail": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
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

            runner: Any = CeleryDispatcher(store, settings.broker, settings.expiry_hours)
        else:
            from .runner import EmbeddedRunner

            interrupted = store.recover()
            for job_id in interrupted:
                log.warning("job %s was running when the worker stopped: marked failed", job_id)
            runner = EmbeddedRunner(store, settings.devices, settings.expiry_hours)
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
    app.add_middleware(BodyLimit, limit=settings.max_upload_bytes)

    @app.exception_handler(WorkerError)
    async def _worker_error(request: Request, exc: WorkerError) -> JSONResponse:
        return JSONResponse({"detail": exc.message}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(UnknownJob)
    async def _unknown(request: Request, exc: UnknownJob) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=404)

    bearer = HTTPBearer(auto_error=False, description="the worker's access token")

    def authorized(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
        challenge = {"WWW-Authenticate": "Bearer"}
        if credentials is None or credentials.scheme.lower() != "bearer":
            raise WorkerError(401, "missing access token (send 'Authorization: Bearer <token>')", challenge)
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

    @api.get("/info", tags=["info"], summary="Version, devices, GPU memory, limits, models and their cards")
    def info() -> dict[str, Any]:
        return _info(settings, state)

    @api.get("/openapi.json", tags=["info"], summary="This API's OpenAPI description")
    def openapi() -> dict[str, Any]:
        return app.openapi()

    @api.post("/jobs", status_code=202, tags=["jobs"], summary="Submit a job: its spec and input images")
    def submit(
        spec: Annotated[str, Form(description="the job spec (JSON); input paths are 'upload:N'")],
        files: Annotated[list[UploadFile], File(description="the input images (NIfTI, gzip welcome)")],
    ) -> dict[str, Any]:
        return _submit(settings, state, spec, files)

    @api.get("/jobs", tags=["jobs"], summary="The jobs on this worker, newest first")
    def jobs(limit: Annotated[int, Query(ge=1, le=10000)] = 1000) -> list[dict[str, Any]]:
        return store().list(limit)

    @api.get("/jobs/{job_id}", tags=["jobs"], summary="A job's state, queue position and last progress")
    def status(job_id: str) -> dict[str, Any]:
        return store().status(job_id_ok(job_id))

    @api.get(
        "/jobs/{job_id}/events",
        tags=["jobs"],
        summary="Server-sent events of a job, from the start or after an event id",
        response_class=StreamingResponse,
        responses={200: {"content": {"text/event-stream": {}}}},
    )
    async def events(
        job_id: str,
        request: Request,
        after: Annotated[int, Query(ge=-1)] = -1,
        last_event_id: Annotated[str | None, Header()] = None,
    ) -> StreamingResponse:
        job_id_ok(job_id)
        store().get(job_id)
        if last_event_id and last_event_id.isdigit():
            after = max(after, int(last_event_id))
        return StreamingResponse(
            _stream(store(), job_id, after, request),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @api.post("/jobs/{job_id}/cancel", status_code=202, tags=["jobs"], summary="Cancel a job")
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
        responses={200: {"content": {"application/zip": {}}}},
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

    @api.delete("/jobs/{job_id}", status_code=204, tags=["jobs"], summary="Cancel if needed, then delete")
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
        except Exception:  # deleted meanwhile
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
