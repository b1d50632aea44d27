"""Who may see what: medstream's users, roles, organisation scope and governed queries.

One role model serves every door: the alert console, its SQL endpoint, `medstream sql
--user` and, for server deployments, the ClickHouse users, roles, column grants and row
policies that `medstream grants` generates from it.

- **monitor** watches live alerts of its organisations, acknowledges and resolves them and
  sees a patient's recent timeline; it has no SQL access.
- **analyst** reads de-identified data: the views of the ``<db>_analyst`` database (no
  direct or quasi-identifier columns), the data dictionary and the monitoring rollups; it
  cannot act on alerts.
- **admin** reads every medstream table (read-only), the audit log, and acts on alerts;
  an admin scoped to some organisations reads only the organisation-filtered objects
  (below) and no audit log, whose rows belong to no single organisation.

A user's organisation scope (a list of organisation ids, or ``*``) limits every row the
user reads: ClickHouse itself applies it to every base table with an ``organisation_id``
column, whichever view or join reaches that table (``additional_table_filters`` in the
embedded engine, row policies on a server). Scoping is deny-by-default: a scoped user may
name only the objects of ``ORGANISATION_SCOPED_OBJECTS`` (each carries that filter), the
analyst views and the shared reference data; materialised views (their reads skip the
filter of the table they fill), the lineage, the raw ledger, the audit log and every
object a later migration adds are refused until they are listed. Passwords are bcrypt
hashes (a standard KDF that ClickHouse also accepts for its own users).
"""

from __future__ import annotations

import functools
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

import bcrypt
import yaml

from medstream import sqlcheck
from medstream.clickhouse import QueryError, QueryResult, sql_string
from medstream.sqlcheck import SAFE_TABLE_FUNCTIONS

#: Sensitivity tags of the Avro contracts, least sensitive first.
SENSITIVITY_ORDER: Final = (
    "operational", "clinical", "pseudonym", "quasi_identifier", "direct_identifier",
)
ALL_ORGANISATIONS: Final = "*"
MIN_PASSWORD_LENGTH: Final = 10
BCRYPT_ROUNDS: Final = 12
_USER_NAME = re.compile(r"^[a-z][a-z0-9_.-]{1,62}$")
_ORGANISATION = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
#: Lines of a query's parse or analysis tree that are read to check it (more: refused).
EXPLAIN_MAX_ROWS: Final = 200_000
#: How long the list of organisation-scoped tables is reused before it is read again.
SCOPE_REFRESH_S: Final = 60.0


class AccessError(PermissionError):
    """Sign-in failed or the user's role does not allow the action; the message says why."""


@dataclass(frozen=True, slots=True)
class Role:
    """What one role may do."""

    name: str
    act_on_alerts: bool
    patient_timeline: bool
    sql: str  # "none", "analyst" (de-identified views) or "all" (every medstream table)
    read_audit: bool
    clearance: str  # the most sensitive column tag the role may read
    summary: str
    # An open live page renews the session's idle timer (a monitoring screen nobody
    # clicks on); for the roles with SQL access only requests do.
    live_page_keeps_session: bool = False


ROLES: Final[dict[str, Role]] = {
    "monitor": Role(
        "monitor", act_on_alerts=True, patient_timeline=True, sql="none", read_audit=False,
        clearance="pseudonym",
        summary="watches live alerts, acknowledges and resolves them, sees patient timelines",
        live_page_keeps_session=True,
    ),
    "analyst": Role(
        "analyst", act_on_alerts=False, patient_timeline=False, sql="analyst",
        read_audit=False, clearance="pseudonym",
        summary="reads de-identified analyst views, the data dictionary and monitoring rollups",
    ),
    "admin": Role(
        "admin", act_on_alerts=True, patient_timeline=True, sql="all", read_audit=True,
        clearance="direct_identifier",
        summary="reads every medstream table and the audit log, acts on alerts",
    ),
}


def role(name: str) -> Role:
    """The role called ``name``; a clear error for an unknown one."""
    try:
        return ROLES[name]
    except KeyError:
        raise AccessError(f"unknown role {name!r} (roles: {', '.join(ROLES)})") from None


