-- medstream 0005: one person's history across hospitals ("one person, one file").
-- Every stored clinical event with the master person its patient record belonged to: now
-- (person_history), or at a chosen instant (person_history_at(at = '2026-11-24 08:00:00')),
-- following the link, merge and unmerge decisions of person_link. Events of records the
-- index has not seen yet (no demographics so far) have person = ''.
CREATE VIEW IF NOT EXISTS {db}.person_event AS
SELECT 'lab_result' AS kind, event_id, organisation_id, event_time, person_key AS record_key,
       loinc_code AS code, local_code, value, unit, mapping_status
FROM {db}.lab_result FINAL
UNION ALL
SELECT 'observation', event_id, organisation_id, event_time, person_key, metric_code,
       local_code, value, unit, mapping_status
FROM {db}.observation FINAL
UNION ALL
SELECT 'diagnosis', event_id, organisation_id, event_time, person_key, icd10_code, local_code,
       CAST(NULL AS Nullable(Float64)), CAST(NULL AS Nullable(String)), mapping_status
FROM {db}.diagnosis FINAL
UNION ALL
SELECT 'encounter', event_id, organisation_id, event_time, person_key, department_code,
       department_local, CAST(NULL AS Nullable(Float64)), CAST(NULL AS Nullable(String)),
       mapping_status
FROM {db}.encounter FINAL
UNION ALL
SELECT 'claim_line', event_id, organisation_id, event_time, person_key, item_code,
       local_item_code, amount, CAST('CNY' AS Nullable(String)), mapping_status
FROM {db}.claim_line FINAL;

CREATE VIEW IF NOT EXISTS {db}.person_history AS
SELECT ifNull(who.person_key, '') AS person, evt.*
FROM {db}.person_event AS evt
LEFT JOIN {db}.person_membership AS who ON who.record_key = ifNull(evt.record_key, '');

CREATE VIEW IF NOT EXISTS {db}.person_history_at AS
SELECT ifNull(who.person_key, '') AS person, evt.*
FROM {db}.person_event AS evt
LEFT JOIN (
    SELECT record_key,
           argMax(person_key, (effective_time, decided_time, link_event_id)) AS person_key
    FROM {db}.person_link FINAL
    WHERE action != 'review' AND effective_time <= {at:DateTime64(3, 'UTC')}
    GROUP BY record_key
) AS who ON who.record_key = ifNull(evt.record_key, '');
