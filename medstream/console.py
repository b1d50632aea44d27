"""The live alert console: a web page for monitoring staff and a governed SQL endpoint.

- Alerts are pushed to every open page over server-sent events as the lifecycle emits them:
  the console reads the ``alerts`` topic itself (its own consumer, no group commits), so an
  alert reaches the page without waiting for ClickHouse. Every few seconds it also
  reconciles with ClickHouse's ``alert_current`` (what it missed while starting, and each
  alert's department from the patient's latest encounter).
- Acknowledge and resolve go to the alert lifecycle like `medstream alerts ack`; the request
  answers with the lifecycle's outcome (200 applied, 409 refused with the reason, 504 not
  confirmed in time), and the new state comes back on the topic to every open console.
- Users sign in (bcrypt-hashed passwords, see medstream.access); sessions expire after idle
  time and an absolute limit; every state-changing request needs the session's CSRF token
  and a same-origin Origin header. Each user sees only the organisations in scope.
- ``POST /api/sql`` runs governed read-only SQL (JSON, CSV or Arrow).
- Sign-ins, queries, timeline views and alert actions are recorded in the audit trail.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Any, Final

from aiohttp import web
from confluent_kafka import OFFSET_END, Consumer, TopicPartition

from medstream.access import (
    AccessError,
    QueryGovernor,
    User,
    UserStore,
)
from medstream.alert_actions import (
    TIMED_OUT,
    ActionOutcome,
    AlertActionError,
    AlertState,
    check_action,
    request_action,
)
from medstream.audit import AuditError, AuditTrail, statement_digest
from medstream.clickhouse import QueryError, QueryRefused, QueryResult, sql_string, write_csv
from medstream.settings import (
    ALERTS_TOPIC,
    ConsoleSettings,
    KafkaSettings,
    SinkSettings,
)
from medstream.throttle import SignInThrottle, Throttled
from schemas import serde
from streams.deidentify import scrub_text
from streams.detect import INPUT_ACKNOWLEDGE, INPUT_RESOLVE

log = logging.getLogger("medstream.console")

SESSION_COOKIE: Final = "medstream_session"
#: Alert fields the page shows (a snapshot of the lifecycle's state).
ALERT_FIELDS: Final = (
    "alert_id", "rule_id", "severity", "status", "organisation_id", "person_key", "subject",
    "explanation", "analyte_code", "value", "unit", "first_event_time", "updated_time",
    "occurrences", "escalation_level", "action", "actor", "note",
)
#: Rules whose open alerts mean a source has gone quiet.
SILENCE_RULES: Final = frozenset({"feed.silence", "device.silence"})
RESYNC_S: Final = 3.0
FEEDS_S: Final = 10.0
KEEP_RESOLVED_S: Final = 6 * 3600  # resolved alerts stay on the page this long
#: Longest sign-in name that can be an account (medstream.access allows 63 characters);
#: a longer one is refused without a password check and audited cut to this length.
SIGN_IN_NAME_MAX: Final = 64
#: Spreadsheet programs run a cell that starts with one of these as a formula.
SECURITY_HEADERS: Final = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
TIMELINE_HOURS: Final = 12
TIMELINE_ROWS: Final = 200
STATIC_FILES: Final = {
    "/": ("index.html", "text/html"),
    "/console.js": ("console.js", "text/javascript"),
    "/console.css": ("console.css", "text/css"),
}


def _iso(value: Any) -> str | None:
    """A timestamp (datetime or epoch milliseconds) as ISO 8601 UTC text."""
    if value is None:
        return None
    if isinstance(value, int | float):
        value = datetime.fromtimestamp(value / 1000, tz=UTC)
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return str(value)


def alert_view(record: dict[str, Any]) -> dict[str, Any]:
    """The page's view of an alert snapshot (from the topic or from ClickHouse)."""
    view = {name: record.get(name) for name in ALERT_FIELDS}
    view["first_event_time"] = _iso(view["first_event_time"])
    view["updated_time"] = _iso(view["updated_time"])
    view["department"] = record.get("department")
    return view


@dataclass
class Session:
    """One signed-in browser."""

    user_name: str
    csrf: str
    created: float
    last_seen: float
    password_hash: str  # a changed password ends the session
    role: str  # so does a changed role (the page and its stream were set up for this one)


@dataclass
class Subscriber:
    """One open event stream and whose it is."""

    user_name: str
    session_token: str
    queue: asyncio.Queue[tuple[str, Any] | None] = field(
        default_factory=lambda: asyncio.Queue(maxsize=1000)
    )


class Querier:
    """Runs read-only queries as the console's service account (through a running
    pipeline's query endpoint, or on a ClickHouse server)."""

    def __init__(
        self,
        run: Callable[[str, dict[str, Any] | None, int, int], QueryResult],
        timeout_s: int = 60,
    ) -> None:
        """``run(sql, settings, max_rows, timeout_s)``; ``timeout_s`` bounds each query
        unless a call names its own."""
        self._run = run
        self.timeout_s = timeout_s

    def __call__(
        self,
        sql: str,
        settings: dict[str, Any] | None = None,
        max_rows: int = 10_000,
        timeout_s: int | None = None,
    ) -> QueryResult:
        """One query; QueryError on failure (also when it timed out or got no answer)."""
        return self._run(sql, settings, max_rows, timeout_s or self.timeout_s)


