-- Named queries of the ledger. eos_airflow/ledger/queries.py loads them, LedgerStore
-- (ledger/store.py) alone runs them; each block starts with "-- name: NAME". {schema} is the
-- quoted ledger schema; values are parameters.

-- name: claim
SELECT action, prior_state::text AS prior_state, attempt, version, result, holder, committed_at
FROM {schema}.claim(%(key)s, %(owner)s, %(attempt)s, %(dag_id)s, %(task_id)s, %(run_id)s,
                    %(map_index)s, %(host)s, %(pid)s, %(on_committed)s, %(detail)s);

-- name: commit
SELECT version, committed_at
FROM {schema}.commit(%(key)s, %(owner)s, %(result)s, %(detail)s, %(fingerprint)s);

-- The hot path's two round trips (protocol/local.py): each block is one simple-protocol
-- message, bound on the client. The statements run in order, each in its own transaction
-- unless BEGIN opened one; the first error skips the rest. A connection's first effect sends
-- the plain blocks; its second prepares the two calls (prepare_hot_path, in the same message
-- as the claim), and from then on the *_prepared_* blocks execute them without parsing or
-- planning them again.

-- name: claim_then_begin
-- The claim commits on its own (COMMIT), then the effect's transaction opens (BEGIN).
SELECT action, prior_state::text AS prior_state, attempt, version, result, holder, committed_at
FROM {schema}.claim(%(key)s, %(owner)s, %(attempt)s, %(dag_id)s, %(task_id)s, %(run_id)s,
                    %(map_index)s, %(host)s, %(pid)s, %(on_committed)s, %(detail)s);
COMMIT;
BEGIN;

-- name: commit_then_end
-- If commit() raises (fenced), COMMIT does not run and the transaction stays aborted.
SELECT version, committed_at
FROM {schema}.commit(%(key)s, %(owner)s, %(result)s, %(detail)s, %(fingerprint)s);
COMMIT;

-- name: prepare_hot_path
PREPARE {claim_statement} (text, uuid, integer, text, text, text, integer, text, integer, text,
                           jsonb) AS
SELECT action, prior_state::text AS prior_state, attempt, version, result, holder, committed_at
FROM {schema}.claim($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11);
PREPARE {commit_statement} (text, uuid, jsonb, jsonb, text) AS
SELECT version, committed_at FROM {schema}.commit($1, $2, $3, $4, $5);

-- name: claim_prepared_then_begin
EXECUTE {claim_statement}(%(key)s, %(owner)s, %(attempt)s, %(dag_id)s, %(task_id)s,
                          %(run_id)s, %(map_index)s, %(host)s, %(pid)s, %(on_committed)s,
                          %(detail)s);
COMMIT;
BEGIN;

-- name: commit_prepared_then_end
EXECUTE {commit_statement}(%(key)s, %(owner)s, %(result)s, %(detail)s, %(fingerprint)s);
COMMIT;

-- name: prepared_hot_path
SELECT name FROM pg_prepared_statements WHERE name = ANY(%(names)s);

-- name: check_fingerprint
SELECT matches, committed
FROM {schema}.check_fingerprint(%(key)s, %(version)s, %(fingerprint)s, %(attempt)s,
                                %(on_mismatch)s, %(detail)s);

-- name: announce
SELECT {schema}.announce(%(key)s, %(version)s, %(attempt)s, %(detail)s);

-- name: release
SELECT {schema}.release(%(key)s, %(owner)s, %(attempt)s, %(event)s, %(detail)s);

-- name: reopen
-- The actor is the session's role; on_behalf_of is recorded beside it (who asked).
SELECT version, attempt FROM {schema}.reopen(%(key)s, %(reason)s, %(on_behalf_of)s);

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
  -- --mismatched: a skip of the current version saw other inputs (schema revision 0013)
  AND (NOT %(mismatched)s OR EXISTS (
        SELECT 1 FROM {schema}.ledger_events AS e
        WHERE e.key = ledger.key AND e.event = 'mismatch'
          AND (e.detail->>'version')::integer = ledger.version))
ORDER BY key
LIMIT %(limit)s;

