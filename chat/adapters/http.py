"""The chat service's HTTP API: message history (PROTOCOL.md 5), /healthz, /readyz, /metrics, the demo page.

`GET /rooms/<room>/messages?after=<seq>&limit=<n>` answers
`{"room":"r1","latest_seq":58,"messages":[<message event>, ...]}` in seq order
(after defaults to 0, limit to 100, 1-500). A bad room, after or limit gets
400 `{"error":"bad_request","message":"..."}`. Every response allows any
origin, because the demo page and other browser clients live on another port.

Beyond the contract's JSON, the response header `X-Roomcast-Oldest-Seq` gives
the room's oldest retained seq, so a caller can tell a gap older than the
retained history (PROTOCOL.md 3, `recovered:false`) without changing the body.
The same follows from the body alone: a first message with seq > after + 1
while latest_seq > after means the messages in between were pruned.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import msgspec

import roomcast
from chat.storage.base import HISTORY_MAX_LIMIT, MessageStore, StoreError
from roomcast.auth import Authenticator, AuthError
from roomcast.service_auth import SERVICE_TOKEN_HEADER, ServiceVerifier
from roomcast.config import ChatConfig
from roomcast.http import HttpServer, Request, Response, Router
from roomcast.metrics import MetricsRegistry
from roomcast.wire.events import MessageEvent
from roomcast.wire.frames import is_valid_room_id
from roomcast.wire.history import HistoryPage

__all__ = [
    "DEFAULT_LIMIT",
    "PAGE_PATH",
    "WS_URL_PLACEHOLDER",
    "Authorizer",
    "Refusal",
    "token_authorizer",
    "HistoryApi",
    "allow_all",
    "build_http_server",
    "json_error",
    "load_page",
]

log = logging.getLogger("roomcast.chat.http")

PAGE_PATH = Path(roomcast.__file__).parent / "static" / "index.html"
WS_URL_PLACEHOLDER = "__ROOMCAST_WS_URL__"
DEFAULT_LIMIT = 100  # PROTOCOL.md 5
_MAX_SEQ_DIGITS = 18  # keeps `after` inside a signed 64-bit column
_DIGITS = re.compile(r"[0-9]+")
_SERVICE_HEADER = SERVICE_TOKEN_HEADER.lower()  # Request.headers names are lower case

@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a history request is refused: 401 (no valid token) or 403 (room not allowed)."""

    status: int
    message: str


# Checks a request for `room`: None to allow, or a Refusal. In jwt mode it
# checks the same token as the WebSocket (PROTOCOL.md 1 and 5); dev mode
# allows everything.
Authorizer = Callable[[Request, str], Refusal | None]


def allow_all(request: Request, room: str) -> Refusal | None:
    """The dev-mode authorizer: every request may read every room."""
    return None


def token_authorizer(authenticator: Authenticator, service: ServiceVerifier | None = None) -> Authorizer:
    """The authorizer for `authenticator`'s mode: allow_all in dev mode, else a JWT check.

    The token comes as for the WebSocket: `Authorization: Bearer <JWT>` or
    `?token=<JWT>`. A missing, bad or expired token gets 401; a room outside
    the token's `rooms` claim gets 403. A gateway's service token
    (`X-Roomcast-Service-Token`, roomcast.auth) is checked instead when that
    header is sent: every room when `service` accepts it, else 401 (no
    fallback to the user token).
    """
    if authenticator.auth_mode == "dev":
        return allow_all

    def check(request: Request, room: str) -> Refusal | None:
        service_token = request.headers.get(_SERVICE_HEADER)
        if service_token is not None:
            if service is None:
                return Refusal(401, "service tokens are not accepted: set service_key on the chat service")
            try:
                service.verify(service_token)
            except AuthError as exc:
                return Refusal(401, str(exc))
            return None
        try:
            identity = authenticator.authenticate(request.headers, request.target.partition("?")[2])
        except AuthError as exc:
            return Refusal(401, str(exc))
        if not identity.may_use(room):
            return Refusal(403, "room not allowed by the token")
        return None

    return check


class _ErrorBody(msgspec.Struct):
    error: str
    message: str


_encoder = msgspec.json.Encoder()
_JSON = "application/json"
_ERROR_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    431: "too_large",
    500: "internal",
    501: "not_implemented",
    503: "unavailable",
    505: "bad_request",
}


def json_error(status: int, message: str) -> Response:
    """`{"error": <code>, "message": ...}` with the status; also renders the server's own errors."""
    code = _ERROR_CODES.get(status, "error")
    return status, {"content-type": _JSON}, _encoder.encode(_ErrorBody(code, message))


