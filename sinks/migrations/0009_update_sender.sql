-- medstream 0009: who sent each stored copy of an event.
-- The lineage row of a stored event keeps the sending system the source named (HL7 MSH-3,
-- the CDC or device source system): a declared update (OBX-11 C/D, CDC u/d) that replaced
-- a copy sent by another system is reported by `medstream reconcile`, as a conflict is.
-- '' for rows stored before this migration (then unknown, not reported).
ALTER TABLE {db}.lineage ADD COLUMN IF NOT EXISTS sender String DEFAULT '' AFTER declared_update;
