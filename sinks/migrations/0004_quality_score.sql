-- medstream 0004: the daily data quality score per source.
-- events   = events stored that day (fact tables) + events dead-lettered for a quality error
-- errors   = events with at least one error issue (they were dead-lettered)
-- warnings = events with warning issues and no error issue
-- score    = max(0, 1 - (1.0 * errors + 0.25 * warnings) / events), 1.0 without events:
--            the formula and weights of streams/rules/quality.yaml (streams.quality.quality_score).
CREATE VIEW IF NOT EXISTS {db}.quality_daily_score AS
WITH
    stored AS (
        SELECT toDate(event_time) AS day, organisation_id, source_kind, source_system,
               uniqExact(event_id) AS stored_events
        FROM (
            SELECT event_id, event_time, organisation_id, source_kind, source_system FROM {db}.lab_result
            UNION ALL
            SELECT event_id, event_time, organisation_id, source_kind, source_system FROM {db}.observation
            UNION ALL
            SELECT event_id, event_time, organisation_id, source_kind, source_system FROM {db}.claim_line
            UNION ALL
            SELECT event_id, event_time, organisation_id, source_kind, source_system FROM {db}.encounter
            UNION ALL
            SELECT event_id, event_time, organisation_id, source_kind, source_system FROM {db}.diagnosis
        )
        GROUP BY day, organisation_id, source_kind, source_system
    ),
    per_event AS (
        SELECT event_id, any(toDate(event_time)) AS day, any(organisation_id) AS organisation_id,
               any(source_kind) AS source_kind, any(source_system) AS source_system,
               max(severity = 'error') AS has_error, max(severity = 'warning') AS has_warning
        FROM {db}.quality_issue
        GROUP BY event_id
    ),
    issues AS (
        SELECT day, organisation_id, source_kind, source_system,
               countIf(has_error) AS errors, countIf(has_warning AND NOT has_error) AS warnings
        FROM per_event
        GROUP BY day, organisation_id, source_kind, source_system
    )
SELECT day, organisation_id, source_kind, source_system,
       stored_events + errors AS events, errors, warnings,
       if(events = 0, 1.0, greatest(0.0, 1.0 - (errors * 1.0 + warnings * 0.25) / events)) AS score
FROM stored
FULL OUTER JOIN issues USING (day, organisation_id, source_kind, source_system);
