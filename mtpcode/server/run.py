"""Running the HTTP server: bind, load the model in the background, serve under uvicorn, stop cleanly.

The socket is bound before the model loads, so that ``/health`` answers 503
("Loading model") meanwhile, as llama-server's does, and a port that is taken
is reported at once. SIGINT and SIGTERM cancel the running generation, let
uvicorn close the connections, save what the drafting policy learned, and
exit 0.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import IO, Any

import uvicorn

from mtpcode.cli.frontend import load_engine
from mtpcode.config import Settings
from mtpcode.errors import ModelError, MtpError, UsageError
from mtpcode.models import BUILTIN_NAME, is_builtin, resolve_model
from mtpcode.scheduler import Scheduler
from mtpcode.server.app import create_app
from mtpcode.server.state import DEFAULT_MAX_BODY, ServerState
from mtpcode.signals import on_signals

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8012  # llama.vim's and llama.vscode's default endpoint
DEFAULT_PARALLEL = 4  # slots, as llama-server's -np auto: a few editors at once


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable only from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port; UsageError when that is impossible (port taken, bad host)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UsageError(f"--host {host}: cannot resolve it ({exc.strerror})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        if exc.errno in (98, 48):  # EADDRINUSE (Linux, macOS)
            raise UsageError(f"port {port} on {host} is in use (another server?); pick another with --port") from None
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.set_inheritable(True)
    return sock


def model_id(model: str | None, path: Path) -> str:
    """The name the server gives its model (/v1/models, and the "model" of every answer)."""
    if is_builtin(path):
        return BUILTIN_NAME
    if model and "/" not in model and not Path(model).expanduser().exists():
        return model  # a registered name
    return path.name


def serve_http(settings: Settings, model: str | None, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
               api_key: str | None = None, cancel_previous: bool = True, max_body: int = DEFAULT_MAX_BODY,
               verbose: bool = False, log: IO[str] = sys.stderr) -> None:
    """Serve the HTTP API until SIGINT or SIGTERM. ModelError if the model cannot be loaded."""
    path = resolve_model(model, settings)
    name = model_id(model, path)
    n_slots = settings.parallel or DEFAULT_PARALLEL
    if not is_loopback(host):
        guard = "with an API key" if api_key else "WITHOUT an API key (set one with --api-key)"
        print(f"mtpcode: warning: listening on {host}, reachable from other machines, {guard}", file=log, flush=True)
    sock = bind(host, port)
    bound_port = sock.getsockname()[1]
    settings = replace(settings, parallel=n_slots)
    state = ServerState(settings=settings, model_id=name, model_path=path, api_key=api_key, max_body=max_body,
                        cancel_previous=cancel_previous, n_slots=n_slots)
    shown_host = f"[{host}]" if ":" in host else host
    print(f"mtpcode: listening on http://{shown_host}:{bound_port} (model {name}: {path}; loading)",
          file=log, flush=True)

    server = _Server(uvicorn.Config(create_app(state), log_level="info" if verbose else "warning",
                                    access_log=verbose, lifespan="off", timeout_graceful_shutdown=3,
                                    timeout_keep_alive=30), state)
    failure: list[MtpError] = []

    def load() -> None:
        try:
            engine, _ = load_engine(settings, model, note=log, serving=True)
        except MtpError as exc:
            failure.append(exc)
            server.should_exit = True
            return
        except Exception as exc:  # a broken bundle: tell the user, stop serving
            failure.append(ModelError(f"cannot load {path}: {type(exc).__name__}: {exc}"))
            server.should_exit = True
            return
        state.engine = engine
        state.scheduler = Scheduler(engine, supersede=cancel_previous)
        print(f"mtpcode: model loaded ({engine.n_heads} heads, {n_slots} slots sharing a context of "
              f"{engine.n_ctx} tokens); ready", file=log, flush=True)

    loader = threading.Thread(target=load, name="mtpcode-load", daemon=True)
    loader.start()
    if verbose:  # each request's start and end, with its id (mtpcode.scheduler)
        handler = logging.StreamHandler(log)
        handler.setFormatter(logging.Formatter("mtpcode: %(message)s"))
        logger = logging.getLogger("mtpcode.scheduler")
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    try:
        server.run(sockets=[sock])
    finally:
        if state.scheduler is not None:
            state.scheduler.cancel_all("shutdown")
        loader.join(timeout=60)
        stopped = state.scheduler.close() if state.scheduler is not None else True
        if state.engine is not None and stopped:  # (not under a step still running: the process ends)
            state.engine.close()  # saves what the drafting policy learned
        sock.close()
    if failure:
        raise failure[0]
    print("mtpcode: stopped", file=log, flush=True)


class _Server:
    """uvicorn's Server, with SIGINT/SIGTERM cancelling the running generation first and
    ending in a normal return (uvicorn re-raises the signal after its shutdown)."""

    def __init__(self, config: Any, state: ServerState) -> None:
        outer = self

        class Server(uvicorn.Server):
            def handle_exit(self, sig: int, frame: Any) -> None:
                if outer.state.scheduler is not None:
                    outer.state.scheduler.cancel_all("shutdown")
                super().handle_exit(sig, frame)

            @contextlib.contextmanager
            def capture_signals(self) -> Iterator[None]:
                with on_signals(self.handle_exit, (signal.SIGINT, signal.SIGTERM)):
                    yield

        self.state = state
        self.server = Server(config)

    @property
    def should_exit(self) -> bool:
        return bool(self.server.should_exit)

    @should_exit.setter
    def should_exit(self, value: bool) -> None:
        self.server.should_exit = value

    def run(self, sockets: list[socket.socket]) -> None:
        self.server.run(sockets=sockets)
