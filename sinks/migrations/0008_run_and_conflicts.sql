-- medstream 0008: evidence for reconciliation.
-- The raw ledger names the publisher run of each raw record (its medstream-run Kafka
-- header: a simulator run, a collector process; '' when absent), so a run's ground truth
-- is checked against that run's rows only.
-- Each lineage row of a stored event keeps a fingerprint of the event's content (without
-- delivery and processing fields) and whether the source declared it an update or
-- correction (CDC op u/d, HL7 result status C/D): the same event id arriving again with
-- another fingerprint, not declared an update, is a conflict `medstream reconcile` reports.
ALTER TABLE {db}.raw_ledger ADD COLUMN IF NOT EXISTS run_id LowCardinality(String) DEFAULT '' AFTER collector;
ALTER TABLE {db}.lineage ADD COLUMN IF NOT EXISTS content_hash String DEFAULT '' AFTER outcome;
ALTER TABLE {db}.lineage ADD COLUMN IF NOT EXISTS declared_update UInt8 DEFAULT 0 AFTER content_hash;
