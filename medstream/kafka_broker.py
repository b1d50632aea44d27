"""Apache Kafka run by medstream itself: jars from Maven Central, KRaft combined mode.

The jars are the artifacts of ``deploy/kafka/pom.xml`` (org.apache.kafka:kafka_2.13 and its
runtime dependencies), copied by Maven into a cache directory once (``make kafka``, or on
demand with a progress message). A node runs ``kafka.Kafka`` from that class path as broker
and controller at once, with its log directories under the data directory, so topics,
offsets and Faust changelogs survive a restart; the storage is formatted with
``kafka.tools.StorageTool`` on the first start only.

One node serves the embedded runtime and the test suite; :class:`KafkaCluster` starts three
on loopback (a replicated cluster for failure tests).
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from medstream.runtime import EmbeddedRuntimeError, die_with_parent, free_port, wait_for_port
from medstream.settings import BrokerKind

#: The pom naming the broker's artifacts (a source checkout; see :func:`pom_path`).
REPO_POM = Path(__file__).resolve().parents[1] / "deploy" / "kafka" / "pom.xml"
#: JVM heap of one node: a development broker, bounded.
DEFAULT_HEAP = "512m"
FETCH_HINT = "make kafka"


class KafkaUnavailable(EmbeddedRuntimeError):
    """Java or the Kafka jars are missing; the message names the command that fixes it."""


def pom_path() -> Path:
    """The pom of the broker's artifacts (MEDSTREAM_KAFKA_POM overrides the checkout's)."""
    configured = os.environ.get("MEDSTREAM_KAFKA_POM")
    return Path(configured) if configured else REPO_POM


def kafka_version(pom: Path | None = None) -> str:
    """The pinned Apache Kafka version, read from the pom's ``kafka.version`` property."""
    pom = pom or pom_path()
    if not pom.is_file():
        raise KafkaUnavailable(
            f"{pom} is missing: the Apache Kafka pom ships with a medstream source checkout "
            "(deploy/kafka/pom.xml); set MEDSTREAM_KAFKA_POM to it, or use "
            "MEDSTREAM_EMBEDDED_BROKER=tansu"
        )
    found = re.search(r"<kafka\.version>([^<]+)</kafka\.version>", pom.read_text())
    if found is None:
        raise KafkaUnavailable(f"{pom} names no <kafka.version>")
    return found.group(1).strip()


def cache_dir() -> Path:
    """Where the jars are kept: MEDSTREAM_KAFKA_CACHE, else ~/.cache/medstream/kafka."""
    configured = os.environ.get("MEDSTREAM_KAFKA_CACHE")
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "medstream" / "kafka"


def libs_dir(version: str | None = None) -> Path:
    """The directory holding one version's jars."""
    return cache_dir() / (version or kafka_version()) / "libs"


def java_executable() -> str | None:
    """The java binary (JAVA_HOME first), or None."""
    home = os.environ.get("JAVA_HOME")
    if home and (Path(home) / "bin" / "java").is_file():
        return str(Path(home) / "bin" / "java")
    return shutil.which("java")


def jars_present(version: str | None = None) -> bool:
    """True when the broker's jars are in the cache (the fetch completed)."""
    libs = libs_dir(version)
    return (libs / ".complete").is_file() and any(libs.glob("kafka_2.13-*.jar"))


MIN_JAVA = 17


