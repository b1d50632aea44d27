-- medstream 0003: alert lifecycle, data quality facts, the master patient index links and
-- the terminology worklist; new columns for deaths (encounter) and claimed visits (claim_line).

ALTER TABLE {db}.encounter ADD COLUMN IF NOT EXISTS deceased_time Nullable(DateTime64(3, 'UTC')) AFTER mapping_status;
ALTER TABLE {db}.claim_line ADD COLUMN IF NOT EXISTS encounter_key Nullable(String) AFTER mapping_status;

-- Alert lifecycle. The alerts topic carries one full snapshot per transition (opened,
-- updated, acknowledged, escalated, resolved); alert_history keeps every one of them (a
-- redelivered or re-emitted transition collapses on its transition_id), alert_current the latest state
-- per alert (version updated_time), and the view `alert` replaces the former table of the
-- same name with that current state.
CREATE TABLE IF NOT EXISTS {db}.alert_history
(
    alert_id String,
    rule_id LowCardinality(String),
    rule_version LowCardinality(String),
    severity LowCardinality(String),
    organisation_id LowCardinality(String),
    person_key Nullable(String),
    event_time DateTime64(3, 'UTC'),
    ingest_time DateTime64(3, 'UTC'),
    detected_time DateTime64(3, 'UTC'),
    stored_time DateTime64(3, 'UTC') DEFAULT now64(3),
    triggering_event_ids Array(String),
    analyte_code LowCardinality(Nullable(String)),
    value Nullable(Float64),
    unit LowCardinality(Nullable(String)),
    explanation String,
    source_topic LowCardinality(String),
    source_partition Int32,
    source_offset Int64,
    mapping_version LowCardinality(String),
    subject String,
    status LowCardinality(String),
    action LowCardinality(String),
    actor String,
    note Nullable(String),
    transition_id String,
    updated_time DateTime64(3, 'UTC'),
    first_event_time DateTime64(3, 'UTC'),
    last_event_time DateTime64(3, 'UTC'),
    occurrences Int32,
    escalation_level Int32,
    details_json String
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(event_time)
ORDER BY (organisation_id, alert_id, transition_id)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE TABLE IF NOT EXISTS {db}.alert_current AS {db}.alert_history
ENGINE = ReplacingMergeTree(updated_time)
ORDER BY (organisation_id, alert_id);

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.alert_current_mv TO {db}.alert_current
AS SELECT * FROM {db}.alert_history;

-- Alerts stored before the lifecycle existed become opened alerts.
INSERT INTO {db}.alert_history
    (alert_id, rule_id, rule_version, severity, organisation_id, person_key, event_time,
     ingest_time, detected_time, stored_time, triggering_event_ids, analyte_code, value, unit,
     explanation, source_topic, source_partition, source_offset, mapping_version, subject,
     status, action, actor, note, transition_id, updated_time, first_event_time,
     last_event_time, occurrences, escalation_level, details_json)
SELECT alert_id, rule_id, rule_version, severity, organisation_id, person_key, event_time,
       ingest_time, detected_time, stored_time, triggering_event_ids, analyte_code, value, unit,
       explanation, source_topic, source_partition, source_offset, mapping_version, '',
       'open', 'opened', 'system', NULL, alert_id, detected_time, event_time, event_time, 1, 0,
       '{}'
FROM {db}.alert FINAL;

DROP TABLE IF EXISTS {db}.alert;

CREATE VIEW IF NOT EXISTS {db}.alert AS SELECT * FROM {db}.alert_current FINAL;

-- Data quality: one row per broken rule per event (errors were dead-lettered, warnings
-- were stored flagged).
CREATE TABLE IF NOT EXISTS {db}.quality_issue
(
    issue_id String,
    rule_id LowCardinality(String),
    rule_version LowCardinality(String),
    event_kind LowCardinality(String),
    event_id String,
    organisation_id LowCardinality(String),
    source_kind LowCardinality(String),
    source_system LowCardinality(String),
    field LowCardinality(Nullable(String)),
    category LowCardinality(String),
    severity LowCardinality(String),
    detail String,
    event_time DateTime64(3, 'UTC'),
    ingest_time DateTime64(3, 'UTC'),
    detected_time DateTime64(3, 'UTC'),
    stored_time DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(event_time)
ORDER BY (organisation_id, source_kind, toDate(event_time), issue_id)
SETTINGS non_replicated_deduplication_window = 10000;

-- Master patient index decisions. A record's person at time T is its latest link, merge
-- or unmerge with effective_time <= T (review decisions change nothing).
CREATE TABLE IF NOT EXISTS {db}.person_link
(
    link_event_id String,
    action LowCardinality(String),
    record_key String,
    person_key String,
    previous_person_key Nullable(String),
    method LowCardinality(String),
    score Nullable(Float64),
    threshold Nullable(Float64),
    explanation String,
    organisation_id LowCardinality(String),
    effective_time DateTime64(3, 'UTC'),
    triggering_event_id String,
    decided_time DateTime64(3, 'UTC'),
    stored_time DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
ORDER BY (record_key, effective_time, link_event_id)
SETTINGS non_replicated_deduplication_window = 10000;

-- Which person each patient record belongs to at a point in time:
--   SELECT * FROM person_membership_at(at = '2026-11-24 08:00:00')
CREATE VIEW IF NOT EXISTS {db}.person_membership_at AS
SELECT record_key,
       argMax(person_key, (effective_time, decided_time, link_event_id)) AS person_key,
       argMax(organisation_id, (effective_time, decided_time, link_event_id)) AS organisation_id,
       max(effective_time) AS since
FROM {db}.person_link FINAL
WHERE action != 'review' AND effective_time <= {at:DateTime64(3, 'UTC')}
GROUP BY record_key;

-- ... and now.
CREATE VIEW IF NOT EXISTS {db}.person_membership AS
SELECT record_key,
       argMax(person_key, (effective_time, decided_time, link_event_id)) AS person_key,
       argMax(organisation_id, (effective_time, decided_time, link_event_id)) AS organisation_id,
       max(effective_time) AS since
FROM {db}.person_link FINAL
WHERE action != 'review'
GROUP BY record_key;

-- Terminology gaps: every occurrence of an unmapped or ambiguous local code, and the data
-- steward's worklist aggregated from it per local code (a redelivered occurrence counts
-- once, by event id; the latest display text is shown).
CREATE TABLE IF NOT EXISTS {db}.terminology_unmapped
(
    event_id String,
    organisation_id LowCardinality(String),
    source_kind LowCardinality(String),
    source_system LowCardinality(String),
    code_system LowCardinality(String),
    local_code String,
    local_display String,
    status LowCardinality(String),
    event_time DateTime64(3, 'UTC'),
    ingest_time DateTime64(3, 'UTC'),
    mapping_version LowCardinality(String),
    candidate_codes Array(String),
    candidate_displays Array(String),
    candidate_scores Array(Float64),
    stored_time DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
ORDER BY (organisation_id, code_system, local_code, event_id)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE TABLE IF NOT EXISTS {db}.terminology_worklist
(
    organisation_id LowCardinality(String),
    code_system LowCardinality(String),
    local_code String,
    local_display SimpleAggregateFunction(anyLast, String),
    occurrences AggregateFunction(uniqExact, String),
    first_seen SimpleAggregateFunction(min, DateTime64(3, 'UTC')),
    last_seen SimpleAggregateFunction(max, DateTime64(3, 'UTC')),
    status SimpleAggregateFunction(anyLast, LowCardinality(String)),
    last_mapping_version SimpleAggregateFunction(anyLast, LowCardinality(String)),
    source_systems SimpleAggregateFunction(groupUniqArrayArray, Array(String)),
    candidate_codes SimpleAggregateFunction(anyLast, Array(String)),
    candidate_displays SimpleAggregateFunction(anyLast, Array(String)),
    candidate_scores SimpleAggregateFunction(anyLast, Array(Float64))
)
ENGINE = AggregatingMergeTree
ORDER BY (organisation_id, code_system, local_code);

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.terminology_worklist_mv TO {db}.terminology_worklist
AS SELECT organisation_id, code_system, local_code,
          anyLast(local_display) AS local_display,
          uniqExactState(event_id) AS occurrences,
          min(event_time) AS first_seen,
          max(event_time) AS last_seen,
          anyLast(status) AS status,
          anyLast(mapping_version) AS last_mapping_version,
          groupUniqArray(toString(source_system)) AS source_systems,
          anyLast(candidate_codes) AS candidate_codes,
          anyLast(candidate_displays) AS candidate_displays,
          anyLast(candidate_scores) AS candidate_scores
FROM {db}.terminology_unmapped
GROUP BY organisation_id, code_system, local_code;