@dataclass(frozen=True, slots=True)
class User:
    """A person who signs in: name, role, organisations in scope, bcrypt password hash."""

    name: str
    role: str
    organisations: tuple[str, ...]
    password_hash: str = field(repr=False)
    disabled: bool = False

    @property
    def all_organisations(self) -> bool:
        """True when the scope is every organisation."""
        return ALL_ORGANISATIONS in self.organisations

    def sees(self, organisation_id: str | None) -> bool:
        """Whether a row of this organisation is in the user's scope."""
        return self.all_organisations or (organisation_id or "") in self.organisations

    @property
    def reads_audit(self) -> bool:
        """Whether the user may read the audit log: its rows (sign-ins, queries, actions)
        carry no organisation, so only a role that reads audits, scoped to every
        organisation, does."""
        return self.permissions.read_audit and self.all_organisations

    @property
    def permissions(self) -> Role:
        """The user's role."""
        return role(self.role)

    def public(self) -> dict[str, Any]:
        """What the console may show about the user (never the hash)."""
        permissions = self.permissions
        return {
            "name": self.name,
            "role": self.role,
            "organisations": list(self.organisations),
            "act_on_alerts": permissions.act_on_alerts,
            "patient_timeline": permissions.patient_timeline,
            "sql": permissions.sql != "none",
            "read_audit": self.reads_audit,
        }


def hash_password(password: str) -> str:
    """A bcrypt hash of ``password``; refuses passwords that are too short or too long."""
    if len(password) < MIN_PASSWORD_LENGTH:
        raise AccessError(f"a password needs at least {MIN_PASSWORD_LENGTH} characters")
    if len(password.encode()) > 72:
        raise AccessError("a password may have at most 72 bytes (bcrypt's limit)")
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(BCRYPT_ROUNDS)).decode()


def _check_name(name: str) -> str:
    if not _USER_NAME.match(name):
        raise AccessError(
            f"invalid user name {name!r}: 2-63 characters, lower-case letters, digits, "
            "'_', '.', '-', starting with a letter"
        )
    return name


def _check_organisations(organisations: Iterable[str]) -> tuple[str, ...]:
    scope = tuple(dict.fromkeys(o.strip() for o in organisations if o.strip()))
    if not scope:
        raise AccessError("a user needs at least one organisation, or '*' for all of them")
    if ALL_ORGANISATIONS in scope and len(scope) > 1:
        raise AccessError("'*' (all organisations) cannot be combined with named ones")
    for organisation in scope:
        if organisation != ALL_ORGANISATIONS and not _ORGANISATION.match(organisation):
            raise AccessError(f"invalid organisation id {organisation!r}")
    return scope


@functools.cache
def _no_user_hash() -> bytes:
    """A hash that no password matches, checked when the user is unknown so that a failed
    sign-in takes the same time whether or not the name exists."""
    return bcrypt.hashpw(b"no such user", bcrypt.gensalt(BCRYPT_ROUNDS))


