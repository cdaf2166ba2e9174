"""``longdiff-worker``: serve the API, or consume the shared queue on a GPU machine.

longdiff-worker serve --data DIR [--host 127.0.0.1] [--port 8765] [--token-file F]
                      [--tls-cert C --tls-key K] [--max-upload-mb N] [--expiry-hours H]
                      [--expiry-sweep-seconds S]
                      [--broker redis://HOST:6379/0]
longdiff-worker gpu --broker redis://HOST:6379/0 --data DIR [--device cuda:0]
longdiff-worker token --data DIR                  print the single (admin) token
longdiff-worker token add NAME [--admin] --data DIR   a user and their token (printed once)
longdiff-worker token remove NAME --data DIR
longdiff-worker token list --data DIR
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from .. import __version__
from ..errors import LongitudinalDiffusionError

log = logging.getLogger("longdiff.worker")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="longdiff-worker",
        description="The LongitudinalDiffusion remote worker: runs jobs for Slicer panels and `longdiff --remote`.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("serve", help="serve the HTTP API (and run jobs here unless --broker is given)")
    p.add_argument("--data", type=Path, required=True, help="folder of the job database, inputs and results")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765)")
    p.add_argument("--token-file", type=Path, help="file holding the access token (else $LONGDIFF_WORKER_TOKEN, "
                   "else DATA/token, created on first start)")  # fmt: skip
    p.add_argument("--tls-cert", type=Path, help="TLS certificate (PEM); with --tls-key the worker speaks HTTPS")
    p.add_argument("--tls-key", type=Path, help="TLS private key (PEM)")
    p.add_argument("--max-upload-mb", type=float, default=512.0, help="largest request accepted (default 512)")
    p.add_argument("--max-voxels", type=int, default=512**3, help="largest image accepted, in voxels")
    p.add_argument("--max-file-mb", type=float, default=512.0, help="largest decompressed image (default 512)")
    p.add_argument("--max-job-mb", type=float, default=2048.0,
                   help="largest decompressed images of one job, together (default 2048)")  # fmt: skip
    p.add_argument("--max-capture", type=int, default=16, help="denoising frames a job may capture (default 16)")
    p.add_argument("--max-streams-per-user", type=int, default=16, help="open event streams per user (default 16)")
    p.add_argument("--max-streams", type=int, default=256, help="open event streams in all (default 256)")
    p.add_argument("--max-connections", type=int, default=512, help="open connections in all (default 512)")
    p.add_argument("--max-connections-per-address", type=int, default=128,
                   help="open connections from one address (default 128)")  # fmt: skip
    p.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a client has to send a request's headers (default 10)")  # fmt: skip
    p.add_argument("--body-timeout", type=float, default=30.0,
                   help="seconds a request body may pause (default 30)")  # fmt: skip
    p.add_argument("--users", type=Path, help="the users file (default DATA/users.json)")
    p.add_argument(
        "--expiry-hours", type=float, default=72.0, help="delete finished jobs this long after they end (0: never)"
    )
    p.add_argument("--expiry-sweep-seconds", type=float, default=60.0,
                   help="how often expired jobs are looked for (default 60)")  # fmt: skip
    p.add_argument("--broker", help="Celery broker URL (redis://...): queue jobs for `longdiff-worker gpu` processes")
    p.add_argument("--device", action="append", help="device(s) of the embedded runner (default: every GPU, else cpu)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("gpu", help="take jobs from the shared queue and run them on this machine's GPU")
    p.add_argument("--broker", required=True, help="Celery broker URL (redis://...), the same as the server's")
    p.add_argument("--data", type=Path, required=True, help="the server's data folder, as mounted here (shared)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--name", help="name shown in job events (default host-pid)")
    p.set_defaults(func=cmd_gpu)

    p = sub.add_parser("token", help="the single access token of a data folder, or its users (add, remove, list)")
    p.add_argument("action", nargs="?", choices=("show", "add", "remove", "list"), default="show",
                   help="show (default): print the single admin token (creating it if needed); add NAME: a user "
                   "and their new token, printed once; remove NAME; list: the users")  # fmt: skip
    p.add_argument("name", nargs="?", help="the user's name (add, remove)")
    p.add_argument("--admin", action="store_true", help="add: the user sees and acts on every job")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--users", type=Path, help="the users file (default DATA/users.json)")
    p.set_defaults(func=cmd_token)
    return parser


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .app import create_app
    from .settings import Settings, resolve_token
    from .store import private_folder

    if bool(args.tls_cert) != bool(args.tls_key):
        raise LongitudinalDiffusionError("--tls-cert and --tls-key go together")
    for path in (args.tls_cert, args.tls_key):
        if path is not None and not path.is_file():
            raise LongitudinalDiffusionError(f"{path}: TLS file not found")
    from .server import guarded_protocol
    from .users import USERS_FILE, read_users

    private_folder(args.data)
    users_file = args.users or args.data / USERS_FILE
    has_users = bool(read_users(users_file))
    token, source = resolve_token(args.data, args.token_file, create=not has_users)
    if has_users:
        source = f"{users_file}" + (f" and {source} (admin)" if token else "")
    if not _loopback(args.host) and not args.tls_cert:
        log.warning("listening on %s without TLS: tokens and images cross the network in clear text", args.host)
    settings = Settings(
        data=args.data,
        token=token,
        max_upload_mb=args.max_upload_mb,
        max_voxels=args.max_voxels,
        expiry_hours=args.expiry_hours,
        expiry_sweep_seconds=args.expiry_sweep_seconds,
        broker=args.broker,
        devices=tuple(args.device or ()),
        users_file=users_file,
        max_file_mb=args.max_file_mb,
        max_job_mb=args.max_job_mb,
        max_capture=args.max_capture,
        max_streams_per_user=args.max_streams_per_user,
        max_streams=args.max_streams,
        header_timeout=args.header_timeout,
        body_timeout=args.body_timeout,
        max_connections=args.max_connections,
        max_connections_per_address=args.max_connections_per_address,
    )
    scheme = "https" if args.tls_cert else "http"
    log.info("longdiff-worker %s on %s://%s:%d, data %s, token from %s, %s", __version__, scheme, args.host,
             args.port, args.data, source, f"queue {args.broker}" if args.broker else "jobs run here")  # fmt: skip
    uvicorn.run(
        create_app(settings),
        host=args.host,
        port=args.port,
        ssl_certfile=str(args.tls_cert) if args.tls_cert else None,
        ssl_keyfile=str(args.tls_key) if args.tls_key else None,
        log_level=args.log_level,
        timeout_graceful_shutdown=5,
        server_header=False,
        http=guarded_protocol(settings.header_timeout, settings.max_connections, settings.max_connections_per_address),
        timeout_keep_alive=5,
        h11_max_incomplete_event_size=64 * 1024,  # request line and headers: 64 kB at most
    )
    return 0


def cmd_gpu(args: argparse.Namespace) -> int:
    from .celery_app import gpu_worker

    return gpu_worker(args.broker, args.data, args.device, args.name)


def cmd_token(args: argparse.Namespace) -> int:
    from .settings import resolve_token
    from .store import private_folder
    from .users import USERS_FILE, add_user, read_users, remove_user

    if args.action == "show":
        print(resolve_token(args.data)[0])
        return 0
    private_folder(args.data)
    path = args.users or args.data / USERS_FILE
    if args.action == "list":
        for name, entry in sorted(read_users(path).items()):
            print(f"{name}\t{'admin' if entry.get('admin') else 'user'}\t{entry.get('created', '')}")
        return 0
    if not args.name:
        raise LongitudinalDiffusionError(f"token {args.action} needs the user's name")
    if args.action == "add":
        token = add_user(path, args.name, admin=args.admin)
        print(token)
        print(f"(the token of {args.name}: shown only now; the worker keeps its hash in {path})", file=sys.stderr)
    else:
        remove_user(path, args.name)
        print(f"removed {args.name}; their token no longer works", file=sys.stderr)
    return 0


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="longdiff-worker: %(levelname)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except LongitudinalDiffusionError as exc:
        print(f"longdiff-worker: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
