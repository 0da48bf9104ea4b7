-- Named queries of chunked effects and source offsets (functions of schema revision 0004).
-- eos_airflow/ledger/queries.py loads them; {schema} is the quoted ledger schema.

-- name: checkpoint
SELECT seq, at FROM {schema}.checkpoint(%(key)s, %(owner)s, %(rows)s, %(position)s,
                                        %(state)s, %(detail)s);

-- name: resume
SELECT point_seq AS seq, point_rows AS rows, point_position AS position, point_state AS state,
       point_attempt AS attempt
FROM {schema}.resume(%(key)s, %(owner)s);

-- name: has_recovery_point
-- Unlocked look-up: does the version being written have a recovery point? (If so, resume()
-- locks the key and records the resumption.)
SELECT EXISTS (
    SELECT 1 FROM {schema}.recovery_points AS rp JOIN {schema}.ledger AS l ON l.key = rp.key
    WHERE rp.key = %(key)s AND rp.version = l.version + 1
) AS found;

-- name: recovery_points
SELECT version, seq, attempt, rows, position, state, at
FROM {schema}.recovery_points WHERE key = %(key)s ORDER BY version, seq;

-- name: get_offset
-- The committed position, read under the source's lock: effects on one source serialise
-- until the reading transaction ends.
SELECT committed_position AS position FROM {schema}.offset_position(%(source)s);

-- name: advance_offsets
SELECT {schema}.advance_offsets(%(key)s, %(owner)s, %(positions)s) AS moves;