class UserStore:
    """The users file (YAML, owner-only permissions): medstream's accounts.

    Every change rewrites the file atomically; readers always reload it, so a user added or
    disabled with `medstream users` takes effect at the console's next sign-in.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._cache: tuple[tuple[int, int, int], dict[str, User]] | None = None

    def users(self) -> dict[str, User]:
        """Every user, by name (an absent file holds none). The file is read again only
        when it changed."""
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return {}
        stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        if self._cache is not None and self._cache[0] == stamp:
            return dict(self._cache[1])
        document = yaml.safe_load(self.path.read_text()) or {}
        found: dict[str, User] = {}
        for entry in document.get("users", []):
            user = User(
                name=str(entry["name"]),
                role=str(entry["role"]),
                organisations=tuple(str(o) for o in entry.get("organisations", [])),
                password_hash=str(entry["password_hash"]),
                disabled=bool(entry.get("disabled", False)),
            )
            found[user.name] = user
        self._cache = (stamp, found)
        return dict(found)

    def get(self, name: str) -> User:
        """One user; AccessError when there is none."""
        user = self.users().get(name)
        if user is None:
            raise AccessError(f"no user {name!r} (see `medstream users list`)")
        return user

    def _write(self, users: dict[str, User]) -> None:
        document = {
            "users": [
                {
                    "name": u.name,
                    "role": u.role,
                    "organisations": list(u.organisations),
                    "password_hash": u.password_hash,
                    "disabled": u.disabled,
                }
                for u in sorted(users.values(), key=lambda u: u.name)
            ]
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(self.path.name + ".tmp")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(
                "# medstream users: managed by `medstream users`; passwords are bcrypt hashes\n"
            )
            yaml.safe_dump(document, handle, sort_keys=False)
        os.replace(temporary, self.path)

    def new_user(
        self, name: str, role_name: str, organisations: Iterable[str], password: str
    ) -> User:
        """A checked new user (not saved yet); refuses an existing name."""
        if _check_name(name) in self.users():
            raise AccessError(f"user {name!r} exists (use `medstream users set` to change it)")
        return User(
            name, role(role_name).name, _check_organisations(organisations),
            hash_password(password),
        )

    def add(self, name: str, role_name: str, organisations: Iterable[str], password: str) -> User:
        """Create a user; refuses an existing name."""
        return self.save(self.new_user(name, role_name, organisations, password))

    def save(self, user: User) -> User:
        """Write one user (new or changed)."""
        users = self.users()
        users[user.name] = user
        self._write(users)
        return user

    def update(
        self,
        name: str,
        role_name: str | None = None,
        organisations: Iterable[str] | None = None,
        password: str | None = None,
        disabled: bool | None = None,
    ) -> User:
        """Change a user's role, scope, password or disabled flag."""
        return self.save(self.changed(name, role_name, organisations, password, disabled))

    def changed(
        self,
        name: str,
        role_name: str | None = None,
        organisations: Iterable[str] | None = None,
        password: str | None = None,
        disabled: bool | None = None,
    ) -> User:
        """A user with the changes applied and checked (not saved yet)."""
        user = self.get(name)
        if role_name is not None:
            user = replace(user, role=role(role_name).name)
        if organisations is not None:
            user = replace(user, organisations=_check_organisations(organisations))
        if password is not None:
            user = replace(user, password_hash=hash_password(password))
        if disabled is not None:
            user = replace(user, disabled=disabled)
        return user

    def remove(self, name: str) -> None:
        """Delete a user."""
        users = self.users()
        self.get(name)
        del users[name]
        self._write(users)

    def authenticate(self, name: str, password: str) -> User:
        """The user when the password matches; one AccessError for every failure (it does
        not tell an unknown name from a wrong password)."""
        user = self.users().get(name)
        hashed = user.password_hash.encode() if user else _no_user_hash()
        matches = bcrypt.checkpw(password.encode()[:72], hashed)
        if user is None or not matches or user.disabled:
            raise AccessError("sign-in failed: unknown user, wrong password or disabled user")
        return user


# --------------------------------------------------------------------------- governance

def analyst_database(database: str) -> str:
    """The database of the de-identified analyst views."""
    return f"{database}_analyst"


_LEADING_COMMENTS = re.compile(r"^(\s+|--[^\n]*\n?|/\*.*?\*/)*", re.DOTALL)
_TABLE_NODE = re.compile(r"^\s*TABLE id: \d+,.*?table_name: ([^,\s]+)", re.MULTILINE)
_TABLE_FUNCTION_NODE = re.compile(
    r"^\s*TABLE_FUNCTION id: \d+,.*?table_function_name: ([^,\s]+)", re.MULTILINE
)


def query_text(sql: str) -> str:
    """The statement without leading comments or a trailing semicolon; refuses anything
    but one SELECT (or WITH ... SELECT) statement of at most MAX_QUERY_CHARS."""
    statement = _LEADING_COMMENTS.sub("", sql, count=1).strip().rstrip(";").strip()
    try:
        sqlcheck.check_size(statement)
        if not re.match(r"^(SELECT|WITH)\b", statement, re.IGNORECASE):
            raise QueryError(
                "only one read-only SELECT statement is allowed: writes, DDL and other "
                "statements are refused"
            )
        sqlcheck.check_one_statement(statement)
    except sqlcheck.StatementRefused as exc:
        raise QueryError(str(exc)) from exc
    return statement


def referenced_objects(explain_tree: str) -> tuple[set[str], set[str]]:
    """The tables/views and the table functions an ``EXPLAIN QUERY TREE`` output reads."""
    return set(_TABLE_NODE.findall(explain_tree)), set(_TABLE_FUNCTION_NODE.findall(explain_tree))


