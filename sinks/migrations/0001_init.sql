-- medstream 0001: fact tables, alerts, dead letters, lineage and the raw ledger.
-- Applied idempotently by `medstream migrate` (and at sink start); {db} is the database.
-- Every table is a ReplacingMergeTree on a natural key, so a row written twice (a
-- redelivered source message, or a batch re-sent by a sink restarted after a crash)
-- collapses: query with FINAL for exact counts. Insert deduplication tokens additionally
-- drop a retried batch at insert time. Sort keys follow the analysts'
-- common queries: organisation, day, person, then the event.

CREATE TABLE IF NOT EXISTS {db}.lab_result
(
    event_id String,
    source_kind LowCardinality(String),
    source_system LowCardinality(String),
    organisation_id LowCardinality(String),
    event_time DateTime64(3, 'UTC'),
    ingest_time DateTime64(3, 'UTC'),
    normalised_time DateTime64(3, 'UTC'),
    stored_time DateTime64(3, 'UTC') DEFAULT now64(3),
    source_topic LowCardinality(String),
    source_partition Int32,
    source_offset Int64,
    record_index Int32,
    record_count Int32,
    source_ref String,
    mapping_version LowCardinality(String),
    person_key Nullable(String),
    order_id String,
    loinc_code LowCardinality(Nullable(String)),
    local_code String,
    local_display String,
    value Nullable(Float64),
    value_text Nullable(String),
    unit LowCardinality(Nullable(String)),
    original_value Nullable(String),
    original_unit Nullable(String),
    abnormal_flag LowCardinality(Nullable(String)),
    result_status LowCardinality(Nullable(String)),
    specimen_status LowCardinality(Nullable(String)),
    mapping_status LowCardinality(String),
    reference_low Nullable(Float64),
    reference_high Nullable(Float64)
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(event_time)
ORDER BY (organisation_id, toDate(event_time), ifNull(person_key, ''), event_id)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE TABLE IF NOT EXISTS {db}.observation
(
    event_id String,
    source_kind LowCardinality(String),
    source_system LowCardinality(String),
    organisation_id LowCardinality(String),
    event_time DateTime64(3, 'UTC'),
    ingest_time DateTime64(3, 'UTC'),
    normalised_time DateTime64(3, 'UTC'),
    stored_time DateTime64(3, 'UTC') DEFAULT now64(3),
    source_topic LowCardinality(String),
    source_partition Int32,
    source_offset Int64,
    record_index Int32,
    record_count Int32,
    source_ref String,
    mapping_version LowCardinality(String),
    person_key Nullable(String),
    device_id String,
    device_type LowCardinality(String),
    metric_code LowCardinality(Nullable(String)),
    local_code String,
    value Nullable(Float64),
    unit LowCardinality(Nullable(String)),
    original_unit String,
    mapping_status LowCardinality(String)
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(event_time)
ORDER BY (organisation_id, toDate(event_time), ifNull(person_key, ''), event_id)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE TABLE IF NOT EXISTS {db}.claim_line
(
    event_id String,
    source_kind LowCardinality(String),
    source_system LowCardinality(String),
    organisation_id LowCardinality(String),
    event_time DateTime64(3, 'UTC'),
    ingest_time DateTime64(3, 'UTC'),
    normalised_time DateTime64(3, 'UTC'),
    stored_time DateTime64(3, 'UTC') DEFAULT now64(3),
    source_topic LowCardinality(String),
    source_partition Int32,
    source_offset Int64,
    record_index Int32,
    record_count Int32,
    source_ref String,
    mapping_version LowCardinality(String),
    person_key Nullable(String),
    claim_id String,
    payer_id LowCardinality(String),
    line_no Int32,
    item_code LowCardinality(Nullable(String)),
    local_item_code String,
    item_display String,
    quantity Float64,
    unit_price Float64,
    amount Float64,
    service_date Date,
    diagnosis_codes Array(String),
    mapping_status LowCardinality(String)
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(event_time)
ORDER BY (organisation_id, toDate(event_time), ifNull(person_key, ''), event_id)
SETTINGS non_replicated_deduplication_window = 10000;

-- Encounter and diagnosis state: a later source version of the same row replaces an
-- earlier one; deletes are kept as tombstones (is_deleted) that FINAL hides. No partition
-- key, so a row's versions always meet in one partition.
CREATE TABLE IF NOT EXISTS {db}.encounter
(
    event_id String,
    source_kind LowCardinality(String),
    source_system LowCardinality(String),
    organisation_id LowCardinality(String),
    event_time DateTime64(3, 'UTC'),
    ingest_time DateTime64(3, 'UTC'),
    normalised_time DateTime64(3, 'UTC'),
    stored_time DateTime64(3, 'UTC') DEFAULT now64(3),
    source_topic LowCardinality(String),
    source_partition Int32,
    source_offset Int64,
    record_index Int32,
    record_count Int32,
    source_ref String,
    mapping_version LowCardinality(String),
    person_key Nullable(String),
    encounter_key String,
    op LowCardinality(String),
    is_deleted UInt8,
    version Int64,
    encounter_class LowCardinality(String),
    department_code LowCardinality(Nullable(String)),
    department_local String,
    admit_time DateTime64(3, 'UTC'),
    discharge_time Nullable(DateTime64(3, 'UTC')),
    birth_year Nullable(Int32),
    sex LowCardinality(Nullable(String)),
    mapping_status LowCardinality(String)
)
ENGINE = ReplacingMergeTree(version, is_deleted)
ORDER BY (organisation_id, encounter_key)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE TABLE IF NOT EXISTS {db}.diagnosis
(
    event_id String,
    source_kind LowCardinality(String),
    source_system LowCardinality(String),
    organisation_id LowCardinality(String),
    event_time DateTime64(3, 'UTC'),
    ingest_time DateTime64(3, 'UTC'),
    normalised_time DateTime64(3, 'UTC'),
    stored_time DateTime64(3, 'UTC') DEFAULT now64(3),
    source_topic LowCardinality(String),
    source_partition Int32,
    source_offset Int64,
    record_index Int32,
    record_count Int32,
    source_ref String,
    mapping_version LowCardinality(String),
    person_key Nullable(String),
    encounter_key String,
    diagnosis_key String,
    op LowCardinality(String),
    is_deleted UInt8,
    version Int64,
    icd10_code LowCardinality(Nullable(String)),
    local_code String,
    local_display String,
    diagnosis_type LowCardinality(String),
    mapping_status LowCardinality(String)
)
ENGINE = ReplacingMergeTree(version, is_deleted)
ORDER BY (organisation_id, diagnosis_key)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE TABLE IF NOT EXISTS {db}.alert
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
    mapping_version LowCardinality(String)
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(event_time)
ORDER BY (organisation_id, toDate(event_time), alert_id)
SETTINGS non_replicated_deduplication_window = 10000;

-- The dead-letter store keeps the original bytes: access to it is restricted.
CREATE TABLE IF NOT EXISTS {db}.dead_letter
(
    dlq_id String,
    stage LowCardinality(String),
    reason_code LowCardinality(String),
    reason String,
    source_kind LowCardinality(Nullable(String)),
    organisation_id LowCardinality(Nullable(String)),
    original_topic LowCardinality(String),
    original_partition Int32,
    original_offset Int64,
    record_index Nullable(Int32),
    record_count Nullable(Int32),
    original_key Nullable(String),
    original_value String,
    ingest_time DateTime64(3, 'UTC'),
    failed_time DateTime64(3, 'UTC'),
    stored_time DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
ORDER BY (stage, original_topic, dlq_id)
SETTINGS non_replicated_deduplication_window = 10000;

-- Positions are qualified by the Kafka cluster id: an embedded broker starts empty, its
-- offsets restart at 0, and each start has its own cluster id.
-- Lineage: one row per outcome of one raw record (stored event or dead letter), so
-- reconcile can account for every record of every raw message. Unlike the fact tables it
-- keeps both copies of a redelivered source message (their raw positions differ).
CREATE TABLE IF NOT EXISTS {db}.lineage
(
    kafka_cluster LowCardinality(String),
    source_topic LowCardinality(String),
    source_partition Int32,
    source_offset Int64,
    record_index Int32,
    record_count Int32,
    event_id String,
    outcome LowCardinality(String),
    ingest_time DateTime64(3, 'UTC'),
    stored_time DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
ORDER BY (kafka_cluster, source_topic, source_partition, source_offset, record_index, event_id)
SETTINGS non_replicated_deduplication_window = 10000;

-- Raw ledger: one row per raw record seen on a raw.* topic (no payload): what was published.
CREATE TABLE IF NOT EXISTS {db}.raw_ledger
(
    kafka_cluster LowCardinality(String),
    source_kind LowCardinality(String),
    source_topic LowCardinality(String),
    source_partition Int32,
    source_offset Int64,
    ingest_time DateTime64(3, 'UTC'),
    value_bytes UInt32,
    stored_time DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
ORDER BY (kafka_cluster, source_topic, source_partition, source_offset)
SETTINGS non_replicated_deduplication_window = 10000;
