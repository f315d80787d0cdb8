"""The explorer over HTTP: a Starlette app around an :class:`~mapjax.explore.session.ExploreSession`, run by uvicorn.

Routes: ``GET /`` the page, ``GET /static/...`` its script, style and icon (all shipped with mapjax: no CDN, no
external font), ``GET /api/pool`` the pool's description, ``POST /api/solve``, ``/api/adjust``,
``/api/samples``, ``/api/histogram``, ``/api/prompts`` (JSON in, JSON out; see the session's methods).

Transport rules, checked before the session sees a request: a body must be ``application/json`` (415), at most
:data:`MAX_BODY_BYTES` (413) and valid JSON that Python can read (400: no integer beyond its int-string limit,
no nesting beyond its recursion limit; :func:`mapjax.jsonio.loads`). Every error is a JSON object
``{"error": message}`` with a 4xx status; an unexpected failure is a 500 with a one-line message, its traceback
going to the server's log, never to the client. A client that goes away before its body has arrived is an
ordinary event: nothing is answered and nothing is logged. Requests run one at a time on one worker thread, in
the order they arrived, so answers to several tabs never mix and the solver runs on the thread it was compiled
on.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import threading
import webbrowser
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from mapjax.errors import InputError, MapjaxError
from mapjax.explore.session import ExploreSession, MissingDependencyError, RequestError
from mapjax.jsonio import dumps, loads

STATIC_DIR = Path(__file__).resolve().parent / "static"
MAX_BODY_BYTES = 64 * 1024
INSTALL_HINT = "pip install 'mapjax[explore]'"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
# The page loads only what this server serves: scripts, styles, images and requests all stay on this origin.
CONTENT_SECURITY_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                           "font-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; "
                           "form-action 'self'; frame-ancestors 'none'")
logger = logging.getLogger("mapjax.explore")


def require_server() -> None:
    """Raise :class:`MissingDependencyError` naming the extra when Starlette or uvicorn is missing."""
    missing = []
    for module in ("starlette", "uvicorn"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise MissingDependencyError(
            f"mapjax explore needs {' and '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not "
            f"installed: {INSTALL_HINT}"
        )


class Dispatcher:
    """Runs the session's answers one at a time, in arrival order, on one worker thread.

    ``received`` counts the requests handed to the worker (in arrival order); each answer carries the
    session's ``served`` count, the order in which it was answered.
    """

    def __init__(self, session: ExploreSession):
        self.session = session
        self.received = 0
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mapjax-explore")

    async def run(self, answer: Callable[[Any], dict], request: Any) -> dict:
        self.received += 1
        return await asyncio.get_running_loop().run_in_executor(self._worker, answer, request)

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)


def create_app(session: ExploreSession, *, allowed_hosts: list[str] | None = None) -> Any:
    """The Starlette app serving ``session``; ``allowed_hosts`` (e.g. the loopback names) refuses requests
    addressed to any other host name, which keeps other web sites out through DNS rebinding."""
    require_server()
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.middleware.trustedhost import TrustedHostMiddleware
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import FileResponse, Response
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    dispatcher = Dispatcher(session)

    def json_response(value: Any, status: int = 200) -> Response:
        return Response(dumps(value, indent=None), status_code=status, media_type="application/json",
                        headers={"Cache-Control": "no-store"})

    def error_response(message: str, status: int, field: str | None = None) -> Response:
        body = {"error": " ".join(message.split()), "status": status}
        if field is not None:
            body["field"] = field
        return json_response(body, status)

    async def read_json(request: Request) -> Any:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            raise RequestError(f"send the request as application/json, not {content_type or 'no content type'}", 415)
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY_BYTES):
            raise RequestError(f"the request body is larger than {MAX_BODY_BYTES} bytes", 413)
        body = bytearray()
        async for chunk in request.stream():
            body.extend(chunk)
            if len(body) > MAX_BODY_BYTES:
                raise RequestError(f"the request body is larger than {MAX_BODY_BYTES} bytes", 413)
        try:
            return loads(bytes(body), "the request body")
        except MapjaxError as error:
            raise RequestError(str(error), 400) from None

    def endpoint(answer: Callable[[Any], dict]) -> Callable:
        async def handle(request: Request) -> Response:
            try:
                payload = await read_json(request)
                return json_response(await dispatcher.run(answer, payload))
            except RequestError as error:
                return error_response(str(error), error.status, error.field)
            except MapjaxError as error:   # a request the library refuses, e.g. an LP that cannot be solved
                return error_response(str(error), 422)
            except ClientDisconnect:   # the client went away mid-body: no one is left to answer
                return Response(status_code=400)
        return handle

    async def pool(request: Request) -> Response:
        return json_response(session.describe())

    async def index(request: Request) -> Response:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers={"Cache-Control": "no-store"})

    async def http_error(request: Request, error: HTTPException) -> Response:
        return error_response(str(error.detail), error.status_code)

    async def unexpected(request: Request, error: Exception) -> Response:
        logger.exception("mapjax explore: unexpected error on %s %s", request.method, request.url.path)
        return error_response(f"internal error ({type(error).__name__}); the server's log has the details", 500)

    @contextlib.asynccontextmanager
    async def lifespan(app: Any):
        yield
        dispatcher.close()

    routes = [
        Route("/", index, methods=["GET"]),
        Route("/api/pool", pool, methods=["GET"]),
        Route("/api/solve", endpoint(session.solve), methods=["POST"]),
        Route("/api/adjust", endpoint(session.adjust), methods=["POST"]),
        Route("/api/samples", endpoint(session.samples), methods=["POST"]),
        Route("/api/histogram", endpoint(session.histogram), methods=["POST"]),
        Route("/api/prompts", endpoint(session.prompts), methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
    ]
    middleware = [Middleware(_SecurityHeaders)]
    if allowed_hosts:
        middleware.insert(0, Middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts)))
    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan,
                    exception_handlers={HTTPException: http_error, Exception: unexpected})
    app.state.dispatcher = dispatcher
    app.state.session = session
    return app


class _SecurityHeaders:
    """Adds the content security policy and no-sniffing to every response (plain ASGI, so streaming is kept)."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.append((b"content-security-policy", CONTENT_SECURITY_POLICY.encode()))
                headers.append((b"x-content-type-options", b"nosniff"))
                headers.append((b"referrer-policy", b"no-referrer"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


# --------------------------------------------------------------------------------------------------- serving
def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: any free port); an address in use is an InputError."""
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        raise InputError(f"--host {host}: cannot be resolved ({error.strerror})") from None
    family, kind, protocol, _, address = infos[0]
    listener = socket.socket(family, kind, protocol)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
        listener.listen(128)
    except OSError as error:
        listener.close()
        raise InputError(f"cannot listen on {host}:{port} ({error.strerror}); choose another --port or --host") from None
    listener.setblocking(False)
    return listener


def url_of(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else ("localhost" if host == "::" else host)
    if ":" in shown and not shown.startswith("["):
        shown = f"[{shown}]"
    return f"http://{shown}:{port}/"


def serve(session: ExploreSession, host: str = "127.0.0.1", port: int = 8765, *,
          listener: socket.socket | None = None, open_browser: bool = False,
          announce: Callable[[str], None] = print) -> None:
    """Serve the explorer until interrupted (Ctrl+C). ``listener``: a socket already bound with :func:`bind`
    (so that a port in use is refused before any slow start), else one is bound on ``host:port``. On a
    loopback host only requests addressed to it are answered; ``open_browser`` opens the page in the default
    browser once the server listens. ``announce`` gets the page's URL."""
    require_server()
    import uvicorn

    if listener is None:
        listener = bind(host, port)
    port = listener.getsockname()[1]
    allowed = list(LOOPBACK_HOSTS) if is_loopback(host) else None
    app = create_app(session, allowed_hosts=allowed)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
    server = uvicorn.Server(config)
    url = url_of(host, port)
    announce(url)
    if open_browser:
        def open_when_listening() -> None:
            while not server.started and not server.should_exit:
                threading.Event().wait(0.05)
            if server.started:
                webbrowser.open(url)
        threading.Thread(target=open_when_listening, daemon=True).start()
    try:
        server.run(sockets=[listener])
    except KeyboardInterrupt:   # uvicorn shuts down gracefully, then passes Ctrl+C on: stopping is the point
        pass
