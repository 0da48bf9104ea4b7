-- Named queries of effects across several databases (run by LedgerStore, ledger/store.py,
-- for protocol/twophase.py and recovery.py). {schema} is the quoted ledger schema; values are
-- parameters.

-- name: twophase_claim
SELECT action, prior_state, attempt, version, result, holder, committed_at, others
FROM {schema}.twophase_claim(%(key)s, %(owner)s, %(attempt)s, %(dag_id)s, %(task_id)s,
                             %(run_id)s, %(map_index)s, %(host)s, %(pid)s, %(on_committed)s,
                             %(txid)s, %(protocol)s, %(participants)s);

-- name: twophase_decide
SELECT version, committed_at FROM {schema}.twophase_decide(%(txid)s, %(key)s, %(owner)s,
                                                           %(result)s, %(detail)s,
                                                           %(fingerprint)s);

-- name: twophase_abort
SELECT {schema}.twophase_abort(%(txid)s, %(attempt)s, %(by)s, %(reason)s) AS decision;

-- name: twophase_resolved
SELECT {schema}.twophase_resolved(%(txid)s, %(outcome)s, %(by)s, %(result)s) AS outcome;

-- name: twophase_get
SELECT txid, key, attempt, owner, protocol, decision, outcome, participants, created_at
FROM {schema}.twophase WHERE txid = %(txid)s;

-- name: twophase_unresolved
SELECT txid, key, attempt, owner, protocol, decision, outcome, participants, created_at
FROM {schema}.twophase WHERE outcome IS NULL ORDER BY created_at;

-- name: owner_alive
-- Does the attempt with this owner token still live (its session holds the claim's lock)?
SELECT {schema}.owner_alive(%(key)s, %(owner)s) AS alive;

-- name: twophase_key_entry
SELECT state::text AS state, result, version, committed_at FROM {schema}.ledger
WHERE key = %(key)s;

-- name: precommit_vote
-- Write a three-phase vote unless one exists; return the vote in force. (When another
-- session's vote commits while this one waits, none is returned: the caller reads again.)
SELECT state, result FROM {schema}.precommit_vote(%(txid)s, %(key)s, %(attempt)s, %(state)s,
                                                  %(participants)s::jsonb, %(result)s::jsonb);

-- name: precommit_get
SELECT txid, key, attempt, state, participants, result FROM {schema}.precommits
WHERE txid = ANY(%(txids)s::text[]);

-- name: twophase_unresolved_key
-- The key's unfinished transactions that a run which skips the key may finish: decided ones,
-- and undecided ones whose attempt is gone. Another run's live attempt (a replace in
-- progress) is left to finish its own.
SELECT txid, protocol, decision, participants, attempt
FROM {schema}.twophase AS t
WHERE t.key = %(key)s AND t.outcome IS NULL
  AND (t.decision IS NOT NULL OR NOT {schema}.owner_alive(t.key, t.owner))
ORDER BY t.created_at;

-- name: twophase_forget
-- The attempt found its key committed by an earlier transaction before it prepared anything:
-- its own txid never had a participant, so it leaves no row (a forgotten txid cannot decide).
SELECT {schema}.twophase_forget(%(txid)s, %(owner)s);

-- name: precommit_check
-- Three-phase commit needs the vote table in every participant: fails before anything runs.
SELECT 1 FROM {schema}.precommits LIMIT 0;

-- name: doctor_in_doubt
-- Prepared transactions of eos-airflow in this database older than a minute: in doubt.
SELECT count(*) AS count FROM pg_prepared_xacts
WHERE database = current_database() AND starts_with(gid, 'eos:')
  AND prepared < now() - interval '60 seconds';

-- name: twophase_abandoned
-- Can this transaction's attempt never decide it, so that another run may abort it now? Yes
-- when it is decided already (the decision is finished as it is), when the log has no row for
-- it (nobody can decide a txid without one), when its attempt's session is gone, or when its
-- attempt no longer owns the key (the decision needs the ledger row's owner). Each of these
-- stays true once it is, so no lock needs to be held between this check and the abort.
-- A live attempt that still owns the key -- a newer try that claimed it meanwhile, a replace in
-- progress -- is left to decide or abort its own transaction.
SELECT t.txid IS NULL OR t.decision IS NOT NULL
       OR NOT {schema}.owner_alive(t.key, t.owner)
       OR l.owner IS DISTINCT FROM t.owner AS abandoned,
       t.decision
FROM (SELECT %(txid)s::text COLLATE "C" AS txid) AS q
LEFT JOIN {schema}.twophase AS t ON t.txid = q.txid
LEFT JOIN {schema}.ledger AS l ON l.key = t.key;

-- name: twophase_known_participants
-- The participants named in the decision log with an Airflow connection id: where `recover`
-- looks for prepared transactions that the log no longer lists as unfinished.
SELECT DISTINCT p.key AS name, p.value->>'conn_id' AS conn_id
FROM {schema}.twophase AS t, jsonb_each(t.participants) AS p
WHERE jsonb_typeof(p.value) = 'object' AND p.value->>'conn_id' IS NOT NULL
ORDER BY 1, 2;