#: What a user scoped to some organisations may read in the medstream database: base
#: tables with an ``organisation_id`` (the engine, or a row policy on a server, filters
#: them) and views that read only such tables. Deny by default: an object not listed here
#: (a materialised view, a table without organisation_id, anything a later migration adds)
#: is refused to scoped users until it is added, and tests/security/test_scoping.py proves,
#: object by object, that each listed one returns only the user's organisations.
ORGANISATION_SCOPED_OBJECTS: Final = frozenset({
    "lab_result", "observation", "claim_line", "encounter", "diagnosis", "dead_letter",
    "alert_history", "alert_current", "alert", "quality_issue", "quality_daily_score",
    "person_link", "person_membership", "person_membership_at", "person_event",
    "person_history", "person_history_at", "terminology_unmapped", "terminology_worklist",
    "monitoring_minute", "monitoring_sources", "monitoring_per_minute",
})
#: Reference data that holds no organisation's rows (every contract's fields): readable
#: whatever the scope.
SHARED_REFERENCE_OBJECTS: Final = frozenset({"data_dictionary"})


def scoped_readable(name: str, database: str) -> bool:
    """Whether a user scoped to some organisations may read this object at all (its role
    decides the rest): only objects that carry the organisation filter."""
    schema, _, table = name.partition(".")
    if schema == database:
        return table in ORGANISATION_SCOPED_OBJECTS | SHARED_REFERENCE_OBJECTS
    if schema == analyst_database(database):
        return table in {analyst_view_name(t) for t in ANALYST_TABLES}
    return False


def allowed_object(user: User, name: str, database: str) -> bool:
    """Whether the user's role and organisation scope let it name this table or view in a
    query."""
    scope = user.permissions.sql
    if name == "system.one":  # what a query without FROM reads
        return scope != "none"
    if not user.all_organisations and not scoped_readable(name, database):
        return False
    schema, _, table = name.partition(".")
    if scope == "all":
        if table == "audit_log" and schema == database:
            return user.reads_audit
        return schema in (database, analyst_database(database))
    if scope == "analyst":
        return schema == analyst_database(database) or name in {
            f"{database}.data_dictionary", f"{database}.monitoring_per_minute",
        }
    return False


def organisation_filter(user: User) -> str:
    """The row filter of the user's organisation scope."""
    return "organisation_id IN (" + ", ".join(sql_string(o) for o in user.organisations) + ")"


@dataclass(frozen=True, slots=True)
class GovernedQuery:
    """A checked statement and the settings that bound it to the user's scope."""

    sql: str
    settings: dict[str, Any]


