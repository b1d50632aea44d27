-- medstream 0002: the raw ledger names the edge collector that published each raw record
-- (from the record's medstream-collector Kafka header; '' for records without one, such
-- as the simulator's), so `medstream reconcile` can account per collector.
ALTER TABLE {db}.raw_ledger ADD COLUMN IF NOT EXISTS collector LowCardinality(String) DEFAULT '' AFTER source_kind;
