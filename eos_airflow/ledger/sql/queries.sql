-- Named queries of the ledger. eos_airflow/ledger/queries.py is their only loader; each block
-- starts with "-- name: NAME". {schema} is the quoted ledger schema; values are parameters.

-- name: claim
SELECT action, prior_state::text AS prior_state, attempt, version, result, holder, committed_at
FROM {schema}.claim(%(key)s, %(owner)s, %(attempt)s, %(dag_id)s, %(task_id)s, %(run_id)s,
                    %(map_index)s, %(host)s, %(pid)s, %(on_committed)s);

-- name: commit
SELECT version, committed_at FROM {schema}.commit(%(key)s, %(owner)s, %(result)s);

-- name: release
SELECT {schema}.release(%(key)s, %(owner)s, %(attempt)s, %(event)s, %(detail)s);

-- name: wait_for_owner
-- Blocks (up to lock_timeout) until the holder's session lock is released.
SELECT pg_advisory_xact_lock_shared({schema}.lock_id(%(key)s, %(holder)s));

-- name: schema_revision
SELECT version_num FROM {schema}.alembic_version;

-- name: list_entries
SELECT key, state::text AS state, attempt, version, dag_id, task_id, run_id, map_index, host,
       claimed_at, committed_at, updated_at, event_seq, result
FROM {schema}.ledger
WHERE (%(dag_id)s::text IS NULL OR dag_id = %(dag_id)s)
  AND (%(state)s::text IS NULL OR state::text = %(state)s)
  AND (%(prefix)s::text IS NULL OR key LIKE %(prefix)s ESCAPE '\')
ORDER BY key
LIMIT %(limit)s;

-- name: get_entry
SELECT key, state::text AS state, attempt, owner, version, dag_id, task_id, run_id, map_index,
       host, pid, result, claimed_at, committed_at, updated_at, event_seq, last_hash
FROM {schema}.ledger WHERE key = %(key)s;

-- name: entry_events
SELECT id, key, seq, event::text AS event, attempt, at, detail, prev_hash, hash
FROM {schema}.ledger_events WHERE key = %(key)s ORDER BY seq;

-- name: chain_events
-- Everything `verify` hashes, in chain order; detail as PostgreSQL's canonical jsonb text.
SELECT id, key, seq, event::text AS event, attempt, at, detail::text AS detail, prev_hash, hash
FROM {schema}.ledger_events ORDER BY key, seq;

-- name: chain_heads
SELECT key, event_seq, last_hash FROM {schema}.ledger ORDER BY key;