class QueryGovernor:
    """Checks a user's query against the role model and scopes it to the user's
    organisations; the engine then enforces the scope on every base table it reads."""

    def __init__(self, database: str, run: Callable[..., QueryResult]) -> None:
        """``run(sql, settings, max_rows)`` runs a read-only query as the service account."""
        self.database = database
        self.run = run
        self._scoped_tables: list[str] | None = None
        self._scoped_at = 0.0

    def scoped_tables(self) -> list[str]:
        """Every table, materialised view and dictionary of the medstream database that has
        an organisation_id (what the row filter is applied to; plain views are filtered
        through the tables they read); refuses (rather than filtering nothing) while the
        database is not migrated yet.

        Materialised views are filtered too, though scoped users may not name them: reading
        one reads the table it fills without that table's filter."""
        now = time.monotonic()
        if self._scoped_tables is None or now - self._scoped_at > SCOPE_REFRESH_S:
            result = self.run(
                "SELECT database || '.' || table FROM system.columns "
                f"WHERE database = {sql_string(self.database)} AND name = 'organisation_id' "
                f"AND table IN (SELECT name FROM system.tables WHERE database = "
                f"{sql_string(self.database)} AND engine != 'View') ORDER BY 1",
                {},
                10_000,
            )
            tables = [row[0] for row in result.rows]
            if not tables:
                raise QueryError(
                    f"{self.database} has no tables yet (not migrated): the organisation "
                    "scope cannot be applied, so the query is refused"
                )
            self._scoped_tables, self._scoped_at = tables, now
        return self._scoped_tables

    def settings_for(self, user: User) -> dict[str, Any]:
        """readonly=1 and, for a scoped user, a row filter on every scoped base table."""
        settings: dict[str, Any] = {"readonly": 1}
        if not user.all_organisations:
            settings["additional_table_filters"] = {
                table: organisation_filter(user) for table in self.scoped_tables()
            }
        return settings

    def check(self, user: User, sql: str) -> GovernedQuery:
        """The statement and settings to run it with; QueryError says what is refused.

        First the statement is only parsed (``EXPLAIN AST``: nothing runs) and every table,
        table function, function and clause it names is checked; only then is it analysed
        (``EXPLAIN QUERY TREE``, which may evaluate scalar subqueries) under the user's
        row filters, and the tables the analysis resolved are checked again.
        """
        permissions = user.permissions
        if user.disabled:
            raise QueryError(f"user {user.name} is disabled")
        if permissions.sql == "none":
            raise QueryError(
                f"role {user.role} has no SQL access (monitors use the alert console)"
            )
        statement = query_text(sql)
        tree = self._explain("AST", statement, {"readonly": 1})
        tables = parsed_objects(tree, statement)
        self._refuse_tables(user, tables)
        settings = self.settings_for(user)
        resolved, functions = referenced_objects(
            self._explain(
                "QUERY TREE", statement, {**settings, "enable_scalar_subquery_optimization": 0}
            )
        )
        views = {f for f in functions if "." in f}  # db.view(param = ...): parameterised
        unsafe = sorted(functions - views - SAFE_TABLE_FUNCTIONS)
        if unsafe:
            raise QueryError(f"table functions are not allowed here: {', '.join(unsafe)}")
        self._refuse_tables(user, resolved | views)
        return GovernedQuery(statement, settings)

    def _explain(self, kind: str, statement: str, settings: dict[str, Any]) -> str:
        result = self.run(f"EXPLAIN {kind} {statement}", settings, EXPLAIN_MAX_ROWS)
        if result.truncated:
            raise QueryError("the query is too large to be checked")
        return "\n".join(str(row[0]) for row in result.rows)

    def _refuse_tables(self, user: User, tables: set[str]) -> None:
        refused = sorted(t for t in tables if not allowed_object(user, t, self.database))
        if not refused:
            return
        everywhere = replace(user, organisations=(ALL_ORGANISATIONS,))
        outside_scope = [t for t in refused if allowed_object(everywhere, t, self.database)]
        if outside_scope:
            hint = (
                "a user scoped to organisations reads only objects that carry an "
                f"organisation filter, and {', '.join(outside_scope)} is not one of them; "
                "for a materialised view, read the table it fills; users of every "
                "organisation (`medstream users set NAME --org '*'`) may read it"
            )
        elif user.permissions.sql == "analyst":
            hint = (
                f"analysts read the views of {analyst_database(self.database)}, "
                f"{self.database}.data_dictionary and {self.database}.monitoring_per_minute"
            )
        else:
            hint = (
                f"admins read the {self.database} and {analyst_database(self.database)} "
                "databases"
            )
        raise QueryError(f"role {user.role} may not read {', '.join(refused)} ({hint})")


def parsed_objects(
    tree: str, statement: str, local_tables: frozenset[str] = frozenset()
) -> set[str]:
    """The tables a parsed statement (``EXPLAIN AST`` output, without settings) names,
    fully qualified; refuses clauses, table functions and functions no query may use (see
    medstream.sqlcheck.statement_tables). Linear in the size of the tree."""
    try:
        return sqlcheck.statement_tables(tree, statement, local_tables)
    except sqlcheck.StatementRefused as exc:
        raise QueryError(str(exc)) from exc


# --------------------------------------------------------------------------- analyst views

#: Columns written by ClickHouse itself rather than carried by a contract.
_ENGINE_COLUMNS: Final = {"stored_time": "operational"}
#: The tables analysts get a de-identified view of (their contracts tag every column).
ANALYST_TABLES: Final = (
    "lab_result", "observation", "diagnosis", "encounter", "claim_line", "alert_history",
    "dead_letter", "quality_issue", "terminology_unmapped",
)


