"""The embedded engine's query endpoint: read-only queries for commands beside the sink.

The embedded engine (chdb) can be opened by one process only: the sink under `medstream
up`. It serves ``POST /query`` on 127.0.0.1 for the console, `medstream sql`, `medstream
reconcile` and the supervisor. Every request must carry the run's token (a random secret
in an owner-only file next to runtime.json), name the endpoint's own address in Host (no
DNS rebinding), send JSON and no Origin (no web page); every statement is checked like any
other (medstream.clickhouse.run_read_only) and bounded in time, memory and result size.

Queries run on their own engine handles, never under the sink's lock: an analyst's slow
query costs CPU but never holds up an insert. At most ``handles`` run at once; more wait
briefly and are then refused as busy.
"""

from __future__ import annotations

import json
import os
import queue
import re
import secrets
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Final

from clickhouse_connect.driver.client import Client

from medstream.clickhouse import (
    DEFAULT_LIMITS,
    ORGANISATION_FILTER,
    PROOF_MAX_ROWS,
    USER_MAX_ROWS,
    QueryError,
    QueryLimits,
    QueryRefused,
    QueryResult,
    run_read_only,
)

#: The largest request body accepted (a statement is at most 64 KiB; settings add some).
MAX_REQUEST_BYTES: Final = 256 * 1024
#: How long a request waits for a free engine handle before it is refused as busy.
BUSY_WAIT_S: Final = 5.0


def write_query_token(path: Path) -> str:
    """A new random token, written to ``path`` readable by its owner only."""
    token = secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.unlink(missing_ok=True)
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(token)
    os.replace(temporary, path)
    return token


class QueryTokenMissing(QueryError):
    """No query token: no sink serves queries now (the exiting sink removes its token, a
    started one writes a new one), as while `medstream up` restarts the sink."""


def read_query_token(path: Path) -> str:
    """The token of the running query endpoint; QueryTokenMissing when there is none (no
    sink serving), QueryError when it exists but cannot be read."""
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        raise QueryTokenMissing(
            f"the query endpoint's token {path} does not exist: no sink serves queries "
            "right now (stopped, or restarting: a started sink writes a new token); try "
            "again once `medstream up` shows the sink running, with the MEDSTREAM_DATA_DIR "
            "it runs on"
        ) from None
    except OSError as exc:
        raise QueryError(
            f"the query endpoint's token {path} cannot be read ({exc.strerror}): run this "
            "command as the user who started `medstream up`, with the same MEDSTREAM_DATA_DIR"
        ) from exc