-- name: get_entry
SELECT l.key, l.state::text AS state, l.attempt, l.owner, l.version, l.dag_id, l.task_id,
       l.run_id, l.map_index, l.host, l.pid, l.result, l.claimed_at, l.committed_at,
       l.updated_at, l.event_seq, l.last_hash,
       CASE WHEN v.version = l.version THEN v.fingerprint END AS fingerprint,
       coalesce(v.announced, 0) AS announced
FROM {schema}.ledger AS l LEFT JOIN {schema}.versions AS v ON v.key = l.key
WHERE l.key = %(key)s;

-- name: entry_events
SELECT id, key, seq, event::text AS event, attempt, at, detail, prev_hash, hash
FROM {schema}.ledger_events WHERE key = %(key)s ORDER BY seq;

-- name: chain_events
-- Everything `verify` hashes, in chain order; detail as PostgreSQL's canonical jsonb text.
SELECT id, key, seq, event::text AS event, attempt, at, detail::text AS detail, prev_hash, hash
FROM {schema}.ledger_events ORDER BY key, seq;

-- name: chain_heads
SELECT key, event_seq, last_hash FROM {schema}.ledger ORDER BY key;

-- Waiting for committed effects (eos_airflow/ledger/watch.py, LedgerSensor, LedgerTrigger).
-- A waiter row makes commit() send NOTIFY {channel} with the key as payload; without one,
-- commit() sends nothing.

-- name: listen
LISTEN {channel};

-- name: register_waiters
SELECT {schema}.waiters_register(%(listener)s, %(keys)s::text[], %(is_prefix)s::boolean[],
                                 %(ttl)s);

-- name: unregister_waiters
SELECT {schema}.waiters_unregister(%(listener)s, %(keys)s::text[], %(is_prefix)s::boolean[]);

-- name: refresh_waiters
-- Keep this listener's rows alive, and drop rows of listeners that died without cleaning up.
SELECT {schema}.waiters_refresh(%(listener)s, %(ttl)s);

-- name: drop_listener
SELECT {schema}.waiters_drop(%(listener)s);

-- name: watch_keys
SELECT key, state::text AS state, result FROM {schema}.ledger WHERE key = ANY(%(keys)s::text[]);

-- name: watch_keys_locked
-- The first check after registering waiters: FOR SHARE waits for a commit() in flight on
-- these rows to finish, so a commit that ran before the registration is seen here.
SELECT key, state, result FROM {schema}.watch_lock(%(keys)s::text[]);

-- name: watch_prefix
-- Keys starting with the prefix, as an index range (C collation: byte order). A key that
-- continues the prefix with U+10FFFF (a noncharacter) is outside the range.
SELECT key, state::text AS state, result FROM {schema}.ledger
WHERE key >= %(prefix)s AND key < %(prefix)s || chr(1114111) AND starts_with(key, %(prefix)s);

-- name: watch_prefix_locked
SELECT key, state, result FROM {schema}.watch_prefix_lock(%(prefix)s);

-- name: commit_outcome
-- After a connection broke during COMMIT: waits (row lock) until the broken session's
-- transaction has ended, then returns its commit, or releases the claim under that lock so a
-- commit() of the broken session that had not locked the row yet is fenced.
SELECT version, committed_at
FROM {schema}.commit_outcome(%(key)s, %(owner)s, %(attempt)s, %(detail)s::jsonb);

-- name: fence_cause
-- Why an attempt lost the key (its commit raised EOS01): recovery released it (an expired
-- claim names its owner token; an aborted multi-database transaction its txid) and nobody
-- claimed the key since, or another attempt claimed it — the row's attempt is its try.
SELECT l.attempt, l.owner IS NULL AND l.attempt = %(attempt)s AND EXISTS (
    SELECT 1 FROM {schema}.ledger_events AS e
    WHERE e.key = %(key)s
      AND ((e.event = 'failed' AND e.detail->>'released_owner' = %(owner)s::text)
        OR (e.event = 'aborted' AND e.detail->>'txid' = %(txid)s::text))) AS released
FROM {schema}.ledger AS l WHERE l.key = %(key)s;
