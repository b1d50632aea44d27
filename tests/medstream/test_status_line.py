"""`medstream up`'s status line: lag shown as unknown (with the reason) whenever it is not
known, rates that stay right across a component's restart, the simulator's final count, and
the drain check's message while the sink restarts.

The components' /metrics are served by a real HTTP server in the test; each component's
process is a stand-in (``sleep``), since only its liveness matters here.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from medstream.clickhouse import QueryError
from medstream.query_endpoint import QueryTokenMissing, read_query_token
from medstream.settings import ClickHouseSettings, KafkaSettings, RuntimeSettings, StreamSettings
from medstream.supervisor import (
    Child,
    ChildReading,
    Snapshot,
    Supervisor,
    lag_summary,
    rate,
    scrape,
    status_line,
)

RAW = frozenset({"raw.hl7_lab", "raw.device"})


class MetricsPage:
    """A real /metrics endpoint whose text the test sets."""

    def __init__(self) -> None:
        self.text = ""
        page = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = page.text.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def page() -> Iterator[MetricsPage]:
    metrics = MetricsPage()
    yield metrics
    metrics.server.shutdown()
    metrics.server.server_close()


@pytest.fixture
def stand_ins() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        process.kill()
        process.wait()


def start(child: Child, stand_ins: list[subprocess.Popen[bytes]], *, restart: bool = False,
          command: tuple[str, ...] = ("sleep", "60")) -> None:
    """Start a stand-in process for ``child`` as `up` would record its (re)start."""
    child.process = subprocess.Popen(list(command))
    stand_ins.append(child.process)
    child.restart.started(time.monotonic(), restart)


def die(child: Child) -> None:
    assert child.process is not None
    child.process.kill()
    child.process.wait()


def exposition(*samples: str) -> str:
    """Prometheus text exposition of these sample lines."""
    return "".join(f"{sample}\n" for sample in samples)


def figure(line: str, label: str) -> float:
    match = re.search(rf"{label} +(-?\d+)", line)
    assert match, line
    return float(match.group(1))


def reading(state: str = "running", **values: float) -> ChildReading:
    return ChildReading(state, {"ready": 1.0, **values}, since=1.0)


# -- lag ----------------------------------------------------------------------------------

def test_lag_is_the_sum_only_when_every_worker_and_the_sink_report_it() -> None:
    snapshot = Snapshot(0.0, children={
        "streams-0": reading(**{"lag:raw.hl7_lab": 7.0}),
        "streams-1": reading(**{"lag:raw.device": 5.0, "lag:raw.hl7_lab": 1.0}),
        "sink": reading(**{"lag:norm.lab_result": 2.0}),
        "simulator": ChildReading("finished", {"out:simulator": 10.0}, since=1.0),
    })
    assert lag_summary(snapshot, RAW) == "lag 15"


@pytest.mark.parametrize(("state", "shown"), [
    ("restarting", "streams-1 restarting"),
    ("down", "streams-1 down"),
    ("starting", "streams-1 starting"),  # running, not scraped since its start
])
def test_lag_is_unknown_while_a_worker_is_not_running(state: str, shown: str) -> None:
    # Its last report (lag 0) must not count: it says nothing of the partitions now.
    snapshot = Snapshot(0.0, children={
        "streams-0": reading(**{"lag:raw.hl7_lab": 3.0, "lag:raw.device": 0.0}),
        "streams-1": reading(state, **{"lag:raw.hl7_lab": 0.0}),
        "sink": reading(),
    })
    assert lag_summary(snapshot, RAW) == f"lag ? ({shown})"


def test_lag_is_unknown_while_a_worker_has_no_partitions_or_a_raw_topic_is_unreported() -> None:
    not_ready = Snapshot(0.0, children={
        "streams-0": ChildReading("running", {"ready": 0.0}, since=1.0),
        "sink": reading(),
    })
    assert lag_summary(not_ready, RAW) == "lag ? (streams-0 not ready)"
    # A worker that does not know a partition's high watermark reports nothing for its
    # topic: unknown, not 0 (the review saw `lag 0` with 1,109 records unprocessed).
    partial = Snapshot(0.0, children={
        "streams-0": reading(**{"lag:raw.device": 0.0}),
        "sink": reading(),
    })
    assert lag_summary(partial, RAW) == "lag ? (no lag reported for raw.hl7_lab)"
    # The sink reads the raw topics too (its ledger): its lag there is not the workers'. Seen
    # in `up` as `lag 0` while a restarted worker had reported nothing yet.
    only_the_sink = Snapshot(0.0, children={
        "streams-0": reading(),
        "sink": reading(**{"lag:raw.device": 0.0, "lag:raw.hl7_lab": 0.0}),
    })
    assert lag_summary(only_the_sink, RAW) == (
        "lag ? (no lag reported for raw.device, raw.hl7_lab)"
    )


def test_a_dead_worker_shows_lag_unknown_in_the_status_line_not_its_last_report(
    page: MetricsPage, stand_ins: list[subprocess.Popen[bytes]]
) -> None:
    page.text = exposition(
        'medstream_ready{component="streams"} 1',
        *(f'medstream_consumer_lag{{stage="normalise",topic="{topic}"}} 0' for topic in RAW),
    )
    worker = Child("streams-0", [], page.port, restartable=True)
    start(worker, stand_ins)
    first = scrape([worker])
    assert "| lag 0 |" in status_line(first, first, RAW)
    die(worker)
    dead = scrape([worker])
    assert "| lag ? (streams-0 restarting) |" in status_line(first, dead, RAW)
    worker.restartable = False  # given up
    assert "| lag ? (streams-0 down) |" in status_line(first, scrape([worker]), RAW)


# -- rates and totals across a restart ----------------------------------------------------

def test_a_sink_restart_shows_its_rate_since_the_restart_and_keeps_the_totals(
    page: MetricsPage, stand_ins: list[subprocess.Popen[bytes]]
) -> None:
    def sink_page(stored: int, dead_letters: int) -> str:
        return exposition(
            f'medstream_records_out_total{{stage="sink",topic="norm.lab_result"}} {stored}',
            f'medstream_dead_letters_total{{stage="sink",reason_code="sink_rejected"}} '
            f"{dead_letters}",
        )

    sink = Child("sink", [], page.port, restartable=True)
    page.text = sink_page(5000, 40)
    start(sink, stand_ins)
    before = scrape([sink])
    die(sink)
    start(sink, stand_ins, restart=True)
    restarted_at = sink.restart.started_at
    page.text = sink_page(300, 5)
    after = scrape([sink])
    # The old line took the counter reset for a rate: `sink -659 rows/s`.
    assert rate(before, after, "out:sink") == pytest.approx(300 / (after.at - restarted_at))
    line = status_line(before, after)
    assert figure(line, "sink") == round(300 / (after.at - restarted_at))
    assert "dead letters 45 |" in line  # 40 before the restart, 5 since
    # The next interval: a plain difference again.
    page.text = 'medstream_records_out_total{stage="sink",topic="norm.lab_result"} 420\n'
    later = scrape([sink])
    assert rate(after, later, "out:sink") == pytest.approx(120 / (later.at - after.at))


def test_a_restarted_process_not_scraped_yet_shows_no_negative_or_stale_rate(
    page: MetricsPage, stand_ins: list[subprocess.Popen[bytes]]
) -> None:
    sink = Child("sink", [], page.port, restartable=True)
    page.text = 'medstream_records_out_total{stage="sink",topic="norm.lab_result"} 5000\n'
    start(sink, stand_ins)
    before = scrape([sink])
    die(sink)
    start(sink, stand_ins, restart=True)
    page.server.shutdown()  # its endpoint does not answer yet
    page.server.server_close()
    after = scrape([sink])
    assert rate(before, after, "out:sink") == 0.0
    assert after.children["sink"].state == "starting"


# -- the published figure -----------------------------------------------------------------

def test_published_comes_from_the_simulator_report_once_it_exited(
    page: MetricsPage, stand_ins: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    report = tmp_path / "simulator-report.json"
    simulator = Child("simulator", [], page.port, expected_exit=True, final_report=report)
    page.text = 'medstream_records_out_total{stage="simulator",topic="raw.hl7_lab"} 2104\n'
    start(simulator, stand_ins)
    running = scrape([simulator])
    assert "published 2104" in status_line(running, running)
    die(simulator)  # the scrape missed its last 167 messages
    simulator.process = subprocess.Popen(["true"])
    stand_ins.append(simulator.process)
    simulator.process.wait()
    report.write_text(json.dumps({"messages": 2271, "records": 2400}))
    finished = scrape([simulator])
    assert finished.children["simulator"].state == "finished"
    assert status_line(running, finished).endswith("published 2271")


# -- the drain check while the sink restarts ------------------------------------------------

def test_a_missing_query_token_says_no_sink_serves_and_an_unreadable_one_names_the_user(
    tmp_path: Path,
) -> None:
    with pytest.raises(QueryTokenMissing) as missing:
        read_query_token(tmp_path / "query.token")
    assert "no sink serves queries right now" in str(missing.value)
    assert "user" not in str(missing.value)
    (tmp_path / "query.token").mkdir()  # exists, cannot be read as a token
    with pytest.raises(QueryError) as unreadable:
        read_query_token(tmp_path / "query.token")
    assert not isinstance(unreadable.value, QueryTokenMissing)
    assert "run this command as the user who started `medstream up`" in str(unreadable.value)


def test_the_drain_check_says_the_sink_is_restarting_when_its_token_is_gone(
    tmp_path: Path,
) -> None:
    lines: list[str] = []
    supervisor = Supervisor(
        KafkaSettings(), ClickHouseSettings(), RuntimeSettings(data_dir=tmp_path),
        StreamSettings(), out=lines.append,
    )
    # The exiting sink removed its token; the restarted one has not written a new one yet.
    supervisor.query_url = "http://127.0.0.1:9/query"
    assert supervisor._drained(datetime.now(tz=UTC)) is None
    assert lines == ["reconcile not possible right now: the sink is restarting; retrying"]