@functools.lru_cache(maxsize=8)
def java_version(java: str) -> int | None:
    """The feature version of a java binary (17 for "17.0.15"), or None if unreadable."""
    try:
        result = subprocess.run(
            [java, "-version"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = re.search(r'version "(\d+)(?:\.(\d+))?', result.stderr + result.stdout)
    if found is None:
        return None
    major = int(found.group(1))
    return int(found.group(2) or 0) if major == 1 else major  # "1.8.0" is Java 8


def available() -> str | None:
    """Why Apache Kafka cannot start here (no Java 17+, no jars, no pom), or None."""
    java = java_executable()
    install = f"Debian: apt-get install openjdk-{MIN_JAVA}-jre-headless"
    if java is None:
        return f"Java is not installed (Java {MIN_JAVA} or newer; {install})"
    java_release = java_version(java)
    if java_release is None or java_release < MIN_JAVA:
        return (
            f"{java} is Java {java_release or 'of an unknown version'}; Apache Kafka 4 needs "
            f"Java {MIN_JAVA} or newer ({install}, or set JAVA_HOME)"
        )
    try:
        version = kafka_version()
    except KafkaUnavailable as exc:
        return str(exc)
    if not jars_present(version):
        return (
            f"the Apache Kafka {version} jars are not in {libs_dir(version)} "
            f"(run `{FETCH_HINT}`)"
        )
    return None


#: The Maven plugin that copies the jars, pinned (Maven's own default differs by version).
DEPENDENCY_PLUGIN = "org.apache.maven.plugins:maven-dependency-plugin:3.8.1"
FETCH_TIMEOUT_S = 900


def fetch_jars(out: Callable[[str], None] = print, force: bool = False) -> Path:
    """Copy the broker's jars from Maven Central into the cache (once); returns their dir.

    One fetch at a time per cache (a lock file); Maven's output goes to a file next to the
    jars and its tail into the error when it fails; checksums are strict; a fetch that
    takes longer than FETCH_TIMEOUT_S is stopped. Ctrl-C stops Maven and propagates.
    """
    import fcntl

    version = kafka_version()
    libs = libs_dir(version)
    if jars_present(version) and not force:
        return libs
    mvn = shutil.which("mvn")
    if mvn is None:
        raise KafkaUnavailable(
            "Maven (mvn) is needed once to fetch the Apache Kafka jars from Maven Central "
            "(Debian: apt-get install maven), or use MEDSTREAM_EMBEDDED_BROKER=tansu"
        )
    libs.parent.mkdir(parents=True, exist_ok=True)
    with (libs.parent / ".fetch.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another fetch of this version finishes first
        if jars_present(version) and not force:
            return libs
        return _fetch_locked(mvn, version, libs, out)


def _fetch_locked(mvn: str, version: str, libs: Path, out: Callable[[str], None]) -> Path:
    staging = libs.with_name("libs.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    maven_log = libs.parent / "fetch.log"
    out(f"fetching Apache Kafka {version} from Maven Central into {libs} (once; about 40 MB) ...")
    started = time.monotonic()
    command = [
        mvn, "-B", "--strict-checksums", "-f", str(pom_path()),
        f"{DEPENDENCY_PLUGIN}:copy-dependencies",
        f"-DoutputDirectory={staging}", "-DincludeScope=runtime",
    ]
    next_report = 10.0
    with maven_log.open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            while process.poll() is None:
                time.sleep(0.5)
                elapsed = time.monotonic() - started
                if elapsed > FETCH_TIMEOUT_S:
                    process.kill()
                    process.wait()
                    raise KafkaUnavailable(
                        f"fetching the Apache Kafka jars took over {FETCH_TIMEOUT_S} s and was "
                        f"stopped (is Maven Central reachable?); Maven's log: {maven_log}"
                    )
                if elapsed >= next_report:
                    out(f"  ... still fetching after {elapsed:.0f} s")
                    next_report += 10
        except BaseException:
            if process.poll() is None:
                process.kill()
                process.wait()
            shutil.rmtree(staging, ignore_errors=True)
            raise
    if process.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        tail = maven_log.read_text(errors="replace")[-2000:]
        raise KafkaUnavailable(
            f"fetching the Apache Kafka jars failed (mvn exit {process.returncode}; log "
            f"{maven_log}):\n{tail}"
        )
    (staging / ".complete").write_text(version + "\n")
    shutil.rmtree(libs, ignore_errors=True)
    staging.rename(libs)
    out(f"Apache Kafka {version}: {len(list(libs.glob('*.jar')))} jars in "
        f"{time.monotonic() - started:.0f} s")
    return libs


LOG4J2 = """\
status = warn
appender.file.type = File
appender.file.name = file
appender.file.fileName = {log}
appender.file.append = true
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = {level}
rootLogger.appenderRef.file.ref = file
logger.kafka.name = kafka
logger.kafka.level = {level}
logger.state.name = state.change.logger
logger.state.level = warn
"""


@dataclass
class KafkaNode:
    """One Apache Kafka process, broker and controller, storing under ``data_dir``.

    ``voters`` maps node id -> controller port of every controller of the cluster (just
    this node for a single-node cluster). A restart on the same directory resumes the same
    cluster (its id is read back from the formatted storage); ports are chosen anew.
    """

    data_dir: Path
    node_id: int = 1
    port: int = 0
    controller_port: int = 0
    voters: dict[int, int] = field(default_factory=dict)
    cluster_id: str = ""
    heap: str = DEFAULT_HEAP
    extra: dict[str, str] = field(default_factory=dict)
    log_level: str = "WARN"
    process: subprocess.Popen[bytes] | None = None
    _lock_handle: Any = None

    kind: ClassVar[BrokerKind] = "kafka"

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        self.port = self.port or free_port()
        self.controller_port = self.controller_port or free_port()
        if not self.voters:
            self.voters = {self.node_id: self.controller_port}

    @property
    def bootstrap_servers(self) -> str:
        """The host:port clients connect to."""
        return f"127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        """The broker's log file (log4j2)."""
        return self.data_dir / "broker.log"

    @property
    def log_dirs(self) -> Path:
        """Where the topics' partitions live."""
        return self.data_dir / "logs"

    def properties(self) -> dict[str, str]:
        """server.properties of this node."""
        replicas = min(3, len(self.voters))
        props = {
            "process.roles": "broker,controller",
            "node.id": str(self.node_id),
            "controller.quorum.voters": ",".join(
                f"{node}@127.0.0.1:{port}" for node, port in sorted(self.voters.items())
            ),
            "listeners": f"PLAINTEXT://127.0.0.1:{self.port},"
            f"CONTROLLER://127.0.0.1:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(self.log_dirs.resolve()),
            "num.partitions": "1",
            "default.replication.factor": str(replicas),
            "offsets.topic.replication.factor": str(replicas),
            "offsets.topic.num.partitions": "10",
            "transaction.state.log.replication.factor": str(replicas),
            "transaction.state.log.min.isr": str(min(2, replicas)),
            "transaction.state.log.num.partitions": "10",
            "share.coordinator.state.topic.replication.factor": str(replicas),
            "share.coordinator.state.topic.min.isr": str(min(2, replicas)),
            "min.insync.replicas": str(min(2, replicas)),
            # Consumers join at once instead of waiting 3 s for more members.
            "group.initial.rebalance.delay.ms": "0",
            # A development broker: a day of data, small segments, quick checks.
            "log.retention.hours": "24",
            "log.segment.bytes": str(64 * 1024 * 1024),
            "log.retention.check.interval.ms": "60000",
        }
        props.update(self.extra)
        return props

    def _formatted_cluster_id(self) -> str:
        """The cluster id the storage was formatted with (meta.properties), or ""."""
        meta = self.log_dirs / "meta.properties"
        if not meta.is_file():
            return ""
        found = re.search(r"^cluster\.id=(\S+)$", meta.read_text(), re.MULTILINE)
        return found.group(1) if found else ""

    def _lock(self) -> None:
        """Hold the data directory for this process's lifetime: a second medstream process on
        it is refused with a clear error instead of overwriting the running node's files."""
        import fcntl

        handle = (self.data_dir / "medstream-node.lock").open("w")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise EmbeddedRuntimeError(
                f"another medstream process runs Apache Kafka on {self.data_dir}: stop it "
                "first, or use another MEDSTREAM_DATA_DIR"
            ) from None
        self._lock_handle = handle

    @property
    def formatted(self) -> bool:
        """True when this node's storage was formatted (an earlier start)."""
        return (self.log_dirs / "meta.properties").is_file()

    def _java(self, main: str, args: Sequence[str], heap: str) -> list[str]:
        java = java_executable()
        if java is None:
            raise KafkaUnavailable(available() or "Java is not installed")
        libs = libs_dir()
        return [
            java,
            f"-Xmx{heap}", f"-Xms{min_heap(heap)}",
            "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20", "-XX:+ExitOnOutOfMemoryError",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.data_dir.resolve() / 'log4j2.properties'}",
            f"-Dkafka.logs.dir={self.data_dir.resolve()}",
            "-cp", f"{libs}/*",
            main, *args,
        ]

    def start(self, timeout_s: float = 60, wait: bool = True) -> KafkaNode:
        """Format on the first start, start the node and wait until it accepts clients
        (``wait=False``: a cluster's nodes answer only once a quorum of them runs)."""
        self.prepare()
        self.launch()
        if wait:
            self.wait_ready(timeout_s)
        return self

    def prepare(self) -> None:
        """Lock the data directory, write the configuration, format the storage once."""
        reason = available()
        if reason is not None:
            raise KafkaUnavailable(f"cannot start Apache Kafka: {reason}")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # The partitions hold raw source messages, patient identifiers included: owner only.
        self.data_dir.chmod(0o700)
        if self.process is None or self.process.poll() is not None:
            self._lock()
        # A formatted storage knows its cluster; a new one gets the given or a random id.
        self.cluster_id = self._formatted_cluster_id() or self.cluster_id or random_cluster_id()
        (self.data_dir / "log4j2.properties").write_text(
            LOG4J2.format(log=self.log_path.resolve(), level=self.log_level)
        )
        config = self.data_dir / "server.properties"
        config.write_text("".join(f"{k}={v}\n" for k, v in self.properties().items()))
        if not self.formatted:
            self._format(config)

    def launch(self) -> None:
        """Start the node's process from the prepared configuration (see :meth:`start`).

        Call it from a thread that outlives the node: the process is told to stop when the
        thread that started it ends (PR_SET_PDEATHSIG follows the thread, not the process).
        """
        config = self.data_dir / "server.properties"
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self._java("kafka.Kafka", [str(config)], self.heap),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )

    def wait_ready(self, timeout_s: float = 60) -> None:
        """Wait until the node accepts clients; stop it and say where its log is if not."""
        try:
            wait_for_port(self.port, timeout_s, self.process)
        except EmbeddedRuntimeError as exc:
            self.stop()
            raise EmbeddedRuntimeError(
                f"Apache Kafka did not start ({exc}); its log: {self.log_path}"
            ) from exc

    def _format(self, config: Path) -> None:
        command = self._java(
            "kafka.tools.StorageTool",
            ["format", "--config", str(config), "--cluster-id", self.cluster_id,
             "--ignore-formatted"],
            "256m",
        )
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise EmbeddedRuntimeError(
                f"kafka-storage format failed (exit {result.returncode}): "
                f"{(result.stdout + result.stderr)[-2000:]}"
            )

    def alive(self) -> bool:
        """True while the node's process runs."""
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout_s: float = 30) -> None:
        """A clean shutdown (SIGTERM: the node flushes and closes its logs)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._unlock()

    def restart(self, timeout_s: float = 60) -> None:
        """Start the node again after its process died, on the same data directory and
        ports: its topics and committed offsets are as it left them, and clients reconnect
        by themselves."""
        if self.alive():
            raise EmbeddedRuntimeError("Apache Kafka is still running: stop it before a restart")
        self._unlock()  # the dead node's lock is still held by this process: take it anew
        self.start(timeout_s)

    def _unlock(self) -> None:
        if self._lock_handle is not None:
            self._lock_handle.close()
            self._lock_handle = None

    def kill(self) -> None:
        """kill -9: no shutdown at all (failure tests)."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self._unlock()


def min_heap(heap: str) -> str:
    """The initial heap: a quarter of the maximum (the same unit)."""
    found = re.fullmatch(r"(\d+)([kmgKMG]?)", heap)
    if found is None:
        return heap
    return f"{max(1, int(found.group(1)) // 4)}{found.group(2)}"


def random_cluster_id() -> str:
    """A KRaft cluster id: 16 random bytes in URL-safe base64 without padding, never starting
    with "-" (as Kafka's own Uuid.randomUuid: the storage tool would read it as an option)."""
    import base64

    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


@dataclass
class KafkaCluster:
    """``size`` nodes on loopback, each broker and controller (a replicated KRaft cluster)."""

    data_dir: Path
    size: int = 3
    heap: str = "384m"
    nodes: list[KafkaNode] = field(default_factory=list)
    #: A loopback cluster for failure tests: a node that stops heartbeating is fenced, and
    #: its partitions led elsewhere, after 4 s instead of Kafka's 9 s.
    extra: dict[str, str] = field(
        default_factory=lambda: {
            "broker.session.timeout.ms": "4000",
            "broker.heartbeat.interval.ms": "1000",
        }
    )

    def __post_init__(self) -> None:
        ports = {node: free_port() for node in range(1, self.size + 1)}
        cluster_id = random_cluster_id()
        self.nodes = [
            KafkaNode(
                Path(self.data_dir) / f"node-{node}",
                node_id=node,
                controller_port=port,
                voters=ports,
                cluster_id=cluster_id,
                heap=self.heap,
                extra=dict(self.extra),
            )
            for node, port in ports.items()
        ]

    @property
    def bootstrap_servers(self) -> str:
        """Every node's address."""
        return ",".join(node.bootstrap_servers for node in self.nodes)

    def start(self, timeout_s: float = 90) -> KafkaCluster:
        """Start every node (each waits for its quorum) and wait for all of them."""
        reason = available()
        if reason is not None:
            raise KafkaUnavailable(f"cannot start Apache Kafka: {reason}")
        for node in self.nodes:
            node.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            # Formatting starts a JVM per node: in parallel. The nodes themselves are started
            # from this thread (they are told to stop when the thread starting them ends).
            with ThreadPoolExecutor(self.size) as pool:
                list(pool.map(KafkaNode.prepare, self.nodes))
            for node in self.nodes:
                node.launch()
            for node in self.nodes:
                node.wait_ready(timeout_s)
        except BaseException:
            self.stop()  # no node of a half-started cluster is left running
            raise
        return self

    def stop(self) -> None:
        """Stop every node."""
        for node in self.nodes:
            node.stop()