class AlertBoard:
    """The current state of every recent alert, fed by the topic and by ClickHouse."""

    def __init__(self) -> None:
        self.alerts: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def merge(self, view: dict[str, Any]) -> dict[str, Any] | None:
        """Keep the newer state; returns the view when it changed what the page shows."""
        with self._lock:
            current = self.alerts.get(view["alert_id"])
            if current is not None:
                if (view["updated_time"] or "") < (current["updated_time"] or ""):
                    return None
                if view.get("department") is None:
                    view["department"] = current.get("department")
                if view == current:
                    return None
            self.alerts[view["alert_id"]] = view
            return view

    def get(self, alert_id: str) -> dict[str, Any] | None:
        """One alert's current view."""
        with self._lock:
            return self.alerts.get(alert_id)

    def visible_to(self, user: User) -> list[dict[str, Any]]:
        """The alerts in the user's scope, most urgent and newest first."""
        with self._lock:
            chosen = [a for a in self.alerts.values() if user.sees(a["organisation_id"])]
        severity = {"critical": 0, "high": 1, "medium": 2, "low": 3}
        return sorted(
            chosen,
            key=lambda a: (severity.get(a["severity"], 9), _neg(a["first_event_time"] or "")),
        )

    def prune(self, resolved_before: str) -> None:
        """Forget resolved alerts last changed before this ISO time (the page keeps a
        working set, ClickHouse keeps everything)."""
        with self._lock:
            for alert_id, alert in list(self.alerts.items()):
                old = (alert["updated_time"] or "") < resolved_before
                if alert["status"] == "resolved" and old:
                    del self.alerts[alert_id]

    def without_department(self) -> list[dict[str, Any]]:
        """Alerts about a person whose department is not known yet."""
        with self._lock:
            return [
                a for a in self.alerts.values()
                if a.get("department") is None and a.get("person_key")
            ]


def _neg(text: str) -> tuple[int, ...]:
    return tuple(-ord(c) for c in text)


