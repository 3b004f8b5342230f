-- `auditbridge_without` (0013) raised an error for a pointer that goes through an array with a
-- step that is not an index (`#-` refuses it), and a producer chooses the pointers' other
-- side: a re-send shaped so held its batch for ever. A pointer that does not resolve in `doc`
-- now removes nothing.
CREATE OR REPLACE FUNCTION auditbridge_without(doc jsonb, pointers text[])
RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p text;
    parts text[];
    node jsonb;
    step text;
    resolves boolean;
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
        -- Walk the path first: every step must exist, array steps must be indexes.
        node := doc;
        resolves := true;
        FOREACH step IN ARRAY parts LOOP
            IF jsonb_typeof(node) = 'object' AND node ? step THEN
                node := node -> step;
            ELSIF jsonb_typeof(node) = 'array' AND step ~ '^[0-9]{1,9}$'
                  AND step::int < jsonb_array_length(node) THEN
                node := node -> step::int;
            ELSE
                resolves := false;
                EXIT;
            END IF;
        END LOOP;
        IF resolves THEN
            doc := doc #- parts;
        END IF;
    END LOOP;
    RETURN doc;
END
$$;