def analyst_view_name(table: str) -> str:
    """The analyst view of a table (``alert`` shows the current state of each alert)."""
    return "alert" if table == "alert_history" else table


def analyst_view_source(table: str) -> str:
    """The table an analyst view reads: the latest state of each alert, else the table."""
    return "alert_current" if table == "alert_history" else table


def visible(sensitivity: str, clearance: str) -> bool:
    """Whether a column of this sensitivity is within the clearance (unknown tags are not)."""
    if sensitivity not in SENSITIVITY_ORDER:
        return False
    return SENSITIVITY_ORDER.index(sensitivity) <= SENSITIVITY_ORDER.index(clearance)


def column_sensitivity(
    run: Callable[[str], QueryResult], database: str
) -> dict[str, dict[str, str]]:
    """table -> column -> sensitivity tag, from the data dictionary's latest contract
    versions and the engine's own columns."""
    rows = run(
        "SELECT clickhouse_table, field, argMax(sensitivity, version) "
        f"FROM {database}.data_dictionary FINAL WHERE clickhouse_table != '' "
        "GROUP BY clickhouse_table, field"
    ).rows
    tags: dict[str, dict[str, str]] = {}
    for table, column, tag in rows:
        tags.setdefault(table, dict(_ENGINE_COLUMNS))[column] = tag
    return tags


def analyst_view_statements(
    run: Callable[[str], QueryResult], database: str, cluster: str = ""
) -> list[str]:
    """CREATE OR REPLACE VIEW statements of the analyst database: each table's columns
    within the analyst clearance, read with FINAL (collapsed duplicates)."""
    clearance = ROLES["analyst"].clearance
    tags = column_sensitivity(run, database)
    target = analyst_database(database)
    on_cluster = f" ON CLUSTER {cluster}" if cluster else ""
    statements = [f"CREATE DATABASE IF NOT EXISTS {target}{on_cluster}"]
    for table in ANALYST_TABLES:
        columns = [
            row[0]
            for row in run(
                f"SELECT name FROM system.columns WHERE database = {sql_string(database)} "
                f"AND table = {sql_string(table)} ORDER BY position"
            ).rows
        ]
        shown = [c for c in columns if visible(tags.get(table, {}).get(c, ""), clearance)]
        if not shown:
            continue
        statements.append(
            f"CREATE OR REPLACE VIEW {target}.{analyst_view_name(table)}{on_cluster} AS SELECT "
            + ", ".join(f"`{c}`" for c in shown)
            + f" FROM {database}.{analyst_view_source(table)} FINAL"
        )
    return statements


def analyst_columns(run: Callable[[str], QueryResult], database: str) -> dict[str, list[str]]:
    """table -> the columns an analyst may read (what the analyst views show)."""
    clearance = ROLES["analyst"].clearance
    tags = column_sensitivity(run, database)
    return {
        table: [c for c, tag in sorted(tags.get(table, {}).items()) if visible(tag, clearance)]
        for table in ANALYST_TABLES
    }


# --------------------------------------------------------------------------- server grants

def _quoted(name: str) -> str:
    return "`" + name.replace("`", "") + "`"


def server_role(user: User) -> str:
    """The ClickHouse role of a medstream user on a server: an admin scoped to some
    organisations gets ``medstream_admin_scoped`` (the organisation-filtered objects only,
    no audit log); every other user the role named after its own."""
    if user.role == "admin" and not user.all_organisations:
        return "medstream_admin_scoped"
    return f"medstream_{user.role}"