class Console:
    """The console's state and its HTTP handlers."""

    def __init__(
        self,
        settings: ConsoleSettings,
        users: UserStore,
        kafka: KafkaSettings,
        registry: serde.SchemaRegistry,
        query: Querier,
        audit: AuditTrail,
        database: str,
    ) -> None:
        self.settings = settings
        self.users = users
        self.kafka = kafka
        self.registry = registry
        self.query = query
        self.audit = audit
        self.database = database
        self.board = AlertBoard()
        self.sessions: dict[str, Session] = {}
        self.subscribers: list[Subscriber] = []
        self.feeds: dict[str, Any] = {"rows": [], "lag": None, "updated": None}
        self.governor = QueryGovernor(database, lambda sql, s, rows: query(sql, s or None, rows))
        self.throttle = SignInThrottle()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.ready = threading.Event()
        #: Seconds between an idle live stream's heartbeats (and session checks).
        self.heartbeat_s = 15.0

    # ------------------------------------------------------------------ application

    def application(self) -> web.Application:
        """The aiohttp application with every route."""
        app = web.Application(middlewares=[self._security_headers], client_max_size=1 << 20)
        for path in STATIC_FILES:
            app.router.add_get(path, self.static)
        app.router.add_get("/healthz", self.health)
        app.router.add_get("/api/session", self.get_session)
        app.router.add_post("/api/session", self.sign_in)
        app.router.add_delete("/api/session", self.sign_out)
        app.router.add_get("/api/events", self.events)
        app.router.add_get("/api/alerts", self.list_alerts)
        app.router.add_post("/api/alerts/{alert_id}/{action}", self.act)
        app.router.add_get("/api/alerts/{alert_id}/timeline", self.timeline)
        app.router.add_get("/api/feeds", self.get_feeds)
        app.router.add_post("/api/sql", self.sql)
        app.router.add_get("/api/audit", self.get_audit)
        app.on_startup.append(self._on_startup)
        app.on_shutdown.append(self._on_shutdown)
        return app

    @web.middleware
    async def _security_headers(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Every response, errors included, carries the security headers; a refused
        cross-origin or CSRF request is recorded in the audit trail."""
        try:
            response: web.StreamResponse = await handler(request)
        except RequestRefused as refused:
            await self._audit(refused.actor, refused.role, "request_refused", "refused",
                              request, detail=f"{request.method} {request.path}: {refused}")
            refused.headers.update(SECURITY_HEADERS)
            raise
        except web.HTTPException as error:
            error.headers.update(SECURITY_HEADERS)
            raise
        except Exception:
            log.exception("%s %s failed", request.method, request.path)
            response = web.json_response({"error": "internal error"}, status=500)
        if not response.prepared:  # a live stream set its own headers before it started
            response.headers.update(SECURITY_HEADERS)
        return response

    async def _on_startup(self, _app: web.Application) -> None:
        self._loop = asyncio.get_running_loop()
        for target, name in ((self._consume_alerts, "alerts"), (self._reconcile, "reconcile")):
            thread = threading.Thread(target=target, name=f"console-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    async def _on_shutdown(self, _app: web.Application) -> None:
        self._stop.set()
        for subscriber in list(self.subscribers):
            _close(subscriber.queue)

    # ------------------------------------------------------------------ static and health

    async def static(self, request: web.Request) -> web.Response:
        """The page and its script and style (shipped in the package: no build step)."""
        name, content_type = STATIC_FILES[request.path]
        body = resources.files("medstream").joinpath("console_static", name).read_bytes()
        return web.Response(body=body, content_type=content_type, charset="utf-8")

    async def health(self, _request: web.Request) -> web.Response:
        """200 once the alert stream is live and while its background threads run (a
        readiness and liveness probe): a stopped alert stream or reconcile is a 503."""
        if not self.ready.is_set():
            return web.json_response({"ready": False}, status=503)
        stopped = [thread.name for thread in self._threads if not thread.is_alive()]
        if stopped:
            return web.json_response({"ready": False, "stopped": stopped}, status=503)
        return web.json_response({"ready": True, "alerts": len(self.board.alerts)})

    # ------------------------------------------------------------------ sessions

    def session_user(self, token: str) -> tuple[User | None, str]:
        """The user of a live session, or None and why the session is over (expired, the
        account removed, disabled or its password changed); an ended session is dropped."""
        session = self.sessions.get(token)
        if session is None:
            return None, "not signed in"
        now = time.time()
        reason = ""
        if (
            now - session.last_seen > self.settings.session_idle_minutes * 60
            or now - session.created > self.settings.session_max_hours * 3600
        ):
            reason = "the session expired: sign in again"
        else:
            user = self.users.users().get(session.user_name)
            if user is None or user.disabled:
                reason = "the account was removed or disabled"
            elif user.password_hash != session.password_hash:
                reason = "the password changed: sign in again"
            elif user.role != session.role:
                reason = "the role changed: sign in again"
            else:
                return user, ""
        self.sessions.pop(token, None)
        return None, reason

    def _user_of(self, request: web.Request, csrf: bool = False) -> tuple[User, str]:
        """The signed-in user of a request (and the session token); raises an HTTP error."""
        token = request.cookies.get(SESSION_COOKIE, "")
        user, reason = self.session_user(token)
        if user is None:
            raise web.HTTPUnauthorized(text=_error(reason), content_type="application/json")
        session = self.sessions[token]
        if csrf:
            self._check_csrf(request, session)
        session.last_seen = time.time()
        return user, token

    def _client_address(self, request: web.Request) -> str:
        """The client's address; behind a trusted proxy, the last X-Forwarded-For entry (the
        address the proxy itself saw: entries before it are whatever the client sent)."""
        if self.settings.trusted_proxy:
            forwarded = request.headers.get("X-Forwarded-For", "").split(",")[-1].strip()
            if forwarded:
                return forwarded
        return request.remote or ""

    def _origin(self, request: web.Request) -> str:
        """The origin the page is served from (configured, or as the proxy reports it)."""
        if self.settings.public_origin:
            return self.settings.public_origin.rstrip("/")
        scheme = request.scheme
        if self.settings.trusted_proxy:
            scheme = request.headers.get("X-Forwarded-Proto", scheme).split(",")[0].strip()
        return f"{scheme}://{request.host}"

    def _check_csrf(self, request: web.Request, session: Session | None) -> None:
        actor, role = (session.user_name, session.role) if session else ("", "")
        origin = request.headers.get("Origin")
        if origin is not None and origin != self._origin(request):
            raise RequestRefused("cross-origin request refused", actor, role)
        if session is not None and not secrets.compare_digest(
            request.headers.get("X-CSRF-Token", ""), session.csrf
        ):
            raise RequestRefused("missing or wrong CSRF token", actor, role)

    def _https(self, request: web.Request) -> bool:
        """True when browsers reach the console over HTTPS (directly or through the proxy)."""
        return self._origin(request).startswith("https://")

    async def get_session(self, request: web.Request) -> web.Response:
        """Who is signed in, with the CSRF token the page sends back on every change."""
        user, token = self._user_of(request)
        return web.json_response({"user": user.public(), "csrf": self.sessions[token].csrf})

    async def _authenticate(
        self, name: str, password: str, request: web.Request, channel: str,
        challenge: dict[str, str] | None = None,
    ) -> User:
        """Check a sign-in (the form, or HTTP Basic with ``challenge``): throttled, counted
        before the password hash, and every refusal audited. Raises 401 or 429."""
        address = self._client_address(request)
        if len(name) > SIGN_IN_NAME_MAX:  # no account has such a name: nothing to check
            self.throttle.refused(_audit_name(name), address)
            await self._audit(_audit_name(name), "", "sign_in_failed", "refused", request,
                              channel, detail="sign-in failed: no user name is that long")
            raise web.HTTPUnauthorized(
                text=_error(SIGN_IN_FAILED), content_type="application/json", headers=challenge
            )
        try:
            attempt = self.throttle.begin(name, address)
        except Throttled as exc:
            await self._audit(name, "", "sign_in_failed", "refused", request, channel,
                              detail=str(exc))
            raise web.HTTPTooManyRequests(
                text=_error(str(exc)), content_type="application/json",
                headers={"Retry-After": str(exc.retry_after_s)},
            ) from exc
        loop = asyncio.get_running_loop()
        try:
            user = await loop.run_in_executor(None, self.users.authenticate, name, password)
        except BaseException as exc:
            self.throttle.failed(attempt)
            if not isinstance(exc, AccessError):
                raise
            await self._audit(name, "", "sign_in_failed", "refused", request, channel,
                              detail=str(exc))
            raise web.HTTPUnauthorized(
                text=_error(str(exc)), content_type="application/json", headers=challenge
            ) from exc
        self.throttle.succeeded(attempt)
        return user

    async def sign_in(self, request: web.Request) -> web.Response:
        """Check a name and password; start a session (cookie) on success."""
        self._check_csrf(request, None)
        try:
            body = await request.json()
            name, password = str(body["name"]).strip(), str(body["password"])
        except (ValueError, KeyError, TypeError):
            return web.json_response({"error": "send JSON with name and password"}, status=400)
        user = await self._authenticate(name, password, request, "console")
        try:
            await self._audit(user.name, user.role, "sign_in", "ok", request)
        except AuditError as exc:
            return web.json_response({"error": f"{exc}: sign-in refused"}, status=503)
        token = secrets.token_urlsafe(32)
        now = time.time()
        self.sessions[token] = Session(
            user.name, secrets.token_urlsafe(32), now, now, user.password_hash, user.role
        )
        response = web.json_response({"user": user.public(), "csrf": self.sessions[token].csrf})
        response.set_cookie(
            SESSION_COOKIE, token, httponly=True, samesite="Strict", path="/",
            secure=self.settings.secure_cookies or self._https(request),
            max_age=int(self.settings.session_max_hours * 3600),
        )
        return response

    async def sign_out(self, request: web.Request) -> web.Response:
        """End the session."""
        user, token = self._user_of(request, csrf=True)
        self.sessions.pop(token, None)
        for subscriber in self.subscribers:
            if subscriber.session_token == token:
                _close(subscriber.queue)
        try:
            await self._audit(user.name, user.role, "sign_out", "ok", request)
        except AuditError:
            log.exception("the sign-out was not audited")
        response = web.json_response({"signed_out": True})
        response.del_cookie(SESSION_COOKIE, path="/")
        return response

    async def _audit(
        self, actor: str, role_name: str, action: str, outcome: str, request: web.Request,
        channel: str = "console", **fields: Any,
    ) -> None:
        """Record an audit event. What succeeds must be recorded first (AuditError stops
        it); a refusal stands either way, so failing to record one is only logged."""
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(
                None,
                lambda: self.audit.record(
                    actor=actor, actor_role=role_name, channel=channel, action=action,
                    outcome=outcome, client_address=self._client_address(request), **fields,
                ),
            )
        except AuditError:
            if outcome in ("ok", "requested"):
                raise
            log.exception("an audit event of a refusal was not recorded")

    # ------------------------------------------------------------------ alerts

    async def list_alerts(self, request: web.Request) -> web.Response:
        """The alerts in the user's scope (the page gets the same list on its stream)."""
        user, _ = self._user_of(request)
        return web.json_response({"alerts": self.board.visible_to(user)})

    async def events(self, request: web.Request) -> web.StreamResponse:
        """The live stream: a snapshot, then every change, feed health and heartbeats."""
        user, token = self._user_of(request)
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream", "X-Accel-Buffering": "no",
                **SECURITY_HEADERS,
            }
        )
        await response.prepare(request)
        subscriber = Subscriber(user.name, token)
        self.subscribers.append(subscriber)
        # A monitor's page showing the live stream is in use even when nobody clicks (a
        # monitoring screen): what the stream writes (events, or a heartbeat when there are
        # none) renews the session's idle timer, at most every heartbeat_s. Other roles'
        # sessions idle out as usual, the absolute limit holds for everyone, and nothing is
        # sent once the session has ended.
        renewed = time.monotonic()
        try:
            await _send(response, "snapshot", {"alerts": self.board.visible_to(user)})
            await _send(response, "feeds", self._feeds_for(user))
            while True:
                try:
                    item = await asyncio.wait_for(subscriber.queue.get(), self.heartbeat_s)
                except TimeoutError:
                    item = ("heartbeat", None)
                current = self.session_user(token)[0]
                if item is None or current is None:
                    break  # closed, expired, disabled, or its password or role changed
                kind, payload = item
                if kind == "heartbeat":
                    await response.write(b": heartbeat\n\n")
                else:
                    await _send(response, kind, payload)
                if (
                    current.permissions.live_page_keeps_session
                    and time.monotonic() - renewed >= self.heartbeat_s
                ):
                    self.sessions[token].last_seen = time.time()
                    renewed = time.monotonic()
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.subscribers.remove(subscriber)
        return response

    def _live_subscribers(self) -> list[tuple[Subscriber, User]]:
        """Open streams whose session is still valid; the others are closed."""
        live = []
        for subscriber in list(self.subscribers):
            user, _ = self.session_user(subscriber.session_token)
            if user is None:
                _close(subscriber.queue)
            else:
                live.append((subscriber, user))
        return live

    def _publish(self, view: dict[str, Any]) -> None:
        """Push one changed alert to every subscriber whose user may see it."""
        for subscriber, user in self._live_subscribers():
            if user.sees(view["organisation_id"]):
                _offer(subscriber.queue, ("alert", view))

    def _publish_feeds(self) -> None:
        for subscriber, user in self._live_subscribers():
            _offer(subscriber.queue, ("feeds", self._feeds_for(user)))

    def _forget_stale(self) -> None:
        """Drop ended sessions and old failed sign-ins (runs on the event loop)."""
        for token in list(self.sessions):
            self.session_user(token)
        self.throttle.forget_stale()

    def _merged(self, view: dict[str, Any]) -> None:
        changed = self.board.merge(view)
        if changed is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._publish, changed)

    def _consume_alerts(self) -> None:
        """Read the alerts topic from its end, for the console's life."""
        decode = serde.AvroDeserializer(self.registry)
        topic = self.kafka.topic(ALERTS_TOPIC)
        consumer = Consumer(
            self.kafka.librdkafka(
                **{
                    "group.id": f"medstream-console-{uuid.uuid4()}",
                    "enable.auto.commit": False,
                    "auto.offset.reset": "latest",
                    "fetch.wait.max.ms": self.kafka.fetch_wait,
                }
            )
        )
        try:
            metadata = consumer.list_topics(topic, timeout=30)
            partitions = metadata.topics[topic].partitions
            consumer.assign([TopicPartition(topic, p, OFFSET_END) for p in partitions])
            self.ready.set()
            while not self._stop.is_set():
                message = consumer.poll(0.2)
                if message is None:
                    continue
                if message.error():
                    log.warning("alerts topic: %s", message.error())
                    continue
                try:
                    record = decode(message.value())
                except serde.SerializationError as exc:
                    log.error("undecodable alert at offset %s: %s", message.offset(), exc)
                    continue
                self._merged(alert_view(record))
        except Exception:
            log.exception("the alert stream stopped")
            raise
        finally:
            consumer.close()

    def _reconcile(self) -> None:
        """Every few seconds: alerts ClickHouse holds that the page may have missed, the
        departments of new alerts, and feed health."""
        last_feeds = 0.0
        since = datetime.now(tz=UTC) - timedelta(seconds=KEEP_RESOLVED_S)
        while not self._stop.is_set():
            try:
                self._load_alerts(since)
                since = datetime.now(tz=UTC) - timedelta(seconds=60)
                self._fill_departments()
                if time.monotonic() - last_feeds >= FEEDS_S:
                    self._refresh_feeds()
                    last_feeds = time.monotonic()
                    cutoff = datetime.now(tz=UTC) - timedelta(seconds=KEEP_RESOLVED_S)
                    self.board.prune(_iso(cutoff) or "")
                    if self._loop is not None:
                        self._loop.call_soon_threadsafe(self._publish_feeds)
                        self._loop.call_soon_threadsafe(self._forget_stale)
            except QueryError as exc:
                log.warning("console reconcile: %s", exc)
            except Exception:  # one bad round must not end the thread; /healthz watches it
                log.exception("console reconcile failed; trying again")
            self._stop.wait(RESYNC_S)

    def _load_alerts(self, since: datetime) -> None:
        columns = ", ".join(ALERT_FIELDS)
        result = self.query(
            f"SELECT {columns} FROM {self.database}.alert_current FINAL "
            f"WHERE updated_time >= {_ch_time(since)} OR status != 'resolved' "
            "ORDER BY updated_time LIMIT 5000"
        )
        for row in result.rows:
            self._merged(alert_view(dict(zip(result.columns, row, strict=True))))

    def _fill_departments(self) -> None:
        missing = self.board.without_department()[:500]
        if not missing:
            return
        keys = sorted({a["person_key"] for a in missing})
        result = self.query(
            "SELECT organisation_id, person_key, "
            "argMax(ifNull(department_code, department_local), event_time) "
            f"FROM {self.database}.encounter FINAL WHERE person_key IN "
            f"({', '.join(sql_string(k) for k in keys)}) GROUP BY organisation_id, person_key"
        )
        found = {(org, key): department for org, key, department in result.rows}
        for alert in missing:
            department = found.get((alert["organisation_id"], alert["person_key"]))
            if department:
                self._merged(dict(alert, department=department))

    def _refresh_feeds(self) -> None:
        rows = self.query(
            "SELECT organisation_id, event_type, sum(count) / 120 AS per_second, "
            "max(minute) AS last_minute "
            f"FROM {self.database}.monitoring_per_minute "
            "WHERE minute >= now() - INTERVAL 3 MINUTE AND minute < toStartOfMinute(now()) "
            "GROUP BY organisation_id, event_type ORDER BY organisation_id, event_type"
        )
        self.feeds = {
            "rows": [
                {"organisation_id": org, "event_type": kind, "per_second": round(rate, 2),
                 "last_minute": _iso(last)}
                for org, kind, rate, last in rows.rows
            ],
            "lag": self._sink_lag(),
            "updated": _iso(datetime.now(tz=UTC)),
        }

    def _sink_lag(self) -> int | None:
        """Records the sink has yet to store (the broker's end offsets minus its commits).
        On tansu the end offsets under-count (see README)."""
        consumer = Consumer(
            self.kafka.librdkafka(**{"group.id": SinkSettings().group_id})
        )
        try:
            topics = consumer.list_topics(timeout=10).topics
            wanted = [
                TopicPartition(name, p)
                for name, meta in topics.items()
                if not name.startswith("__")
                for p in meta.partitions
            ]
            committed = consumer.committed(wanted, timeout=10)
            lag = 0
            for tp in committed:
                if tp.offset < 0:
                    continue
                _, high = consumer.get_watermark_offsets(tp, timeout=10, cached=False)
                lag += max(0, high - tp.offset)
            return lag
        except Exception as exc:
            log.warning("sink lag unavailable: %s", exc)
            return None
        finally:
            consumer.close()

    def _feeds_for(self, user: User) -> dict[str, Any]:
        silent = [
            {"alert_id": a["alert_id"], "rule_id": a["rule_id"],
             "organisation_id": a["organisation_id"], "subject": a["subject"],
             "since": a["first_event_time"]}
            for a in self.board.visible_to(user)
            if a["status"] != "resolved" and a["rule_id"] in SILENCE_RULES
        ]
        dead_letters = [
            r for r in self.feeds["rows"]
            if r["event_type"] == "dead_letter" and user.sees(r["organisation_id"])
        ]
        return {
            "rows": [
                r for r in self.feeds["rows"]
                if r["event_type"] not in ("dead_letter", "alert_opened")
                and user.sees(r["organisation_id"])
            ],
            "dead_letters": dead_letters,
            "silent": silent,
            "lag": self.feeds["lag"] if user.all_organisations else None,
            "updated": self.feeds["updated"],
        }

    async def get_feeds(self, request: web.Request) -> web.Response:
        """Feed health in the user's scope."""
        user, _ = self._user_of(request)
        return web.json_response(self._feeds_for(user))

    async def act(self, request: web.Request) -> web.Response:
        """Acknowledge or resolve an alert, with an optional note."""
        user, _ = self._user_of(request, csrf=True)
        alert_id, action = request.match_info["alert_id"], request.match_info["action"]
        inputs = {"acknowledge": INPUT_ACKNOWLEDGE, "resolve": INPUT_RESOLVE}
        if action not in inputs:
            raise web.HTTPNotFound()
        audit_action = f"alert_{action}"
        alert = self.board.get(alert_id)
        if alert is None or not user.sees(alert["organisation_id"]):
            await self._audit(user.name, user.role, audit_action, "refused", request,
                              target=alert_id, detail="no such alert in the user's scope")
            return web.json_response({"error": f"no alert {alert_id} in your scope"}, status=404)
        try:
            body = await request.json() if request.can_read_body else {}
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return web.json_response({"error": "send a JSON object"}, status=400)
        note = str(body.get("note") or "").strip() or None
        if not user.permissions.act_on_alerts:
            await self._audit(user.name, user.role, audit_action, "refused", request,
                              target=alert_id, detail=f"role {user.role} may not act on alerts")
            return web.json_response(
                {"error": f"role {user.role} may not acknowledge or resolve alerts"}, status=403
            )
        state = AlertState(
            alert_id, alert["rule_id"], alert["subject"], alert["status"],
            alert["organisation_id"],
        )
        clean_note = scrub_text(note).text if note else ""
        try:
            check_action(state, inputs[action], user.name)
        except AlertActionError as exc:  # what ClickHouse or the live stream already shows
            reason = f"{action} refused: {exc}"
            await self._audit(user.name, user.role, audit_action, "refused", request,
                              target=alert_id, detail=reason)
            return web.json_response({"outcome": "refused", "error": reason}, status=409)
        loop = asyncio.get_running_loop()
        try:  # audited before it is sent (fail closed); the real outcome is audited after
            await self._audit(user.name, user.role, audit_action, "requested", request,
                              target=alert_id, detail=clean_note)
        except AuditError as exc:
            return web.json_response({"error": f"{exc}: nothing was done"}, status=503)
        try:
            outcome = await loop.run_in_executor(
                None,
                lambda: request_action(
                    self.kafka, self.registry, state, inputs[action], user.name, note,
                    self.settings.action_answer_s,
                ),
            )
        except AlertActionError as exc:
            await self._audit(user.name, user.role, audit_action, "failed", request,
                              target=alert_id, detail=str(exc))
            return web.json_response({"outcome": "failed", "error": str(exc)}, status=503)
        try:
            await self._audit(user.name, user.role, audit_action, outcome.audit_outcome,
                              request, target=alert_id, detail=_outcome_detail(outcome, clean_note))
        except AuditError:  # the action was requested on the record; it cannot be undone
            log.exception("the outcome of an alert action was not recorded")
        return web.json_response(_outcome_body(outcome), status=_outcome_status(outcome))

    async def timeline(self, request: web.Request) -> web.Response:
        """The patient's events around an alert (same organisation, +-12 h)."""
        user, _ = self._user_of(request)
        alert_id = request.match_info["alert_id"]
        alert = self.board.get(alert_id)
        if alert is None or not user.sees(alert["organisation_id"]):
            await self._audit(user.name, user.role, "query", "refused", request,
                              target=alert_id, detail="patient timeline: alert not in scope")
            return web.json_response({"error": "no such alert in your scope"}, status=404)
        if not user.permissions.patient_timeline:
            await self._audit(user.name, user.role, "query", "refused", request,
                              target=alert_id, detail="patient timeline: role not allowed")
            return web.json_response(
                {"error": f"role {user.role} does not see patient timelines"}, status=403
            )
        if not alert.get("person_key") or not alert.get("first_event_time"):
            return web.json_response({"alert_id": alert["alert_id"], "events": []})
        around = alert["first_event_time"].replace("Z", "")
        sql = (
            "SELECT kind, event_time, code, local_code, value, unit, mapping_status "
            f"FROM {self.database}.person_event "
            f"WHERE record_key = {sql_string(alert['person_key'])} "
            f"AND organisation_id = {sql_string(alert['organisation_id'])} "
            f"AND event_time BETWEEN parseDateTime64BestEffort({sql_string(around)}, 3, 'UTC') "
            f"- INTERVAL {TIMELINE_HOURS} HOUR AND parseDateTime64BestEffort("
            f"{sql_string(around)}, 3, 'UTC') + INTERVAL {TIMELINE_HOURS} HOUR "
            f"ORDER BY event_time DESC LIMIT {TIMELINE_ROWS}"
        )
        loop = asyncio.get_running_loop()
        try:
            settings = await loop.run_in_executor(None, self.governor.settings_for, user)
            result = await loop.run_in_executor(None, lambda: self.query(sql, settings))
        except QueryError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        try:
            await self._audit(user.name, user.role, "query", "ok", request,
                              target=alert["alert_id"], detail="patient timeline of the alert",
                              rows=len(result.rows))
        except AuditError as exc:
            return web.json_response({"error": f"{exc}: the timeline is withheld"}, status=503)
        events = [
            {"kind": k, "event_time": _iso(t), "code": c, "local_code": lc, "value": v,
             "unit": u, "mapping_status": m}
            for k, t, c, lc, v, u, m in result.rows
        ]
        return web.json_response({"alert_id": alert["alert_id"], "events": events})

    # ------------------------------------------------------------------ SQL and audit

    async def _user_for_api(self, request: web.Request) -> User:
        """Session (with CSRF) or HTTP Basic credentials, for scripts; Basic sign-ins are
        throttled and audited like the sign-in form."""
        header = request.headers.get("Authorization", "")
        if not header.startswith("Basic "):
            return self._user_of(request, csrf=True)[0]
        import base64

        try:
            name, _, password = base64.b64decode(header[6:]).decode().partition(":")
        except ValueError:
            name, password = "", ""
        challenge = {"WWW-Authenticate": 'Basic realm="medstream"'}
        return await self._authenticate(name, password, request, "http", challenge)

    async def sql(self, request: web.Request) -> web.StreamResponse:
        """Governed read-only SQL: ``{"sql": ..., "format": "json"|"csv"|"arrow"}``, sent
        as application/json (a form or text/plain post from another site is refused)."""
        if request.headers.get("Authorization", "").startswith("Basic "):
            self._check_csrf(request, None)  # scripts send no Origin; a web page does
        if request.content_type != "application/json":
            return web.json_response(
                {"error": "send the query as application/json"}, status=415
            )
        user = await self._user_for_api(request)
        channel = "http" if request.headers.get("Authorization") else "console"
        try:
            body = await request.json()
            statement, output = str(body["sql"]), str(body.get("format", "json"))
        except (ValueError, KeyError, TypeError, AttributeError):
            return web.json_response({"error": "send JSON with sql (and format)"}, status=400)
        if output not in ("json", "csv", "arrow"):
            return web.json_response({"error": "format is json, csv or arrow"}, status=400)
        loop = asyncio.get_running_loop()
        max_rows, timeout_s = self.settings.sql_max_rows, self.settings.sql_timeout_s
        try:
            governed = await loop.run_in_executor(None, self.governor.check, user, statement)
        except QueryError as exc:
            await self._audit(user.name, user.role, "query", "refused", request, channel,
                              target=statement_digest(statement),
                              detail=scrub_text(f"{statement}\n-- refused: {exc}").text)
            return web.json_response({"error": str(exc)}, status=400)
        ran = governed.sql  # audited in full with its digest: exactly the text that runs
        try:
            result = await loop.run_in_executor(
                None, lambda: self.query(ran, governed.settings, max_rows, timeout_s)
            )
        except QueryError as exc:  # refused by the check, timed out, or an engine error
            outcome = "refused" if isinstance(exc, QueryRefused) else "failed"
            await self._audit(user.name, user.role, "query", outcome, request, channel,
                              target=statement_digest(ran),
                              detail=scrub_text(f"{ran}\n-- failed: {exc}").text)
            return web.json_response({"error": str(exc)}, status=400)
        try:
            await self._audit(user.name, user.role, "query", "ok", request, channel,
                              target=statement_digest(ran), detail=scrub_text(ran).text,
                              rows=len(result.rows))
        except AuditError as exc:
            return web.json_response({"error": f"{exc}: the result is withheld"}, status=503)
        try:
            payload = arrow_stream(result) if output == "arrow" else b""
        except Exception as exc:  # pyarrow cannot represent some ClickHouse types
            return web.json_response(
                {"error": f"the result has no Arrow form ({exc}); use json or csv"}, status=400
            )
        headers = {"X-Medstream-Truncated": "1" if result.truncated else "0"}
        if output == "csv":
            text = io.StringIO()
            write_csv(text, result.columns, result.rows)
            return web.Response(text=text.getvalue(), content_type="text/csv", headers=headers)
        if output == "arrow":
            return web.Response(
                body=payload, headers=headers,
                content_type="application/vnd.apache.arrow.stream",
            )
        return web.json_response(
            {"columns": result.columns, "rows": result.rows, "truncated": result.truncated},
            dumps=lambda v: json.dumps(v, default=_json_value), headers=headers,
        )

    async def get_audit(self, request: web.Request) -> web.Response:
        """The newest audit events (admins)."""
        from medstream.audit import audit_query, rows_of

        user, _ = self._user_of(request)
        if not (user.permissions.read_audit and user.all_organisations):
            await self._audit(user.name, user.role, "audit_read", "refused", request,
                              detail="the audit log is for admins of every organisation")
            return web.json_response(
                {"error": "the audit log is for admins of every organisation"}, status=403
            )
        try:
            limit = max(1, min(int(request.query.get("limit", "200")), 5000))
        except ValueError:
            return web.json_response({"error": "limit is a number"}, status=400)
        loop = asyncio.get_running_loop()
        try:
            result = await loop.run_in_executor(
                None, lambda: self.query(audit_query(self.database, limit=limit))
            )
        except QueryError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        try:
            await self._audit(user.name, user.role, "audit_read", "ok", request,
                              detail=f"newest {limit} audit events", rows=len(result.rows))
        except AuditError as exc:
            return web.json_response({"error": f"{exc}: the audit log is withheld"}, status=503)
        return web.json_response(
            {"events": rows_of(result)}, dumps=lambda v: json.dumps(v, default=_json_value)
        )

    def stop(self) -> None:
        """Stop the background threads."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)


def arrow_stream(result: QueryResult) -> bytes:
    """A query result as an Arrow IPC stream."""
    import pyarrow as pa

    if len(set(result.columns)) != len(result.columns):
        raise ValueError("column names repeat: give each column its own alias")
    table = pa.table(
        {name: [row[i] for row in result.rows] for i, name in enumerate(result.columns)}
    )
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue().to_pybytes())


def _json_value(value: Any) -> Any:
    if isinstance(value, datetime):
        return _iso(value)
    return str(value)


def _error(message: str) -> str:
    return json.dumps({"error": message})


SIGN_IN_FAILED: Final = "sign-in failed: unknown user, wrong password or disabled user"


class RequestRefused(web.HTTPForbidden):
    """A 403 for a cross-origin request or a missing CSRF token; the security middleware
    records it in the audit trail (``actor`` is the session's user, if any)."""

    def __init__(self, reason: str, actor: str = "", role: str = "") -> None:
        super().__init__(text=_error(reason), content_type="application/json")
        self.refusal, self.actor, self.role = reason, actor, role

    def __str__(self) -> str:
        return self.refusal


def _audit_name(name: str) -> str:
    """A sign-in name as the audit trail keeps it: one too long for an account is cut."""
    if len(name) <= SIGN_IN_NAME_MAX:
        return name
    return f"{name[:SIGN_IN_NAME_MAX]}...[{len(name)} characters]"


def _outcome_detail(outcome: ActionOutcome, note: str) -> str:
    """The audit detail of an action's outcome: the note, and why when not applied."""
    if outcome.applied:
        return note
    return f"{outcome.message}" + (f" (note: {note})" if note else "")


def _outcome_body(outcome: ActionOutcome) -> dict[str, Any]:
    body: dict[str, Any] = {
        "outcome": outcome.outcome, "action": outcome.action, "alert_id": outcome.alert_id,
        "status": outcome.status, "message": outcome.message,
    }
    if not outcome.applied:
        body["error"] = outcome.message
    return body


def _outcome_status(outcome: ActionOutcome) -> int:
    """200 applied, 409 refused, 504 no answer in time, 503 not delivered to the broker."""
    if outcome.applied:
        return 200
    if outcome.outcome == "refused":
        return 409
    return 504 if outcome.outcome == TIMED_OUT else 503


def _ch_time(value: datetime) -> str:
    return f"toDateTime64('{value.strftime('%Y-%m-%d %H:%M:%S.%f')[:-3]}', 3, 'UTC')"


def _offer(queue: asyncio.Queue[tuple[str, Any] | None], item: tuple[str, Any]) -> None:
    """Queue an event; a subscriber that stopped reading is closed, not waited for."""
    try:
        queue.put_nowait(item)
    except asyncio.QueueFull:
        _close(queue)


def _close(queue: asyncio.Queue[tuple[str, Any] | None]) -> None:
    """End a stream: drop what it has not read and queue the end marker."""
    while not queue.empty():
        queue.get_nowait()
    queue.put_nowait(None)


async def _send(response: web.StreamResponse, kind: str, payload: Any) -> None:
    data = json.dumps(payload, default=_json_value)
    await response.write(f"event: {kind}\ndata: {data}\n\n".encode())


def run_console(console: Console, host: str, port: int, on_ready: Callable[[str], None]) -> None:
    """Serve until SIGINT/SIGTERM."""
    app = console.application()

    async def started(_app: web.Application) -> None:
        on_ready(f"http://{host}:{port}/")

    app.on_startup.append(started)
    web.run_app(app, host=host, port=port, print=None, handle_signals=True,
                access_log=None)
    console.stop()

