"""Typed settings for every medstream component, read from the environment on demand.

Each component has its own settings object; nothing reads the environment at import
time. Three unprefixed variables switch a part from the embedded default to a real
server: KAFKA_BOOTSTRAP_SERVERS, CLICKHOUSE_URL and SCHEMA_REGISTRY_URL. Everything
else is prefixed MEDSTREAM_.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

_PREFIXED = SettingsConfigDict(env_prefix="MEDSTREAM_", extra="ignore", populate_by_name=True)

# Topic names are part of the contract between stages; only the prefix is configurable.
RAW_TOPICS = {
    "emr_cdc": "raw.emr_cdc",
    "hl7_lab": "raw.hl7_lab",
    "device": "raw.device",
    "claim": "raw.claim",
}
NORM_TOPICS = {
    "encounter": "norm.encounter",
    "diagnosis": "norm.diagnosis",
    "lab_result": "norm.lab_result",
    "observation": "norm.observation",
    "claim_line": "norm.claim_line",
}
ALERTS_TOPIC = "alerts"
DLQ_TOPIC = "dlq"
#: Facts besides the normalised events, each stored in its table: what the stream stage
#: derives, and the audit trail of people's sign-ins, queries and actions.
FACT_TOPICS = {
    "quality_issue": "quality.issues",
    "person_link": "mpi.links",
    "terminology_unmapped": "terminology.unmapped",
    "audit_log": "audit",
}
#: Internal topics between the stream stage's agents (not stored).
LIFECYCLE_TOPIC = "alerts.lifecycle"
#: What the lifecycle did with each operator action (applied or refused), for whoever asked.
ACTION_OUTCOMES_TOPIC = "alerts.outcomes"
IDENTITY_TOPIC = "mpi.identity"
SYNDROMIC_TOPIC = "detect.syndromic"
FEED_ACTIVITY_TOPIC = "detect.feed_activity"


#: How the stream workers deliver: duplicates possible (collapsed downstream) or none.
ProcessingGuarantee = Literal["at_least_once", "exactly_once"]
#: The brokers medstream knows: Apache Kafka (or a compatible cluster) and tansu.
BrokerKind = Literal["kafka", "tansu"]
#: Cluster ids of the tansu brokers medstream starts begin with this.
TANSU_CLUSTER_PREFIX = "medstream-"


#: Set by `up` for stream workers it starts after it stopped the workers' timers (its stop):
#: they start with their timers stopped (streams.app.TIMERS_STOPPED).
TIMERS_STOPPED_ENV = "MEDSTREAM_STREAMS_TIMERS_STOPPED"

class KafkaSettings(BaseSettings):
    """How to reach Kafka; empty bootstrap servers means "start the embedded broker"."""

    model_config = SettingsConfigDict(
        env_prefix="MEDSTREAM_KAFKA_", extra="ignore", populate_by_name=True
    )

    bootstrap_servers: str = Field(
        default="",
        validation_alias=AliasChoices(
            "KAFKA_BOOTSTRAP_SERVERS", "MEDSTREAM_KAFKA_BOOTSTRAP_SERVERS"
        ),
        description="host:port list of a real Kafka cluster; empty starts the embedded broker",
    )
    security_protocol: str = Field(default="PLAINTEXT", description="librdkafka security.protocol")
    sasl_mechanism: str = Field(default="", description="librdkafka sasl.mechanism")
    sasl_username: str = Field(default="", description="SASL user name")
    sasl_password: SecretStr = Field(default=SecretStr(""), description="SASL password")
    ssl_ca_location: str = Field(
        default="",
        description="CA bundle (PEM file) that signed the brokers' certificates, for SSL and "
        "SASL_SSL; empty uses the system's trusted CAs",
    )
    broker_kind: BrokerKind = Field(
        default="kafka",
        description="what bootstrap_servers points at: kafka (Apache Kafka or compatible: long "
        "fetch waits woken by new data, idempotent producers) or tansu (the embedded toy "
        "broker: its workarounds); `up` sets it for the broker it starts",
    )
    session_timeout_ms: int = Field(
        default=0,
        description="group session timeout; 0 = 10000 on Kafka (its minimum is 6000), 3000 on "
        "tansu (a join there takes about half of it)",
    )
    heartbeat_interval_ms: int = Field(
        default=0, description="group heartbeat interval; 0 = a sixth of the session timeout"
    )
    fetch_wait_max_ms: int = Field(
        default=0,
        description="max fetch wait; 0 = 500 on Kafka (a waiting fetch is woken by new data), "
        "20 on tansu (it is not)",
    )
    compression_type: str = Field(
        default="none",
        description="producer compression: none on loopback (pure CPU cost), lz4/zstd on a network",
    )
    topic_prefix: str = Field(default="", description="prefix for every medstream topic name")
    raw_partitions: int = Field(default=4, description="partitions per raw.* topic")
    norm_partitions: int = Field(default=4, description="partitions per norm.* topic")
    replication_factor: int = Field(
        default=1,
        description="replicas of every medstream topic and Faust changelog (3 on a production "
        "cluster; the embedded broker has one)",
    )

    @property
    def tansu(self) -> bool:
        """True when the broker is tansu, whose defects need workarounds."""
        return self.broker_kind == "tansu"

    def check_cluster(self, cluster_id: str | None) -> None:
        """Refuse a tansu broker taken for Apache Kafka: its workarounds would be off (the
        sink's re-read of batches served out of order among them). ValueError naming the fix."""
        if not self.tansu and (cluster_id or "").startswith(TANSU_CLUSTER_PREFIX):
            raise ValueError(
                f"the broker at {self.bootstrap_servers} is medstream's embedded tansu broker "
                f"(cluster id {cluster_id}): set MEDSTREAM_KAFKA_BROKER_KIND=tansu, as "
                "`medstream broker` prints"
            )

    @property
    def session_timeout(self) -> int:
        """The group session timeout in effect (ms)."""
        return self.session_timeout_ms or (3000 if self.tansu else 10000)

    @property
    def heartbeat_interval(self) -> int:
        """The group heartbeat interval in effect (ms)."""
        return self.heartbeat_interval_ms or max(100, self.session_timeout // 6)

    @property
    def fetch_wait(self) -> int:
        """The consumers' max fetch wait in effect (ms)."""
        return self.fetch_wait_max_ms or (20 if self.tansu else 500)

    @property
    def embedded(self) -> bool:
        """True when medstream must start its own broker."""
        return not self.bootstrap_servers

    def topic(self, name: str) -> str:
        """The real topic name for a contract topic name."""
        return f"{self.topic_prefix}{name}"

    def librdkafka(self, **overrides: Any) -> dict[str, Any]:
        """The librdkafka configuration shared by every confluent-kafka client."""
        conf: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap_servers,
            "security.protocol": self.security_protocol,
        }
        if self.sasl_mechanism:
            conf["sasl.mechanism"] = self.sasl_mechanism
            conf["sasl.username"] = self.sasl_username
            conf["sasl.password"] = self.sasl_password.get_secret_value()
        if self.ssl_ca_location:
            conf["ssl.ca.location"] = self.ssl_ca_location
        conf.update(overrides)
        return conf

    def producer_config(self, **overrides: Any) -> dict[str, Any]:
        """An idempotent, acks=all producer: a source position is committed only after this acks."""
        return self.librdkafka(
            **{
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": 5,
                "compression.type": self.compression_type,
                **overrides,
            }
        )

    def consumer_config(self, group_id: str, **overrides: Any) -> dict[str, Any]:
        """A manual-commit consumer tuned for short fetch waits and quick group joins."""
        return self.librdkafka(
            **{
                "group.id": group_id,
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "session.timeout.ms": self.session_timeout,
                "heartbeat.interval.ms": self.heartbeat_interval,
                "fetch.wait.max.ms": self.fetch_wait,
                "isolation.level": "read_committed",
                **overrides,
            }
        )


class ClickHouseSettings(BaseSettings):
    """Where analytical data lives: an embedded chdb path or a ClickHouse server URL."""

    model_config = SettingsConfigDict(
        env_prefix="MEDSTREAM_CLICKHOUSE_", extra="ignore", populate_by_name=True
    )

    url: str = Field(
        default="",
        validation_alias=AliasChoices("CLICKHOUSE_URL", "MEDSTREAM_CLICKHOUSE_URL"),
        description=(
            "http(s)://user:pass@host:port/ or chdb:///path; empty uses chdb in the data dir"
        ),
    )
    database: str = Field(default="medstream", description="database holding medstream tables")
    ca_cert: str = Field(
        default="",
        description="CA bundle (PEM file) that signed an https:// server's certificate; empty "
        "uses the system's trusted CAs",
    )
    query_timeout_s: int = Field(default=60, description="max execution time of `medstream sql`")
    query_max_memory_mb: int = Field(
        default=2048, description="memory one read-only query may use (MB; past it, cancelled)"
    )
    query_max_result_mb: int = Field(
        default=64,
        description="result size of one read-only query (MB; a bigger result is cut and "
        "marked truncated)",
    )
    query_max_threads: int = Field(
        default=2, description="threads one read-only query may use (the rest stay for ingestion)"
    )
    query_concurrency: int = Field(
        default=2,
        description="read-only queries the embedded engine's query endpoint runs at once "
        "(more wait 5 s, then are refused as busy)",
    )
    cluster: str = Field(
        default="",
        description="ClickHouse cluster (remote_servers name) whose replicas all get the tables: "
        "replicated engines and ON CLUSTER DDL; empty = one server or the embedded engine",
    )


class RegistrySettings(BaseSettings):
    """Schema registry: the committed manifest by default, a Confluent registry when set."""

    model_config = _PREFIXED

    url: str = Field(
        default="",
        validation_alias=AliasChoices("SCHEMA_REGISTRY_URL", "MEDSTREAM_SCHEMA_REGISTRY_URL"),
        description="Confluent-compatible registry URL (or mock://name in tests); empty = schemas/",
    )


class StreamSettings(BaseSettings):
    """The Faust stream processors."""

    model_config = SettingsConfigDict(
        env_prefix="MEDSTREAM_STREAMS_", extra="ignore", populate_by_name=True
    )

    app_id: str = Field(default="medstream-streams", description="Faust application id / group")
    workers: int = Field(default=1, description="Faust worker processes started by `medstream up`")
    pseudonym_key: SecretStr = Field(
        default=SecretStr(""),
        description="HMAC key for person_key, encounter_key and the patient index tokens (at "
        "least 32 random characters, the same on every worker); empty = the data directory's "
        "keys/pseudonym.key, created by `medstream up`",
    )
    producer_linger_ms: int = Field(default=5, description="Faust producer linger")
    processing_guarantee: ProcessingGuarantee = Field(
        default="at_least_once",
        description="at_least_once (duplicates collapsed by event id downstream) or "
        "exactly_once (Kafka transactions; Apache Kafka only, costs latency: see the README)",
    )
    commit_interval_ms: int | None = Field(
        default=None,
        gt=0,
        description="how often a worker commits its offsets (its transactions under "
        "exactly_once, which readers see only then); default 1000, 100 under exactly_once",
    )
    rules_dir: Path | None = Field(
        default=None,
        description="a directory of the site's own rule files (feeds.yaml, news2.yaml, ...); "
        "each file it does not hold comes from streams/rules",
    )

    @property
    def exactly_once(self) -> bool:
        """True when outputs go out in Kafka transactions."""
        return self.processing_guarantee == "exactly_once"

    @property
    def commit_interval(self) -> int:
        """The commit interval in effect (ms)."""
        return self.commit_interval_ms or (100 if self.exactly_once else 1000)

    @model_validator(mode="after")
    def _transactions_end_in_time(self) -> StreamSettings:
        # A transaction open longer than its timeout (aiokafka's 60 s) is aborted by the
        # broker, and the worker would then fail every commit.
        if self.exactly_once and self.commit_interval > 30_000:
            raise ValueError(
                "MEDSTREAM_STREAMS_COMMIT_INTERVAL_MS must be at most 30000 under exactly_once "
                "(each commit ends a transaction; Kafka aborts one open for 60 s)"
            )
        return self

    def check_broker(self, kafka: KafkaSettings) -> None:
        """Refuse exactly_once on tansu, which shows aborted transactions to read_committed
        readers. ValueError naming the fix."""
        if self.exactly_once and kafka.tansu:
            raise ValueError(
                "MEDSTREAM_STREAMS_PROCESSING_GUARANTEE=exactly_once needs Apache Kafka: tansu "
                "shows aborted transactions to read_committed readers; use at_least_once "
                "there, or Apache Kafka (MEDSTREAM_EMBEDDED_BROKER=kafka; `bench --broker kafka`)"
            )

    @field_validator("rules_dir", mode="before")
    @classmethod
    def _no_empty_rules_dir(cls, value: object) -> object:
        # An empty variable means "not set", never the working directory.
        return None if isinstance(value, str) and not value.strip() else value


class SinkSettings(BaseSettings):
    """The ClickHouse sink."""

    model_config = SettingsConfigDict(
        env_prefix="MEDSTREAM_SINK_", extra="ignore", populate_by_name=True
    )

    group_id: str = Field(default="medstream-sink", description="sink consumer group")
    batch_max_rows: int = Field(default=10000, description="flush a partition batch at this size")
    batch_max_ms: int = Field(default=200, description="flush a partition batch at this age")
    retry_initial_s: float = Field(default=0.5, description="first backoff while ClickHouse fails")
    retry_max_s: float = Field(default=30.0, description="longest backoff while ClickHouse fails")
    dead_letter_secret: SecretStr = Field(
        default=SecretStr(""),
        description="secret sealing dead-letter payloads (AES-GCM) before ClickHouse stores "
        "them (at least 32 random characters; keep old ones to read old payloads); empty = "
        "the data directory's keys/dead-letter.key, created by `medstream up`",
    )


class AuditSettings(BaseSettings):
    """The audit trail's authentication key, shared by its writers (console, CLI, workers)
    and the sink that stores only records carrying its code."""

    model_config = SettingsConfigDict(
        env_prefix="MEDSTREAM_AUDIT_", extra="ignore", populate_by_name=True
    )

    key: SecretStr = Field(
        default=SecretStr(""),
        description="HMAC key of audit records (at least 32 random characters, the same on "
        "the console, the CLI hosts, the workers and the sink); empty = the data directory's "
        "keys/audit.key, created by `medstream up`",
    )


class RuntimeSettings(BaseSettings):
    """Where the embedded runtime keeps its data and publishes its endpoints."""

    model_config = _PREFIXED

    data_dir: Path = Field(default=Path(".medstream"), description="embedded data directory")
    embedded_broker: Literal["auto", "kafka", "tansu"] = Field(
        default="auto",
        description="the broker `up` starts without KAFKA_BOOTSTRAP_SERVERS: kafka (Apache "
        "Kafka from Maven Central jars, data kept under the data dir), tansu (memory only, "
        "lost at every restart), auto (kafka when Java and the jars are present, else tansu)",
    )
    kafka_heap: str = Field(default="512m", description="JVM heap of the embedded Apache Kafka")
    metrics_port_base: int = Field(
        default=0, description="first /metrics port (0 = pick free ports)"
    )
    status_interval_s: float = Field(default=5.0, description="seconds between status lines")
    drain_timeout_s: float = Field(
        default=120.0,
        ge=0,
        description="on a graceful stop, how long `up` lets the workers and the sink store "
        "what the broker accepted before it stops them (and reports what is left)",
    )
    metrics_host: str = Field(
        default="127.0.0.1",
        description="address every /metrics endpoint listens on (0.0.0.0 in containers)",
    )
    collector_configs: str = Field(
        default="",
        description="comma-separated collector YAML files that `medstream up` runs",
    )

    def collector_paths(self) -> list[Path]:
        """The collector configuration files `medstream up` runs, in the order given."""
        return [Path(p.strip()) for p in self.collector_configs.split(",") if p.strip()]

    @property
    def runtime_file(self) -> Path:
        """The file a running `medstream up` writes its endpoints to."""
        return self.data_dir / "runtime.json"

    @property
    def query_token_file(self) -> Path:
        """The secret (owner-only) that every client of the query endpoint must send."""
        return self.data_dir / "query.token"

    @property
    def chdb_path(self) -> Path:
        """The embedded ClickHouse engine directory."""
        return self.data_dir / "clickhouse"


class ConsoleSettings(BaseSettings):
    """The alert console (web page and SQL endpoint) and the users who sign in to it."""

    model_config = SettingsConfigDict(
        env_prefix="MEDSTREAM_CONSOLE_", extra="ignore", populate_by_name=True
    )

    host: str = Field(default="127.0.0.1", description="address the console listens on")
    port: int = Field(default=8040, description="console port (0 = pick a free port)")
    users_file: Path | None = Field(
        default=None,
        description="users file (YAML, bcrypt hashes) managed by `medstream users`; "
        "empty = users.yaml in the data dir",
    )
    session_idle_minutes: float = Field(
        default=30, description="a session ends after this long without a request"
    )
    session_max_hours: float = Field(
        default=12, description="a session ends this long after sign-in, active or not"
    )
    secure_cookies: bool = Field(
        default=False, description="mark the session cookie Secure (set when served over HTTPS)"
    )
    public_origin: str = Field(
        default="",
        description="the console's address as browsers see it (e.g. https://alerts.example.org)"
        "; empty = the request's own scheme and host",
    )
    trusted_proxy: bool = Field(
        default=False,
        description="behind a reverse proxy: take the client address and scheme from "
        "X-Forwarded-For and X-Forwarded-Proto",
    )
    sql_max_rows: int = Field(default=100_000, description="rows one SQL endpoint query returns")
    sql_timeout_s: int = Field(default=60, description="max execution time of one SQL query")
    action_answer_s: float = Field(
        default=10.0, gt=0,
        description="seconds an acknowledge or resolve waits for the stream workers' answer "
        "before the page shows it as not confirmed",
    )

    @field_validator("users_file", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return None if value == "" else value

    def users_path(self, runtime: RuntimeSettings) -> Path:
        """The users file in effect."""
        return self.users_file or runtime.data_dir / "users.yaml"


def clickhouse_url(ch: ClickHouseSettings, runtime: RuntimeSettings) -> str:
    """The effective ClickHouse URL: the configured one or the embedded chdb path."""
    return ch.url or f"chdb://{runtime.chdb_path.resolve()}"


#: Every settings model, in the order `medstream settings` lists them.
SETTINGS_MODELS: tuple[type[BaseSettings], ...] = (
    KafkaSettings,
    ClickHouseSettings,
    RegistrySettings,
    StreamSettings,
    SinkSettings,
    AuditSettings,
    RuntimeSettings,
    ConsoleSettings,
)


def environment_variables(model: type[BaseSettings]) -> dict[str, list[str]]:
    """Each field of ``model`` -> the environment variables that set it (the first is the
    one to document; the others are accepted aliases)."""
    prefix = model.model_config.get("env_prefix", "")
    names: dict[str, list[str]] = {}
    for name, info in model.model_fields.items():
        alias = info.validation_alias
        if isinstance(alias, AliasChoices):
            names[name] = [str(choice) for choice in alias.choices]
        else:
            names[name] = [f"{prefix}{name}".upper()]
    return names
