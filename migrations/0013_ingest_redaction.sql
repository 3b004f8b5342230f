-- Ingest redaction (`[[redact]]` / AUDITBRIDGE_REDACT, issue 13): the worker redacts values
-- that must never be stored before it stores an event, and records beside the event (not in
-- its body) which paths it redacted and the rule set's version:
-- {"rules": "<16 hex digits>", "paths": ["/metadata/password", ...]}. NULL: nothing was
-- redacted. Adding a nullable column without a default rewrites nothing.
ALTER TABLE audit_events ADD COLUMN redaction jsonb;

-- `doc` without the values at `pointers` (JSON pointers, RFC 6901). A re-sent event is
-- compared with the stored one without the paths either side redacted, so a redelivery after
-- a rule change is a duplicate, not a conflict (crates/store/src/persist.rs, COMPARE_STORED).
CREATE FUNCTION auditbridge_without(doc jsonb, pointers text[])
RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p text;
    parts text[];
BEGIN
    IF doc IS NULL OR pointers IS NULL THEN
        RETURN doc;
    END IF;
    FOREACH p IN ARRAY pointers LOOP
        CONTINUE WHEN p IS NULL OR left(p, 1) <> '/';
        parts := ARRAY(
            SELECT replace(replace(t, '~1', '/'), '~0', '~')
            FROM unnest(string_to_array(substr(p, 2), '/')) WITH ORDINALITY AS u(t, n)
            ORDER BY n);
        doc := doc #- parts;
    END LOOP;
    RETURN doc;
END
$$;
