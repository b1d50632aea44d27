-- medstream 0006: the analysts' side. data_dictionary: every field of every Avro contract
-- (type, meaning, sensitivity), refreshed from schemas/ by the sink and `medstream migrate`.
-- monitoring_minute: events, dead letters and opened alerts per minute of arrival, per
-- organisation and event type (distinct ids, so a redelivered batch does not count twice).
-- A refreshable materialised view recomputes, every 30 seconds, each minute that received
-- newly stored rows: off the sink's insert path (views triggered by every insert doubled
-- the embedded engine's cost per insert and the alert latency with it). Refreshable views
-- with APPEND need ClickHouse 24.10 or later (chdb embeds 26.x; deploy/ pins 25.3 LTS).
CREATE TABLE IF NOT EXISTS {db}.data_dictionary
(
    subject LowCardinality(String),
    version UInt16,
    schema_id UInt32,
    record_kind LowCardinality(String),
    clickhouse_table LowCardinality(String),
    field String,
    type String,
    sensitivity LowCardinality(String),
    meaning String,
    loaded_time DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(loaded_time)
ORDER BY (subject, version, field);

CREATE TABLE IF NOT EXISTS {db}.monitoring_minute
(
    minute DateTime('UTC'),
    organisation_id LowCardinality(String),
    event_type LowCardinality(String),
    count UInt64,
    computed_time DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree(computed_time)
ORDER BY (organisation_id, event_type, minute);

-- Every source of the figures, as (ingest_time, stored_time, organisation, type, id).
CREATE VIEW IF NOT EXISTS {db}.monitoring_sources AS
    SELECT ingest_time, stored_time, organisation_id, 'lab_result' AS event_type, event_id AS id
    FROM {db}.lab_result
    UNION ALL
    SELECT ingest_time, stored_time, organisation_id, 'observation' AS event_type, event_id AS id
    FROM {db}.observation
    UNION ALL
    SELECT ingest_time, stored_time, organisation_id, 'diagnosis' AS event_type, event_id AS id
    FROM {db}.diagnosis
    UNION ALL
    SELECT ingest_time, stored_time, organisation_id, 'encounter' AS event_type, event_id AS id
    FROM {db}.encounter
    UNION ALL
    SELECT ingest_time, stored_time, organisation_id, 'claim_line' AS event_type, event_id AS id
    FROM {db}.claim_line
    UNION ALL
    SELECT ingest_time, stored_time, ifNull(organisation_id, ''), 'dead_letter', dlq_id
    FROM {db}.dead_letter
    UNION ALL
    SELECT ingest_time, stored_time, organisation_id, 'alert_opened', alert_id
    FROM {db}.alert_history WHERE action = 'opened';

-- Back-fill what was stored before the refresh existed.
INSERT INTO {db}.monitoring_minute
SELECT toStartOfMinute(ingest_time) AS minute, organisation_id, event_type, uniqExact(id),
       now64(3)
FROM {db}.monitoring_sources
GROUP BY minute, organisation_id, event_type;

-- The refresh reads only recent rows: min-max indexes on stored_time and ingest_time let it
-- skip every granule outside the minutes it recomputes (no sort key holds these times).
ALTER TABLE {db}.lab_result ADD INDEX IF NOT EXISTS stored_time_minmax stored_time TYPE minmax GRANULARITY 1;
ALTER TABLE {db}.lab_result ADD INDEX IF NOT EXISTS ingest_time_minmax ingest_time TYPE minmax GRANULARITY 1;
ALTER TABLE {db}.lab_result MATERIALIZE INDEX stored_time_minmax;
ALTER TABLE {db}.lab_result MATERIALIZE INDEX ingest_time_minmax;
ALTER TABLE {db}.observation ADD INDEX IF NOT EXISTS stored_time_minmax stored_time TYPE minmax GRANULARITY 1;
ALTER TABLE {db}.observation ADD INDEX IF NOT EXISTS ingest_time_minmax ingest_time TYPE minmax GRANULARITY 1;
ALTER TABLE {db}.observation MATERIALIZE INDEX stored_time_minmax;
ALTER TABLE {db}.observation MATERIALIZE INDEX ingest_time_minmax;
ALTER TABLE {db}.diagnosis ADD INDEX IF NOT EXISTS stored_time_minmax stored_time TYPE minmax GRANULARITY 1;
ALTER TABLE {db}.diagnosis ADD INDEX IF NOT EXISTS ingest_time_minmax ingest_time TYPE minmax GRANULARITY 1;
ALTER TABLE {db}.diagnosis MATERIALIZE INDEX stored_time_minmax;
ALTER TABLE {db}.diagnosis MATERIALIZE INDEX ingest_time_minmax;
ALTER TABLE {db}.encounter ADD INDEX IF NOT EXISTS stored_time_minmax stored_time TYPE minmax GRANULARITY 1;
ALTER TABLE {db}.encounter ADD INDEX IF NOT EXISTS ingest_time_minmax ingest_time TYPE minmax GRANULARITY 1;
ALTER TABLE {db}.encounter MATERIALIZE INDEX stored_time_minmax;
ALTER TABLE {db}.encounter MATERIALIZE INDEX ingest_time_minmax;
ALTER TABLE {db}.claim_line ADD INDEX IF NOT EXISTS stored_time_minmax stored_time TYPE minmax GRANULARITY 1;
ALTER TABLE {db}.claim_line ADD INDEX IF NOT EXISTS ingest_time_minmax ingest_time TYPE minmax GRANULARITY 1;
ALTER TABLE {db}.claim_line MATERIALIZE INDEX stored_time_minmax;
ALTER TABLE {db}.claim_line MATERIALIZE INDEX ingest_time_minmax;
ALTER TABLE {db}.dead_letter ADD INDEX IF NOT EXISTS stored_time_minmax stored_time TYPE minmax GRANULARITY 1;
ALTER TABLE {db}.dead_letter ADD INDEX IF NOT EXISTS ingest_time_minmax ingest_time TYPE minmax GRANULARITY 1;
ALTER TABLE {db}.dead_letter MATERIALIZE INDEX stored_time_minmax;
ALTER TABLE {db}.dead_letter MATERIALIZE INDEX ingest_time_minmax;
ALTER TABLE {db}.alert_history ADD INDEX IF NOT EXISTS stored_time_minmax stored_time TYPE minmax GRANULARITY 1;
ALTER TABLE {db}.alert_history ADD INDEX IF NOT EXISTS ingest_time_minmax ingest_time TYPE minmax GRANULARITY 1;
ALTER TABLE {db}.alert_history MATERIALIZE INDEX stored_time_minmax;
ALTER TABLE {db}.alert_history MATERIALIZE INDEX ingest_time_minmax;

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.monitoring_minute_refresh
REFRESH EVERY 30 SECOND APPEND TO {db}.monitoring_minute AS
SELECT toStartOfMinute(ingest_time) AS minute, organisation_id, event_type,
       uniqExact(id) AS count, now64(3) AS computed_time
FROM {db}.monitoring_sources
WHERE ingest_time >= (
        SELECT ifNull(toStartOfMinute(minOrNull(ingest_time)), toStartOfMinute(now()))
        FROM {db}.monitoring_sources WHERE stored_time >= now64(3) - INTERVAL 2 MINUTE
    )
    AND toStartOfMinute(ingest_time) IN (
        SELECT toStartOfMinute(ingest_time) FROM {db}.monitoring_sources
        WHERE stored_time >= now64(3) - INTERVAL 2 MINUTE
    )
GROUP BY minute, organisation_id, event_type;

-- The monitoring figures: per minute, organisation and event type (lab_result, observation,
-- diagnosis, encounter, claim_line, dead_letter, alert_opened), up to 30 s behind.
CREATE VIEW IF NOT EXISTS {db}.monitoring_per_minute AS
SELECT minute, organisation_id, event_type, count
FROM {db}.monitoring_minute FINAL;