def grant_statements(
    users: Iterable[User],
    database: str,
    analyst_columns_by_table: dict[str, list[str]],
    scoped_tables: Iterable[str],
    service_user: str = "medstream",
) -> list[str]:
    """ClickHouse statements that give a server the same roles as medstream: a role per
    medstream role, column-level grants within each clearance, a user per medstream user
    with SQL access (same bcrypt hash, read-only, bounded queries; disabled users dropped)
    and a row policy per scoped table. A user removed from medstream must be dropped on the
    server by hand (`DROP USER`): the users file no longer names it.

    Roles that scoped users hold (``medstream_analyst``, ``medstream_admin_scoped``) are
    granted objects by name, never a whole database, and only objects that carry the
    organisation filter (deny by default, as in the governed SQL); their grants are reset
    first, so re-applying the statements also withdraws what is no longer listed.
    """
    analyst_db = analyst_database(database)
    statements = [f"CREATE ROLE IF NOT EXISTS medstream_{name}" for name in ROLES]
    statements.append("CREATE ROLE IF NOT EXISTS medstream_admin_scoped")
    statements.append("CREATE ROLE IF NOT EXISTS medstream_service")
    statements.append(f"GRANT SELECT, INSERT ON {database}.* TO medstream_service")
    statements.append(f"GRANT SELECT ON {analyst_db}.* TO medstream_service")
    statements.append("REVOKE ALL ON *.* FROM medstream_analyst, medstream_admin_scoped")
    views = sorted(
        f"{analyst_db}.{analyst_view_name(table)}"
        for table, columns in analyst_columns_by_table.items() if columns
    )
    for table, columns in sorted(analyst_columns_by_table.items()):
        if columns:
            statements.append(
                f"GRANT SELECT({', '.join(_quoted(c) for c in columns)}) "
                f"ON {database}.{analyst_view_source(table)} TO medstream_analyst"
            )
    for name in [*views, *(f"{database}.{t}" for t in (
        "data_dictionary", "monitoring_per_minute", "monitoring_minute",
    ))]:
        statements.append(f"GRANT SELECT ON {name} TO medstream_analyst")
    scoped_objects = sorted(ORGANISATION_SCOPED_OBJECTS | SHARED_REFERENCE_OBJECTS)
    for name in [*(f"{database}.{t}" for t in scoped_objects), *views]:
        statements.append(f"GRANT SELECT ON {name} TO medstream_admin_scoped")
    statements.append(f"GRANT SELECT ON {database}.* TO medstream_admin")
    statements.append(f"GRANT SELECT ON {analyst_db}.* TO medstream_admin")
    statements.append(f"GRANT medstream_service TO {_quoted(service_user)}")
    users = list(users)
    active = [u for u in users if not u.disabled and u.permissions.sql != "none"]
    for user in users:
        if user not in active:  # disabled, or no SQL access: no ClickHouse user
            statements.append(f"DROP USER IF EXISTS {_quoted(user.name)}")
            continue
        # OR REPLACE: a changed password or role replaces the user (and its old role grant).
        statements.append(
            f"CREATE USER OR REPLACE {_quoted(user.name)} IDENTIFIED WITH bcrypt_hash BY "
            f"{sql_string(user.password_hash)} DEFAULT ROLE {server_role(user)} "
            "SETTINGS readonly = 1, max_execution_time = 60, max_result_rows = 100000"
        )
        statements.append(f"GRANT {server_role(user)} TO {_quoted(user.name)}")
    scoped = [u for u in active if not u.all_organisations]
    # Once a table has a row policy, accounts without one see none of its rows: every
    # account but the scoped users (services, operators, all-organisation users) sees all.
    everyone = "ALL" + (
        " EXCEPT " + ", ".join(_quoted(u.name) for u in scoped) if scoped else ""
    )
    for table in scoped_tables:
        statements.append(
            f"CREATE ROW POLICY OR REPLACE medstream_all ON {table} FOR SELECT USING 1 "
            f"TO {everyone}"
        )
        for user in scoped:
            statements.append(
                f"CREATE ROW POLICY OR REPLACE {_quoted('medstream_scope_' + user.name)} "
                f"ON {table} FOR SELECT USING {organisation_filter(user)} "
                f"TO {_quoted(user.name)}"
            )
    return statements


def client_runner(client: Any) -> Callable[[str], QueryResult]:
    """A ``run(sql)`` over a clickhouse-connect client, for the service account's own reads."""

    def run(sql: str) -> QueryResult:
        result = client.query(sql)
        return QueryResult(list(result.column_names), [list(r) for r in result.result_rows])

    return run


def refresh_analyst_views(client: Any, database: str, cluster: str = "") -> int:
    """(Re)create the de-identified analyst views from the current data dictionary; returns
    how many views exist. Run after the migrations and the dictionary refresh."""
    statements = analyst_view_statements(client_runner(client), database, cluster)
    for statement in statements:
        client.command(statement)
    return len(statements) - 1