class QueryGateway:
    """Serves checked read-only queries on engine handles of its own (POST /query, JSON)."""

    def __init__(
        self,
        open_client: Callable[[], Client],
        database: str,
        token: str,
        port: int = 0,
        handles: int = 2,
        limits: QueryLimits = DEFAULT_LIMITS,
        max_timeout_s: int = 600,
    ) -> None:
        """``open_client`` opens one more handle on the engine (called ``handles`` times)."""
        if len(token) < 32:
            raise ValueError("the query endpoint needs a token of at least 32 characters")
        self.database = database
        self.limits = limits
        self.max_timeout_s = max_timeout_s
        self._token = token.encode()
        self._clients: queue.Queue[Client] = queue.Queue()
        self._opened = [open_client() for _ in range(max(1, handles))]
        for client in self._opened:
            self._clients.put(client)
        self._server = ThreadingHTTPServer(("127.0.0.1", port), _handler(self))
        self.port = int(self._server.server_address[1])
        self.hosts = frozenset({f"127.0.0.1:{self.port}", f"localhost:{self.port}"})
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        """Where the gateway listens."""
        return f"http://127.0.0.1:{self.port}/query"

    def start(self) -> None:
        """Serve in a background thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the engine handles."""
        self._server.shutdown()
        self._server.server_close()
        for client in self._opened:
            client.close()

    def refusal(self, method: str, path: str, headers: Any) -> tuple[int, str] | None:
        """(status, reason) when a request must be refused before its body is read."""
        if path != "/query":
            return 404, "the query endpoint serves POST /query only"
        if method != "POST":
            return 405, "the query endpoint serves POST /query only"
        if headers.get("Host", "") not in self.hosts:
            return 403, (
                f"Host {headers.get('Host', '')!r} refused: the query endpoint answers only "
                f"requests addressed to {self.url}"
            )
        if headers.get("Origin") is not None:
            return 403, "requests from web pages (with an Origin header) are refused"
        content_type = headers.get("Content-Type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            return 415, "send the query as application/json"
        scheme, _, supplied = headers.get("Authorization", "").partition(" ")
        if scheme != "Bearer" or not secrets.compare_digest(supplied.strip().encode(), self._token):
            return 401, (
                "missing or wrong token: send the token of this run (the query.token file "
                "next to runtime.json) as 'Authorization: Bearer <token>'"
            )
        return None

    def answer(self, request: Any) -> QueryResult:
        """Run one request's query on a free handle; QueryError when refused or failed."""
        if not isinstance(request, dict):
            raise QueryError("send a JSON object with sql (and timeout_s, max_rows, settings)")
        try:
            timeout_s = min(max(1, int(request.get("timeout_s", 60))), self.max_timeout_s)
            max_rows = min(max(1, int(request.get("max_rows", USER_MAX_ROWS))), PROOF_MAX_ROWS)
        except (TypeError, ValueError) as exc:
            raise QueryError("timeout_s and max_rows are whole numbers") from exc
        settings = governed_settings(request.get("settings"))
        try:
            client = self._clients.get(timeout=BUSY_WAIT_S)
        except queue.Empty:
            raise QueryError(
                "the query endpoint is busy with other queries: try again shortly"
            ) from None
        try:
            return run_read_only(
                client, str(request.get("sql", "")), self.database, timeout_s, max_rows,
                settings, self.limits,
            )
        finally:
            self._clients.put(client)


def governed_settings(settings: Any) -> dict[str, Any] | None:
    """The settings a gateway request may add: ``readonly=1``, row filters, and scalar
    subqueries left unfolded for a governed check (they narrow, never widen, what a query
    sees)."""
    if not settings:
        return None
    allowed = {"readonly", "additional_table_filters", "enable_scalar_subquery_optimization"}
    if not isinstance(settings, dict) or set(settings) - allowed:
        raise QueryError(f"a query may only add the settings {sorted(allowed)}")
    if settings.get("readonly", 1) != 1:
        raise QueryError("a query may only tighten readonly to 1")
    if settings.get("enable_scalar_subquery_optimization", 0) != 0:
        raise QueryError("scalar subquery optimisation may only be turned off")
    filters = settings.get("additional_table_filters", {})
    # A row filter is SQL the engine runs on every row: only the organisation filter the
    # governor builds is taken, never an expression (it could read files or other tables).
    if not isinstance(filters, dict) or not all(
        isinstance(table, str) and isinstance(condition, str)
        and _TABLE_NAME.fullmatch(table) and ORGANISATION_FILTER.fullmatch(condition)
        for table, condition in filters.items()
    ):
        raise QueryError(
            "a row filter may only be organisation_id IN ('<organisation>', ...) on a "
            "database.table name"
        )
    return {"readonly": 1, **settings}


_TABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*")


def _handler(gateway: QueryGateway) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            refused = gateway.refusal(self.command, self.path, self.headers)
            if refused is not None:
                self._reply(refused[0], {"error": refused[1]})
                return
            try:
                length = int(self.headers.get("Content-Length", "0"))
            except ValueError:
                length = -1
            if not 0 <= length <= MAX_REQUEST_BYTES:
                self._reply(413, {"error": f"a request may have at most {MAX_REQUEST_BYTES} "
                                           "bytes"})
                return
            try:
                result = gateway.answer(json.loads(self.rfile.read(length) or b"{}"))
            except (QueryError, ValueError) as exc:
                self._reply(400, {"error": str(exc), "refused": isinstance(exc, QueryRefused)})
                return
            self._reply(200, {
                "columns": result.columns, "rows": result.rows, "truncated": result.truncated,
            })

        do_POST = do_GET = do_PUT = do_DELETE = do_PATCH = _serve  # noqa: N815 (http.server)

        def _reply(self, status: int, body: dict[str, Any]) -> None:
            payload = json.dumps(body, default=str).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:
            return  # queries may carry patient pseudonyms; they are not logged here

    return Handler


def query_via_gateway(
    url: str,
    sql: str,
    timeout_s: int = 60,
    max_rows: int = USER_MAX_ROWS,
    settings: dict[str, Any] | None = None,
    *,
    token: str,
) -> QueryResult:
    """Send one read-only query to a running gateway (``settings`` as for run_read_only);
    QueryError when it is refused, fails, or the gateway does not answer in time."""
    body = {"sql": sql, "timeout_s": timeout_s, "max_rows": max_rows, "settings": settings}
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s + 10) as response:
            answer = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            answer = json.loads(exc.read() or b"{}")
        except ValueError:
            answer = {}
        error = QueryRefused if answer.get("refused") else QueryError
        raise error(answer.get("error", f"HTTP {exc.code}")) from exc
    except (OSError, ValueError) as exc:  # refused, reset, timed out, or not JSON
        raise QueryError(f"the query endpoint {url} did not answer ({exc})") from exc
    return QueryResult(answer["columns"], answer["rows"], answer["truncated"])
