"""What a read-only statement reaches, read from its parse tree (``EXPLAIN AST`` output).

Every query that medstream runs on behalf of someone (the query endpoint, `medstream sql`,
the console) is parsed first and checked here, deny by default: one SELECT, no INTO
OUTFILE, FORMAT or SETTINGS clause anywhere, no table function but a few that read no
stored data, no function that reaches files, the network, other servers or the engine's
configuration, and only tables of the allowed databases. Nothing here runs a query: the
callers run ``EXPLAIN AST`` (which only parses) and hand over its text.

The tree is read in one pass (a stack of open nodes), so checking costs time linear in
the size of the statement.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final

#: The longest statement accepted (characters); longer ones are refused before parsing.
MAX_QUERY_CHARS: Final = 65_536
#: Table functions a query may use: they read no stored data.
SAFE_TABLE_FUNCTIONS: Final = frozenset({"numbers", "one", "zeros", "generateSeries"})
#: Functions that reach outside the stored data (files, the network, other servers, the
#: engine's own configuration or host) or read dictionaries and Join tables by name, past
#: the table checks: refused everywhere (compared in lower case).
DENIED_FUNCTIONS: Final = frozenset({
    "file", "filecluster", "url", "urlcluster", "s3", "s3cluster", "gcs", "oss", "cosn",
    "hdfs", "hdfscluster", "azureblobstorage", "azureblobstoragecluster", "remote",
    "remotesecure", "cluster", "clusterallreplicas", "mysql", "postgresql", "mongodb", "redis",
    "sqlite", "jdbc", "odbc", "executable", "input", "merge", "mergetreeindex", "iceberg",
    "icebergs3", "deltalake", "hudi", "loop", "view", "viewifpermitted", "viewexplain",
    "dictionary", "getsetting", "getsettingordefault", "getclientsetting", "getserversetting",
    "getmacro", "fqdn", "hostname", "currentuser", "currentprofiles", "currentroles",
    "enabledroles", "defaultroles", "filesystemavailable", "filesystemcapacity",
    "filesystemunreserved", "user", "fullhostname", "hascolumnintable", "currentdatabase",
    "showcertificate", "getserverport", "tcpport", "serveruuid", "globalvariable",
    "getosinformation", "displayname", "buildid", "uptime", "initialqueryid", "queryid",
    "currentqueryid", "initialquerystarttime", "getmergetreesetting",
})
DENIED_FUNCTION_PREFIXES: Final = ("dictget", "dicthas", "dictisin", "joinget")
#: Functions whose second argument may name a table (``x IN db.table``).
IN_FUNCTIONS: Final = frozenset({
    "in", "notin", "globalin", "globalnotin", "nullin", "notnullin", "globalnullin",
    "globalnotnullin",
})
#: System tables any caller may read: the engine's catalogue of databases, tables and
#: columns (what `medstream grants` and the organisation scope read) and the row sources
#: of a query without FROM. Every other system table (settings, users, processes, query
#: and text logs, disks, macros ...) is refused.
SYSTEM_TABLES: Final = frozenset({
    "system.one", "system.numbers", "system.numbers_mt", "system.zeros", "system.zeros_mt",
    "system.databases", "system.tables", "system.columns",
})
#: The format EXPLAIN output is read in (medstream.clickhouse.explain_lines).
EXPLAIN_FORMAT: Final = "TabSeparated"
# What the driver appends to a statement: Native for query(), EXPLAIN_FORMAT for EXPLAIN.
_DRIVER_FORMATS: Final = frozenset({"Native", EXPLAIN_FORMAT})
_CLAUSES = "INTO OUTFILE, FORMAT and SETTINGS clauses are not allowed here"


class StatementRefused(ValueError):
    """The statement reaches something it may not; the message says what and why."""


@dataclass(frozen=True, slots=True)
class AstNode:
    """One line of an ``EXPLAIN AST`` tree."""

    depth: int
    kind: str
    detail: str  # the name or value after the kind, without "(children N)"
    parent: int  # index of the parent node, -1 for the root

    @property
    def name(self) -> str:
        """The first word of the detail (a table or function name, without an alias)."""
        return self.detail.split(" ", 1)[0]


def ast_nodes(tree: str) -> list[AstNode]:
    """The nodes of an ``EXPLAIN AST`` text, each with its parent, in one pass."""
    nodes: list[AstNode] = []
    open_nodes: list[int] = []  # the current path from the root, by index
    for line in tree.splitlines():
        text = line.lstrip(" ")
        if not text:
            continue
        depth = len(line) - len(text)
        kind, _, detail = text.partition(" ")
        if detail.endswith(")"):
            head, marker, count = detail.rpartition("(children ")
            if marker and count[:-1].isdigit():
                detail = head
        while open_nodes and nodes[open_nodes[-1]].depth >= depth:
            open_nodes.pop()
        nodes.append(AstNode(depth, kind, detail.strip(), open_nodes[-1] if open_nodes else -1))
        open_nodes.append(len(nodes) - 1)
    return nodes


def cte_names(statement: str) -> set[str]:
    """Names the statement defines with ``WITH name AS (...)`` (table-valued CTEs); text in
    string literals and comments defines nothing."""
    text = mask_literals(statement, comments=True)
    return set(re.findall(r"(?:\bWITH\b|,)\s*`?([A-Za-z_][A-Za-z0-9_]*)`?\s+AS\s*\(",
                          text, re.IGNORECASE))


# Where a string literal, quoted identifier or comment may start.
_SPECIAL = re.compile(r"['\"`]|--|/\*")


def mask_literals(sql: str, comments: bool = False) -> str:
    """The statement with every string literal emptied (so their text cannot fake SQL) and,
    with ``comments``, every comment replaced by a space; quoted identifiers are kept.

    Linear in the length (the regular expressions this replaces backtracked quadratically
    on an unclosed quote)."""
    out: list[str] = []
    position = 0
    for kind, start, end in _quoted_spans(sql):
        out.append(sql[position:start])
        if kind == "literal":
            out.append("''")
        elif kind == "comment" and comments:
            out.append(" ")
        else:
            out.append(sql[start:end])
        position = end
    out.append(sql[position:])
    return "".join(out)


def line_break_in_quoted_name(sql: str) -> bool:
    """True when a quoted identifier or alias holds a line break: the engine prints it raw
    in EXPLAIN AST, where it would pass for a node of the tree."""
    return any(
        kind == "name" and ("\n" in sql[start:end] or "\r" in sql[start:end])
        for kind, start, end in _quoted_spans(sql)
    )


def _quoted_spans(sql: str) -> Iterator[tuple[str, int, int]]:
    """(``literal``, ``name`` or ``comment``, start, end) of each quoted or commented span,
    in one pass from left to right: a quote inside a comment and a comment marker inside a
    literal are each read as what they are inside."""
    position, length = 0, len(sql)
    while (found := _SPECIAL.search(sql, position)) is not None:
        start, token = found.start(), found.group(0)
        if token in ("'", '"', "`"):
            end = _closing_quote(sql, start + 1, token)
            yield ("literal" if token == "'" else "name"), start, end
        else:
            close = sql.find("\n", start) if token == "--" else sql.find("*/", start + 2)
            end = length if close < 0 else close + (0 if token == "--" else 2)
            yield "comment", start, end
        position = end


def _closing_quote(sql: str, position: int, quote: str) -> int:
    """The index just past the quote that closes one opened before ``position`` (a
    backslash escapes the next character, a doubled quote is one); the end when unclosed."""
    length = len(sql)
    while position < length:
        char = sql[position]
        if char == "\\":
            position += 2
        elif char == quote:
            if sql.startswith(quote, position + 1):
                position += 2
            else:
                return position + 1
        else:
            position += 1
    return length


def strip_literals(sql: str) -> str:
    """The statement with every string literal emptied (so their text cannot fake SQL)."""
    return mask_literals(sql)


def check_one_statement(statement: str) -> None:
    """Refuse an oversized statement, or more than one (a ``;`` outside string literals
    before the end)."""
    check_size(statement)
    if ";" in strip_literals(statement).rstrip().rstrip(";"):
        raise StatementRefused("only one statement is allowed per query")


def check_size(statement: str) -> None:
    """Refuse a statement longer than MAX_QUERY_CHARS, before any work is spent on it."""
    if len(statement) > MAX_QUERY_CHARS:
        raise StatementRefused(
            f"the query has {len(statement)} characters; at most {MAX_QUERY_CHARS} are "
            "accepted (split it, or move long value lists into a table)"
        )


def statement_tables(
    tree: str, statement: str, local_tables: frozenset[str] = frozenset()
) -> set[str]:
    """The tables (and parameterised views) a parsed SELECT names, fully qualified; refuses
    clauses, table functions and functions no query may use.

    ``tree`` is the ``EXPLAIN AST`` of ``statement`` run without settings (so every
    SETTINGS clause in it is the statement's own). ``local_tables`` are the tables of the
    current database: an unqualified name (or a quoted name that looks qualified) that
    matches one is refused, so a faked common table expression cannot reach a real table.
    """
    if line_break_in_quoted_name(statement):
        raise StatementRefused("a quoted name or alias may not contain a line break")
    nodes = ast_nodes(tree)
    if not nodes or nodes[0].kind != "SelectWithUnionQuery":
        raise StatementRefused("only one read-only SELECT statement is allowed")
    tables: set[str] = set()
    ctes = cte_names(statement)

    def table_reference(name: str) -> None:
        plain = name.replace("`", "")
        if plain in local_tables:
            raise StatementRefused(
                f"name the database of {plain} (e.g. medstream_analyst.{plain})"
            )
        if "." in plain:
            tables.add(plain)
        elif plain not in ctes:
            raise StatementRefused(
                f"name the database of {plain} (e.g. medstream_analyst.{plain}); only "
                "common table expressions may be unqualified"
            )

    children: dict[int, list[int]] = {}
    for index, node in enumerate(nodes):
        children.setdefault(node.parent, []).append(index)
    last = len(nodes) - 1
    for index, node in enumerate(nodes):
        if node.depth == 1 and node.kind != "ExpressionList":
            # The driver's own trailing FORMAT is the only other clause allowed (a statement
            # with a FORMAT of its own does not parse once the driver adds one).
            if not (index == last and node.kind == "Identifier" and node.name in _DRIVER_FORMATS):
                raise StatementRefused(_CLAUSES)
        if node.kind == "Set":
            raise StatementRefused(
                "SETTINGS clauses are not allowed here, in a subquery either: limits are "
                "medstream's (MEDSTREAM_CLICKHOUSE_QUERY_TIMEOUT_S, "
                "MEDSTREAM_CONSOLE_SQL_TIMEOUT_S, MEDSTREAM_CLICKHOUSE_QUERY_MAX_MEMORY_MB, "
                "MEDSTREAM_CLICKHOUSE_QUERY_MAX_RESULT_MB)"
            )
        if node.kind == "Function":
            _check_function(nodes, children, index, table_reference)
        elif node.kind == "TableIdentifier":
            table_reference(node.name)
    return tables


def _check_function(
    nodes: list[AstNode],
    children: dict[int, list[int]],
    index: int,
    table_reference: Callable[[str], None],
) -> None:
    node = nodes[index]
    lowered = node.name.lower()
    parent = nodes[node.parent].kind if node.parent >= 0 else ""
    if parent == "TableExpression":
        if "." in node.name:  # db.view(param = ...): a parameterised view
            table_reference(node.name)
        elif node.name not in SAFE_TABLE_FUNCTIONS:
            raise StatementRefused(
                f"table functions are not allowed here: {node.name} (a parameterised view "
                "needs its database, e.g. medstream.person_history_at(at = '...'))"
            )
    elif lowered in DENIED_FUNCTIONS or lowered.startswith(DENIED_FUNCTION_PREFIXES):
        raise StatementRefused(f"the function {node.name} is not allowed here")
    elif lowered in IN_FUNCTIONS:
        # Function in -> ExpressionList -> (left, right): a bare identifier on the right
        # names a table.
        argument_lists = children.get(index, [])
        arguments = children.get(argument_lists[0], []) if argument_lists else []
        if len(arguments) == 2 and nodes[arguments[1]].kind == "Identifier":
            table_reference(nodes[arguments[1]].name)


def allowed_table(name: str, databases: frozenset[str]) -> bool:
    """Whether any caller may read this table: one of ``databases`` or a SYSTEM_TABLES."""
    schema, _, _table = name.partition(".")
    return schema in databases or name in SYSTEM_TABLES
