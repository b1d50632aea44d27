-- medstream 0006: the analysts' side. data_dictionary: every field of every Avro contract
-- (type, meaning, sensitivity), refreshed from schemas/ by the sink and `medstream migrate`.
-- monitoring_minute: events, dead letters and opened alerts per minute of arrival, per
-- organisation and event type, kept by materialised views (exact under redelivery: the
-- counts are distinct ids) and back-filled here from what is already stored.
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
    items AggregateFunction(uniqExact, String)
)
ENGINE = AggregatingMergeTree
ORDER BY (organisation_id, event_type, minute);

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.monitoring_minute_lab_result TO {db}.monitoring_minute AS
SELECT toStartOfMinute(ingest_time) AS minute, organisation_id, 'lab_result' AS event_type,
       uniqExactState(event_id) AS items
FROM {db}.lab_result
GROUP BY minute, organisation_id;

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.monitoring_minute_observation TO {db}.monitoring_minute AS
SELECT toStartOfMinute(ingest_time) AS minute, organisation_id, 'observation' AS event_type,
       uniqExactState(event_id) AS items
FROM {db}.observation
GROUP BY minute, organisation_id;

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.monitoring_minute_diagnosis TO {db}.monitoring_minute AS
SELECT toStartOfMinute(ingest_time) AS minute, organisation_id, 'diagnosis' AS event_type,
       uniqExactState(event_id) AS items
FROM {db}.diagnosis
GROUP BY minute, organisation_id;

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.monitoring_minute_encounter TO {db}.monitoring_minute AS
SELECT toStartOfMinute(ingest_time) AS minute, organisation_id, 'encounter' AS event_type,
       uniqExactState(event_id) AS items
FROM {db}.encounter
GROUP BY minute, organisation_id;

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.monitoring_minute_claim_line TO {db}.monitoring_minute AS
SELECT toStartOfMinute(ingest_time) AS minute, organisation_id, 'claim_line' AS event_type,
       uniqExactState(event_id) AS items
FROM {db}.claim_line
GROUP BY minute, organisation_id;

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.monitoring_minute_dead_letter TO {db}.monitoring_minute AS
SELECT toStartOfMinute(ingest_time) AS minute, ifNull(organisation_id, '') AS organisation_id,
       'dead_letter' AS event_type, uniqExactState(dlq_id) AS items
FROM {db}.dead_letter
GROUP BY minute, organisation_id;

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.monitoring_minute_alert TO {db}.monitoring_minute AS
SELECT toStartOfMinute(ingest_time) AS minute, organisation_id, 'alert_opened' AS event_type,
       uniqExactState(alert_id) AS items
FROM {db}.alert_history
WHERE action = 'opened'
GROUP BY minute, organisation_id;

-- Back-fill what was stored before these views existed (one pass over every source).
INSERT INTO {db}.monitoring_minute
SELECT toStartOfMinute(ingest_time), organisation_id, event_type, uniqExactState(id)
FROM (
    SELECT ingest_time, organisation_id, 'lab_result' AS event_type, event_id AS id FROM {db}.lab_result
    UNION ALL
    SELECT ingest_time, organisation_id, 'observation' AS event_type, event_id AS id FROM {db}.observation
    UNION ALL
    SELECT ingest_time, organisation_id, 'diagnosis' AS event_type, event_id AS id FROM {db}.diagnosis
    UNION ALL
    SELECT ingest_time, organisation_id, 'encounter' AS event_type, event_id AS id FROM {db}.encounter
    UNION ALL
    SELECT ingest_time, organisation_id, 'claim_line' AS event_type, event_id AS id FROM {db}.claim_line
    UNION ALL
    SELECT ingest_time, ifNull(organisation_id, ''), 'dead_letter', dlq_id FROM {db}.dead_letter
    UNION ALL
    SELECT ingest_time, organisation_id, 'alert_opened', alert_id FROM {db}.alert_history
    WHERE action = 'opened'
)
GROUP BY toStartOfMinute(ingest_time), organisation_id, event_type;

-- The monitoring figures: per minute, organisation and event type (lab_result, observation,
-- diagnosis, encounter, claim_line, dead_letter, alert_opened).
CREATE VIEW IF NOT EXISTS {db}.monitoring_per_minute AS
SELECT minute, organisation_id, event_type, uniqExactMerge(items) AS count
FROM {db}.monitoring_minute
GROUP BY minute, organisation_id, event_type;