def load_page(ws_url: str, path: Path = PAGE_PATH) -> bytes | None:
    """The demo page with its WebSocket URL filled in, or None when ws_url is empty or the file is missing.

    Read once at start-up; the placeholder is replaced literally.
    """
    if not ws_url:
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        log.warning("page_ws_url is set but %s does not exist; GET / will answer 404", path)
        return None
    return text.replace(WS_URL_PLACEHOLDER, ws_url).encode("utf-8")


class HistoryApi:
    """The request handlers over one store. `router()` wires them.

    `/healthz` answers 200 while the process serves; `/readyz` 200 when
    `ready()` is true, else 503 (a load balancer or k8s stops routing);
    `/metrics` renders `metrics` when given. The three are open in every
    auth mode, as probes and scrapers carry no token; they reveal no room or
    user id.
    """

    def __init__(
        self,
        store: MessageStore,
        *,
        authorize: Authorizer = allow_all,
        page: bytes | None = None,
        metrics: MetricsRegistry | None = None,
        ready: Callable[[], bool] = lambda: True,
    ) -> None:
        self.store = store
        self.authorize = authorize
        self.page = page
        self.metrics = metrics
        self.ready = ready

    def router(self) -> Router:
        router = Router()
        router.add("/rooms/{room}/messages", self.messages)
        router.add("/healthz", self.healthz)
        router.add("/readyz", self.readyz)
        if self.metrics is not None:
            router.add("/metrics", self.render_metrics)
        if self.page is not None:
            router.add("/", self.index)
        return router

    async def messages(self, request: Request) -> Response:
        """PROTOCOL.md 5."""
        room = request.params["room"]
        if not is_valid_room_id(room):
            return json_error(400, "room must be 1 to 128 characters of A-Z a-z 0-9 _ . : -")
        after = _int_param(request.query.get("after"), 0)
        if after is None:
            return json_error(400, "after must be a whole number, 0 or more")
        limit = _int_param(request.query.get("limit"), DEFAULT_LIMIT)
        if limit is None or not 1 <= limit <= HISTORY_MAX_LIMIT:
            return json_error(400, f"limit must be a whole number from 1 to {HISTORY_MAX_LIMIT}")
        refusal = self.authorize(request, room)
        if refusal is not None:
            return json_error(refusal.status, refusal.message)
        try:
            page = await self.store.history(room, after, limit)
        except StoreError:
            log.exception("history of room %s failed", room)
            return json_error(503, "history is unavailable now; retry")
        body = _encoder.encode(HistoryPage[MessageEvent](page.room, page.latest_seq, page.messages))
        return (
            200,
            {"content-type": _JSON, "cache-control": "no-store", "x-roomcast-oldest-seq": str(page.oldest_seq)},
            body,
        )

    def healthz(self, request: Request) -> Response:
        return 200, {"content-type": "text/plain; charset=utf-8"}, b"ok\n"

    def readyz(self, request: Request) -> Response:
        if self.ready():
            return 200, {"content-type": "text/plain; charset=utf-8", "cache-control": "no-store"}, b"ready\n"
        return 503, {"content-type": "text/plain; charset=utf-8", "cache-control": "no-store"}, b"not ready\n"

    def render_metrics(self, request: Request) -> Response:
        assert self.metrics is not None
        return 200, {"content-type": MetricsRegistry.CONTENT_TYPE, "cache-control": "no-store"}, self.metrics.render()

    def index(self, request: Request) -> Response:
        assert self.page is not None
        return 200, {"content-type": "text/html; charset=utf-8", "cache-control": "no-cache"}, self.page


def _int_param(text: str | None, default: int) -> int | None:
    """The value of a non-negative decimal parameter; default when absent; None when malformed."""
    if text is None:
        return default
    if not _DIGITS.fullmatch(text) or len(text) > _MAX_SEQ_DIGITS:
        return None
    return int(text)


def build_http_server(
    store: MessageStore,
    config: ChatConfig,
    *,
    authorize: Authorizer | None = None,
    metrics: MetricsRegistry | None = None,
    ready: Callable[[], bool] = lambda: True,
) -> HttpServer:
    """The history API server for `config` (not started: `await server.start()`).

    `authorize` defaults to the token check of config.auth_mode; `metrics`
    and `ready` feed /metrics and /readyz (see HistoryApi). Raises
    ConfigError for a bad auth setting (jwt mode without a usable key).
    """
    if authorize is None:
        authorize = token_authorizer(Authenticator.from_config(config), ServiceVerifier.from_config(config))
    api = HistoryApi(store, authorize=authorize, page=load_page(config.page_ws_url), metrics=metrics, ready=ready)
    server = HttpServer(
        api.router(),
        config.http_host,
        config.http_port,
        cors_origin="*",
        render_error=json_error,
        name="chat http",
    )
    if metrics is not None:
        metrics.counter_fn(
            "roomcast_chat_http_connections_total", "TCP connections the history API accepted (keep-alive reuses them)",
            lambda: server.connections_accepted,
        )
    return server
