"""Tests of the embedded runtime: broker process, topics, runtime state, failures (integration),
and of how `up` restarts what dies and accounts for what is left unstored (unit)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from medstream.backlog import (
    Backlog,
    ConsumerGroup,
    backlog_from_offsets,
    measure_backlog,
    pipeline_groups,
)
from medstream.runtime import RuntimeState, TansuBroker, contract_topics, ensure_topics, free_port
from medstream.settings import ClickHouseSettings, KafkaSettings, RuntimeSettings, StreamSettings
from medstream.supervisor import (
    HEALTHY_RUN_S,
    MAX_QUICK_RESTARTS,
    Child,
    RestartPolicy,
    Supervisor,
    restarts_summary,
)
from tests.waiting import wait_for


def test_a_dead_component_is_restarted_after_doubling_pauses_and_given_up_after_quick_failures(
) -> None:
    policy = RestartPolicy()
    policy.started(0.0, restart=False)
    now, pauses = 10.0, []
    while (pause := policy.schedule(now)) is not None:
        pauses.append(pause)
        assert not policy.due(now + pause - 0.01) and policy.due(now + pause)
        now += pause
        policy.started(now, restart=True)
        now += 5.0  # it dies again soon after each start
    assert pauses == [1, 2, 4, 8, 16, 32, 60, 60][:MAX_QUICK_RESTARTS]
    assert policy.total == policy.quick == MAX_QUICK_RESTARTS


def test_a_component_that_ran_well_starts_its_pauses_afresh() -> None:
    policy = RestartPolicy()
    policy.started(0.0, restart=False)
    for _ in range(3):
        policy.schedule(1.0)
        policy.started(1.0, restart=True)
    assert policy.schedule(1.0 + HEALTHY_RUN_S + 1) == 1.0  # a fresh failure
    assert policy.quick == 0 and policy.total == 3


def test_the_status_line_names_only_components_that_were_restarted() -> None:
    summary = restarts_summary({"streams-0": 2, "sink": 1, "console": 0})
    assert summary == " | restarts sink=1 streams-0=2"
    assert restarts_summary({"sink": 0}) == ""


def test_the_backlog_is_what_the_furthest_behind_group_of_each_partition_has_left() -> None:
    groups = [
        ConsumerGroup("workers", ("raw.lab", "norm.lab")),
        ConsumerGroup("sink", ("raw.lab", "norm.lab", "alerts", "dlq")),
    ]
    latest = {("raw.lab", 0): 100, ("raw.lab", 1): 50, ("norm.lab", 0): 40, ("alerts", 0): 7,
              ("dlq", 0): 3, ("other.topic", 0): 999}
    earliest = {("raw.lab", 1): 10}
    committed = {
        "workers": {("raw.lab", 0): 100, ("norm.lab", 0): 40},  # raw.lab/1: never committed
        "sink": {("raw.lab", 0): 60, ("raw.lab", 1): 50, ("norm.lab", 0): 25, ("alerts", 0): 7},
    }
    backlog = backlog_from_offsets(groups, earliest, latest, committed)
    assert dict(backlog.by_partition) == {
        ("raw.lab", 0): 40,  # the sink's raw ledger is 40 behind, the workers none
        ("raw.lab", 1): 40,  # the workers start at the earliest offset, 10
        ("norm.lab", 0): 15,
        ("alerts", 0): 0,
        ("dlq", 0): 3,  # nothing committed, from offset 0
    }
    assert backlog.total == 98
    assert backlog.by_topic() == {"raw.lab": 80, "norm.lab": 15, "dlq": 3}
    assert backlog.parts() == "raw 80, norm 15, alerts 0, other 3"
    assert Backlog({("p.raw.x", 0): 1_234}, "p.").parts() == "raw 1,234, norm 0, alerts 0"


def test_a_group_counts_the_topics_it_may_read_only_once_it_reads_them() -> None:
    workers = ConsumerGroup("workers", ("raw.a", "norm.x", "norm.y", "mpi"), ("raw.a",))
    assert workers.reading(set()).topics == ("raw.a",)
    assert workers.reading({"norm.y", "mpi", "changelog"}).topics == ("raw.a", "norm.y", "mpi")
    assert ConsumerGroup("sink", ("raw.a", "alerts")).reading(set()).topics == ("raw.a", "alerts")


@pytest.mark.integration
def test_the_backlog_of_a_broker_counts_records_not_commit_markers(
    kafka_factory: Callable[..., KafkaSettings],
) -> None:
    kafka = kafka_factory()
    raw, alerts = kafka.topic("raw.hl7_lab"), kafka.topic("alerts")
    plain = Producer(kafka.librdkafka())
    for index in range(30):
        plain.produce(raw, value=b"x", partition=index % 2)
    assert plain.flush(30) == 0
    # Three transactions of two records: the topic ends in a commit marker no one commits.
    transactional = Producer(kafka.librdkafka(**{"transactional.id": f"{kafka.topic_prefix}tx"}))
    transactional.init_transactions(30)
    for _ in range(3):
        transactional.begin_transaction()
        transactional.produce(alerts, value=b"a", partition=0)
        transactional.produce(alerts, value=b"b", partition=0)
        transactional.commit_transaction(30)
    groups = pipeline_groups(kafka, f"{kafka.topic_prefix}workers", f"{kafka.topic_prefix}sink")
    before = measure_backlog(kafka, groups)
    assert before.by_topic() == {raw: 30, alerts: 6}
    assert before.by_category()["raw"] == 30 and before.by_category()["alerts"] == 6

    def commit(group: str, offsets: list[TopicPartition]) -> None:
        consumer = Consumer(kafka.librdkafka(**{"group.id": group}))
        consumer.commit(offsets=offsets, asynchronous=False)
        consumer.close()

    # The workers finished partition 0 of the raw topic; the sink stored 10 of its 15 and
    # every alert (the offset after the last record, before the last commit marker).
    commit(f"{kafka.topic_prefix}workers", [TopicPartition(raw, 0, 15)])
    commit(f"{kafka.topic_prefix}sink", [TopicPartition(raw, 0, 10), TopicPartition(alerts, 0, 8)])
    after = measure_backlog(kafka, groups)
    assert after.by_topic() == {raw: 20} and after.total == 20  # 5 of partition 0, all of 1
    commit(f"{kafka.topic_prefix}workers", [TopicPartition(raw, 1, 15)])
    commit(f"{kafka.topic_prefix}sink", [TopicPartition(raw, 0, 15), TopicPartition(raw, 1, 15)])
    assert measure_backlog(kafka, groups).total == 0


@pytest.mark.integration
def test_ensure_topics_creates_every_contract_topic_once(kafka_factory: Callable[..., KafkaSettings]) -> None:
    kafka = kafka_factory()  # the factory already created them
    assert ensure_topics(kafka) == []
    wanted = contract_topics(kafka)
    admin = AdminClient(kafka.librdkafka())
    # The broker's metadata cache learns of topics just created a moment after the
    # controller confirmed them.
    wait_for(lambda: set(wanted) <= set(admin.list_topics(timeout=10).topics), 30,
             "the new topics in the broker's metadata")
    metadata = admin.list_topics(timeout=10)
    # 4 raw, 5 norm, alerts, dlq, 4 fact topics (audit included), and 5 internal ones.
    assert len(wanted) == 20
    assert wanted[kafka.topic("audit")] == kafka.norm_partitions
    # Action outcomes: one partition per lifecycle partition.
    assert wanted[kafka.topic("alerts.outcomes")] == wanted[kafka.topic("alerts.lifecycle")]
    for name, partitions in wanted.items():
        assert len(metadata.topics[name].partitions) == partitions
    assert wanted[kafka.topic("raw.hl7_lab")] == 2 and wanted[kafka.topic("dlq")] == 1
    assert wanted[kafka.topic("mpi.identity")] == 1
    assert wanted[kafka.topic("quality.issues")] == wanted[kafka.topic("norm.encounter")]


@pytest.mark.integration
def test_embedded_broker_starts_and_stops(tmp_path: Path) -> None:
    broker = TansuBroker(log_path=tmp_path / "broker.log").start()
    try:
        assert broker.alive()
        kafka = KafkaSettings(bootstrap_servers=broker.bootstrap_servers, broker_kind="tansu")
        assert len(ensure_topics(kafka)) == len(contract_topics(kafka)) == 20
    finally:
        broker.stop()
    assert not broker.alive()


def test_runtime_state_is_only_read_while_its_process_lives(tmp_path: Path) -> None:
    runtime = RuntimeSettings(data_dir=tmp_path)
    RuntimeState(os.getpid(), "127.0.0.1:1", "http://127.0.0.1:2/query", {}, "chdb:///x").write(runtime.runtime_file)
    state = RuntimeState.read(runtime)
    assert state is not None and state.query_url == "http://127.0.0.1:2/query"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    RuntimeState(int(dead.stdout), "127.0.0.1:1", None, {}, "chdb:///x").write(runtime.runtime_file)
    assert RuntimeState.read(runtime) is None


@pytest.mark.integration
def test_up_exits_non_zero_with_a_clear_reason_when_a_component_cannot_start(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEDSTREAM_", "KAFKA_", "CLICKHOUSE_"))}
    env.update(MEDSTREAM_DATA_DIR=str(tmp_path), CLICKHOUSE_URL="ftp://nowhere.invalid/")
    result = subprocess.run(
        [sys.executable, "-m", "medstream", "up", "--events", "10", "--exit-when-done"],
        env=env, capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 1
    assert "the sink did not start" in result.stdout and "sink.log" in result.stdout
    assert "CLICKHOUSE_URL must start with http://, https:// or chdb://" in (tmp_path / "sink.log").read_text()
    assert not (tmp_path / "runtime.json").exists()


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["tansu", "kafka"])
def test_children_die_with_a_killed_parent(tmp_path: Path, kind: str) -> None:
    import re
    import signal
    import time

    from tests.waiting import require_kafka

    if kind == "kafka":
        require_kafka()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEDSTREAM_", "KAFKA_", "CLICKHOUSE_"))}
    env["MEDSTREAM_DATA_DIR"] = str(tmp_path)
    env["MEDSTREAM_EMBEDDED_BROKER"] = kind
    parent = subprocess.Popen(
        [sys.executable, "-m", "medstream", "broker"], env=env, stdout=subprocess.PIPE, text=True
    )
    assert parent.stdout is not None
    said = parent.stdout.readline()
    assert said.startswith(f"embedded {'Apache Kafka' if kind == 'kafka' else 'tansu broker'} on ")
    assert ("NOTHING survives a restart" in said) == (kind == "tansu")
    assert re.search(rf"KAFKA_BOOTSTRAP_SERVERS=\S+ MEDSTREAM_KAFKA_BROKER_KIND={kind}", parent.stdout.readline())
    children = subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(parent.pid)], capture_output=True, text=True
    ).stdout.split()
    assert len(children) == 1
    tansu = int(children[0])
    parent.send_signal(signal.SIGKILL)  # no cleanup code runs in the parent
    parent.wait(timeout=10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and os.path.exists(f"/proc/{tansu}") and (
        open(f"/proc/{tansu}/stat").read().split()[2] != "Z"
    ):
        time.sleep(0.1)
    gone = not os.path.exists(f"/proc/{tansu}") or open(f"/proc/{tansu}/stat").read().split()[2] == "Z"
    assert gone, f"the {kind} broker outlived its killed parent"


@pytest.mark.integration
def test_a_dead_tansu_broker_is_restarted_empty_on_its_port_and_the_loss_is_said(
    tmp_path: Path,
) -> None:
    import signal

    from medstream.settings import ClickHouseSettings, StreamSettings
    from medstream.supervisor import Supervisor

    said: list[str] = []
    runtime = RuntimeSettings(data_dir=tmp_path)
    supervisor = Supervisor(
        KafkaSettings(), ClickHouseSettings(), runtime, StreamSettings(), out=said.append
    )
    broker = TansuBroker(log_path=tmp_path / "broker.log").start()
    supervisor.broker = broker
    kafka = KafkaSettings(bootstrap_servers=broker.bootstrap_servers, broker_kind="tansu")
    supervisor._client_kafka = kafka
    try:
        ensure_topics(kafka)
        assert broker.process is not None
        broker.process.send_signal(signal.SIGKILL)
        broker.process.wait(timeout=10)
        supervisor._tend_broker()  # plans the restart
        assert "are LOST (tansu keeps them in memory only)" in said[-1]
        assert "restarting it empty in 1s" in said[-1]
        wait_for(lambda: (supervisor._tend_broker(), broker.alive())[1], 10, "the restart")
        assert said[-1] == f"the embedded broker runs again on {kafka.bootstrap_servers}"
        assert supervisor.restart_counts() == {"broker": 1}
        # Empty, on the same address, with every topic created again.
        topics = AdminClient(kafka.librdkafka()).list_topics(timeout=10).topics
        assert set(contract_topics(kafka)) <= set(topics)
        state = RuntimeState.read(runtime)
        assert state is not None and state.pids["broker"] == broker.process.pid
        assert supervisor._broker_lost_records  # `up` will exit non-zero
    finally:
        broker.stop()


def _stubborn_child(name: str) -> Child:
    """A real child process that ignores SIGTERM (a component stuck in its shutdown)."""
    process = subprocess.Popen(
        [sys.executable, "-c",
         "import signal, sys, time\n"
         "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
         "print('ready', flush=True)\n"
         "time.sleep(600)\n"],
        stdout=subprocess.PIPE, text=True,
    )
    assert process.stdout is not None and process.stdout.readline() == "ready\n"
    return Child(name, [], 0, process=process)


def test_a_second_stop_request_kills_components_stuck_in_their_shutdown_within_the_stop_now_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading
    import time

    import medstream.supervisor as supervisor_module

    monkeypatch.setattr(supervisor_module, "STOP_NOW_TIMEOUT_S", 1.0)
    lines: list[str] = []
    supervisor = Supervisor(
        KafkaSettings(), ClickHouseSettings(), RuntimeSettings(data_dir=tmp_path),
        StreamSettings(), out=lines.append,
    )
    children = [_stubborn_child("simulator"), _stubborn_child("collector-a")]
    supervisor.request_stop()  # the first request: a graceful stop (75 s each)
    second = threading.Timer(1.0, supervisor.request_stop)
    second.start()
    started = time.monotonic()
    killed = supervisor._stop_all(children)
    took = time.monotonic() - started
    second.join()
    assert killed == ["simulator", "collector-a"]
    assert all(c.process is not None and c.process.returncode == -9 for c in children)
    # 1 s until the second request, then at most STOP_NOW_TIMEOUT_S (1 s) for both together.
    assert 1.9 < took < 4.0, took
    assert lines == [
        "simulator did not stop within 1s of the second stop request; killing it",
        "collector-a did not stop within 1s of the second stop request; killing it",
    ]


@pytest.mark.integration
def test_on_tansu_the_backlog_counts_the_whole_last_batch_past_the_reported_end(
    tansu_kafka_factory: Callable[..., KafkaSettings],
) -> None:
    from confluent_kafka.admin import OffsetSpec

    from medstream.offsets import list_offsets, log_ends

    kafka = tansu_kafka_factory()
    raw = kafka.topic("raw.hl7_lab")
    batched = Producer(kafka.librdkafka(**{"linger.ms": 500, "batch.num.messages": 1000}))
    for _ in range(40):
        batched.produce(raw, value=b"x", partition=0)
    assert batched.flush(30) == 0
    admin = AdminClient(kafka.librdkafka())
    reported = list_offsets(admin, [(raw, 0)], OffsetSpec.latest(), 10)[(raw, 0)]
    assert reported < 40  # tansu: the first offset of the last batch + 1
    assert log_ends(kafka, admin, [(raw, 0)], 10) == {(raw, 0): 40}
    groups = pipeline_groups(kafka, f"{kafka.topic_prefix}workers", f"{kafka.topic_prefix}sink")
    assert measure_backlog(kafka, groups).by_topic() == {raw: 40}
    consumer = Consumer(kafka.librdkafka(**{"group.id": f"{kafka.topic_prefix}sink"}))
    consumer.commit(offsets=[TopicPartition(raw, 0, 39)], asynchronous=False)
    consumer.close()
    consumer = Consumer(kafka.librdkafka(**{"group.id": f"{kafka.topic_prefix}workers"}))
    consumer.commit(offsets=[TopicPartition(raw, 0, 40)], asynchronous=False)
    consumer.close()
    assert measure_backlog(kafka, groups).by_topic() == {raw: 1}  # one record of the batch


@pytest.mark.integration
def test_a_partition_not_read_to_its_end_in_time_is_an_error_never_a_count(
    kafka_factory: Callable[..., KafkaSettings],
) -> None:
    from medstream.offsets import ReadUnfinished, count_records

    kafka = kafka_factory()
    absent = (kafka.topic("never-created"), 0)  # no end-of-partition ever comes
    with pytest.raises(ReadUnfinished, match=r"never-created\[0\] not read to the end within 1s"):
        count_records(kafka, {absent: 0}, {absent: 10}, timeout_s=1.0)


def test_before_its_last_drain_up_stops_the_timers_of_the_workers_that_handle_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Timer output made after the drain measured nothing left (device silence findings
    # for every device once the simulator stopped) was never read by the alert lifecycle:
    # 181 records left on alerts.lifecycle and exit 1 in one `up --exit-when-done` run.
    import medstream.supervisor as supervisor_module

    monkeypatch.setattr(supervisor_module, "TIMERS_SETTLE_S", 0.1)
    monkeypatch.setattr(supervisor_module, "TIMERS_CONFIRM_S", 4.0)
    said: list[str] = []
    supervisor = Supervisor(
        KafkaSettings(), ClickHouseSettings(), RuntimeSettings(data_dir=tmp_path),
        StreamSettings(), out=said.append,
    )
    told = tmp_path / "told"

    def worker(name: str, scraped: bool, lost: int = 0) -> Child:
        """A process standing in for a worker: /metrics says medstream_timers_stopped 1
        once it handled a SIGUSR2; the first ``lost`` signals are lost (sent before its
        handler was installed)."""
        port = free_port()
        process = subprocess.Popen(
            [sys.executable, "-c",
             "import http.server, pathlib, signal, threading, time\n"
             f"seen = [0]; lost = {lost}\n"
             "def handled(*a):\n"
             "    seen[0] += 1\n"
             f"    pathlib.Path({str(told)!r}, {name!r} + str(seen[0])).touch()\n"
             "signal.signal(signal.SIGUSR2, handled)\n"
             "class Metrics(http.server.BaseHTTPRequestHandler):\n"
             "    def do_GET(self):\n"
             "        body = f'medstream_timers_stopped {int(seen[0] > lost)}\\n'.encode()\n"
             "        self.send_response(200); self.end_headers(); self.wfile.write(body)\n"
             "    def log_message(self, *a): pass\n"
             f"server = http.server.HTTPServer(('127.0.0.1', {port}), Metrics)\n"
             "threading.Thread(target=server.serve_forever, daemon=True).start()\n"
             "print('ready', flush=True)\n"
             "time.sleep(600)\n"],
            stdout=subprocess.PIPE, text=True,
        )
        assert process.stdout is not None and process.stdout.readline() == "ready\n"
        child = Child(name, [], port, process=process)
        child.restart.started_at = 1.0
        child.values_from = 1.0 if scraped else None
        return child

    told.mkdir()
    ready = worker("streams-0", scraped=True, lost=1)
    starting = worker("streams-1", scraped=False)
    deaf = worker("streams-2", scraped=True, lost=1000)
    try:
        assert supervisor._stop_timers([ready, starting]) is True
        # The first signal was lost: sent again until it confirmed.
        assert (told / "streams-01").exists() and (told / "streams-02").exists()
        assert ready.last_values["timers_stopped"] == 1.0
        # One not scraped since it started may still be starting: SIGUSR2's default action
        # would end it, so it is not sent.
        assert not any(p.name.startswith("streams-1") for p in told.iterdir())
        assert ready.process is not None and ready.process.poll() is None
        assert said == []
        assert supervisor._stop_timers([starting]) is False
        # One that confirmed is not asked again (the drain asks at every pass).
        signals = len(list(told.iterdir()))
        began = time.monotonic()
        assert supervisor._stop_timers([ready]) is True
        assert len(list(told.iterdir())) == signals and time.monotonic() - began < 0.5
        # One that never confirms is said once, and the stop goes on; not past a deadline.
        began = time.monotonic()
        assert supervisor._stop_timers([deaf]) is True
        assert 4.0 <= time.monotonic() - began < 10.0
        assert supervisor._stop_timers([deaf], deadline=time.monotonic() + 1.0) is True
        assert time.monotonic() - began < 4.0 + 1.0 + 3.0
        assert said == ["streams-2 did not confirm within 4s that their timers stopped: what "
                        "they make from now on may be left for the next run"]
    finally:
        for child in (ready, starting, deaf):
            assert child.process is not None
            child.process.kill()
            child.process.wait()
