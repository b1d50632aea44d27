"""No direct identifier of the simulated patients reaches ClickHouse or a log line.

The simulator's region (medstream/region.yaml) defines what its direct identifiers look
like: national ID numbers with a fictional area code, names built from its surname and
given-name lists (Han and pinyin), and medical record numbers in each hospital's format.
After a run, every column of every table and every log line is searched for them.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import yaml

from tests.e2e.test_pipeline import env_for

REGION = Path(__file__).resolve().parents[2] / "medstream" / "region.yaml"


def identifier_patterns() -> dict[str, re.Pattern[str]]:
    """What the simulator's direct identifiers look like, from its region file."""
    region = yaml.safe_load(REGION.read_text(encoding="utf-8"))
    area = str(_find(region, "national_id_area_code"))
    surnames = _find(region, "surnames")
    given = _find(region, "given")
    han_surnames = "".join(zh for zh, _ in surnames)
    han_given = "".join(zh for zh, _ in given)
    upper = "|".join(sorted({py.upper() for _, py in surnames}, key=len, reverse=True))
    title = "|".join(sorted({py.title() for _, py in surnames}, key=len, reverse=True))
    mrn_formats = []
    for hospital in region["hospitals"]:
        fmt = hospital["mrn_format"]
        prefix, _, rest = fmt.partition("{")
        digits = int(re.search(r":0?(\d+)d", rest).group(1))  # type: ignore[union-attr]
        if prefix:  # a bare number (H002's 10 digits) cannot be told from other numbers
            mrn_formats.append(rf"(?<![A-Za-z0-9]){re.escape(prefix)}\d{{{digits}}}(?!\d)")
    return {
        "national ID": re.compile(rf"{area}\d{{11}}[\dXx]"),
        "Han name": re.compile(rf"[{han_surnames}][{han_given}]{{1,2}}"),
        # HL7 XPN (FAMILY^GIVEN) and "Family Given" as free text would write them.
        "pinyin name": re.compile(rf"\b(?:{upper})\^[A-Z]{{2,}}|\b(?:{title}) [A-Z][a-z]+\b"),
        "MRN": re.compile("|".join(mrn_formats)),
    }


def _find(document: object, key: str) -> object:
    if isinstance(document, dict):
        if key in document:
            return document[key]
        for value in document.values():
            found = _find(value, key)
            if found is not None:
                return found
    return None


#: Dumps every table of a stopped run's embedded engine as text, in one process (one engine
#: start instead of two `medstream sql` processes per table).
_DUMP = """
import json, sys
from medstream.clickhouse import connect
client = connect("chdb://" + sys.argv[1])
columns = {}
for table, column in client.query(
    "SELECT c.table, c.name FROM system.columns AS c INNER JOIN system.tables AS t "
    "ON c.database = t.database AND c.table = t.name WHERE c.database = 'medstream' "
    "AND t.engine NOT IN ('View', 'MaterializedView') "
    "AND c.type NOT LIKE 'AggregateFunction%' ORDER BY c.table, c.position"
).result_rows:
    columns.setdefault(table, []).append(column)
dump = {}
for table, names in columns.items():
    rows = client.query("SELECT " + ", ".join(names) + " FROM medstream." + table).result_rows
    dump[table] = "\\n".join(",".join(map(str, row)) for row in rows)
print(json.dumps(dump))
"""


def assert_no_simulated_identifier(data_dir: Path) -> None:
    """Search every column of every table and every log line of a finished run."""
    patterns = identifier_patterns()
    result = subprocess.run(
        [sys.executable, "-c", _DUMP, str(data_dir / "clickhouse")],
        env=env_for(data_dir), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    tables: dict[str, str] = json.loads(result.stdout)
    # Aggregate states (the worklist's distinct-event counts) are not readable values.
    assert {"lab_result", "alert_history", "dead_letter", "person_link", "quality_issue",
            "terminology_unmapped"} <= set(tables)
    scanned = 0
    for table, text in tables.items():
        scanned += text.count("\n") + bool(text)
        for kind, pattern in patterns.items():
            match = pattern.search(text)
            assert match is None, f"{kind} in table {table}: {match.group(0)[:3]}..."
    assert scanned > 4000  # the tables were not empty
    # The embedded Kafka's partition segments (kafka/logs/<topic>-<n>/*.log) are the broker's
    # storage and hold the raw source messages by design; its own log (kafka/broker.log) is
    # an application log like the others.
    storage = data_dir / "kafka" / "logs"
    logs = sorted(log for log in set(data_dir.glob("**/*.log")) if storage not in log.parents)
    assert logs, "the run wrote no log files"
    for log in logs:
        text = log.read_text(encoding="utf-8", errors="replace")
        for kind, pattern in patterns.items():
            match = pattern.search(text)
            assert match is None, f"{kind} in {log.name}: {match.group(0)[:3]}..."


def test_the_patterns_find_the_identifiers_the_simulator_sends() -> None:
    """A pattern that never matches would prove nothing: the raw messages hold them all."""
    from medstream.simulator import RegionSimulator

    messages = RegionSimulator(5).messages(300, now_ms=lambda: 1_793_700_000_000)
    sample = repr([m.value for m in messages])
    assert all(pattern.search(sample) for pattern in identifier_patterns().values())
