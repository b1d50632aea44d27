-- medstream 0007: the audit trail. One row per sign-in, query, alert action and
-- configuration change (topic `audit`, contract medstream.audit.AuditEvent). Append-only:
-- a plain MergeTree (a retried batch is dropped by its insert deduplication token), never
-- updated or deleted by medstream; on a server only the service role may insert into it
-- and only admins may read it (`medstream grants`).
CREATE TABLE IF NOT EXISTS {db}.audit_log
(
    audit_id String,
    event_time DateTime64(3, 'UTC'),
    actor LowCardinality(String),
    actor_role LowCardinality(String),
    channel LowCardinality(String),
    action LowCardinality(String),
    outcome LowCardinality(String),
    target String,
    detail String,
    rows Nullable(Int64),
    client_address String,
    stored_time DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(event_time)
ORDER BY (event_time, audit_id)
SETTINGS non_replicated_deduplication_window = 10000;
