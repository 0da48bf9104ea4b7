-- Schema revision 0005: effects across several databases (docs/twophase.md).
--
-- In the coordinator's ledger (`ledger_conn_id`), `twophase` is the decision log: one row
-- per global transaction (txid), written before anything is prepared (the participants, so
-- recovery can find them again) and decided in the same transaction as the key's ledger
-- commit. Presumed abort: a txid without a `commit` decision never commits.
-- In each participant's ledger, `precommits` holds the three-phase-commit votes: one row per
-- txid, `precommitted` or `aborted`, whichever is written first (its primary key decides).
-- (New enum values may be added inside the migration's transaction; they are only used by
-- the functions below when they run, after the migration committed.)

ALTER TYPE {schema}.event_kind ADD VALUE IF NOT EXISTS 'prepared';
ALTER TYPE {schema}.event_kind ADD VALUE IF NOT EXISTS 'decided';
ALTER TYPE {schema}.event_kind ADD VALUE IF NOT EXISTS 'aborted';
ALTER TYPE {schema}.event_kind ADD VALUE IF NOT EXISTS 'recovered';

CREATE TABLE {schema}.twophase (
    txid text COLLATE "C" PRIMARY KEY,
    key text COLLATE "C",
    attempt integer NOT NULL,
    owner uuid,
    protocol text NOT NULL CHECK (protocol IN ('2pc', '3pc')),
    participants jsonb NOT NULL,
    decision text CHECK (decision IN ('commit', 'abort')),
    outcome text CHECK (outcome IN ('committed', 'aborted')),
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    decided_at timestamptz,
    resolved_at timestamptz
);
COMMENT ON COLUMN {schema}.twophase.participants IS
    'name -> gid and conn_id: where each participant''s prepared transaction lives';
COMMENT ON COLUMN {schema}.twophase.decision IS
    'NULL while undecided (presumed abort), commit or abort';
COMMENT ON COLUMN {schema}.twophase.outcome IS
    'set once every participant finished: committed or aborted';
CREATE INDEX twophase_key_idx ON {schema}.twophase (key);
CREATE INDEX twophase_unresolved_idx ON {schema}.twophase (created_at) WHERE outcome IS NULL;

CREATE TABLE {schema}.precommits (
    txid text COLLATE "C" PRIMARY KEY,
    key text COLLATE "C",
    attempt integer NOT NULL,
    state text NOT NULL CHECK (state IN ('precommitted', 'aborted')),
    participants jsonb NOT NULL,
    result jsonb,
    at timestamptz NOT NULL DEFAULT clock_timestamp()
);
COMMENT ON COLUMN {schema}.precommits.state IS
    'the first vote written for the txid: precommitted (will commit) or aborted';

-- Step "begin" (one round trip after the claim): record the txid and its participants, and
-- return the key's other unresolved transactions, which the new owner finishes first.
-- Losing this row in a server crash is harmless, like the claim: the attempt's session ends
-- with the crash, so it cannot decide, and presumed abort rolls its prepared work back.
CREATE FUNCTION {schema}.twophase_begin(
    p_txid text, p_key text, p_attempt integer, p_owner uuid, p_protocol text,
    p_participants jsonb
) RETURNS TABLE (txid text, protocol text, decision text, participants jsonb, attempt integer)
LANGUAGE plpgsql
AS $$
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    RETURN QUERY SELECT t.txid::text, t.protocol, t.decision, t.participants, t.attempt
        FROM {schema}.twophase AS t
        WHERE t.key = p_key AND t.outcome IS NULL AND t.txid <> p_txid;
    INSERT INTO {schema}.twophase (txid, key, attempt, owner, protocol, participants)
    VALUES (p_txid, p_key, p_attempt, p_owner, p_protocol, p_participants);
END
$$;

-- Steps "claim" and "begin" in one round trip: claim the key; when this attempt runs, log
-- its txid and return the key's other unresolved transactions (as JSON) with the claim.
CREATE FUNCTION {schema}.twophase_claim(
    p_key text, p_owner uuid, p_attempt integer,
    p_dag_id text, p_task_id text, p_run_id text, p_map_index integer,
    p_host text, p_pid integer, p_on_committed text,
    p_txid text, p_protocol text, p_participants jsonb
) RETURNS TABLE (
    action text, prior_state text, attempt integer, version integer,
    result jsonb, holder uuid, committed_at timestamptz, others jsonb
)
LANGUAGE plpgsql
AS $$
DECLARE
    c record;
    v_others jsonb;
BEGIN
    SELECT * INTO c FROM {schema}.claim(p_key, p_owner, p_attempt, p_dag_id, p_task_id,
        p_run_id, p_map_index, p_host, p_pid, p_on_committed);
    IF c.action = 'run' THEN
        SELECT coalesce(jsonb_agg(to_jsonb(b)), '[]'::jsonb) INTO v_others
        FROM {schema}.twophase_begin(p_txid, p_key, p_attempt, p_owner, p_protocol,
                                     p_participants) AS b;
    END IF;
    RETURN QUERY SELECT c.action, c.prior_state::text, c.attempt, c.version, c.result,
        c.holder, c.committed_at, v_others;
END
$$;

-- The commit point: decide `commit` for p_txid and commit the key's ledger entry, in one
-- transaction, only while p_owner owns the key (EOS01, like commit()) and nobody decided
-- the txid yet (EOS07: recovery aborted it).
CREATE FUNCTION {schema}.twophase_decide(p_txid text, p_key text, p_owner uuid, p_result jsonb)
RETURNS TABLE (version integer, committed_at timestamptz)
LANGUAGE plpgsql
AS $$
DECLARE
    t {schema}.twophase;
    r {schema}.ledger;
    v_hash bytea;
BEGIN
    SELECT * INTO r FROM {schema}.ledger AS l WHERE l.key = p_key FOR UPDATE;
    IF NOT FOUND OR r.owner IS DISTINCT FROM p_owner THEN
        RAISE EXCEPTION 'effect % is owned by attempt % now', p_key, r.attempt
            USING ERRCODE = 'EOS01';
    END IF;
    SELECT * INTO t FROM {schema}.twophase AS x WHERE x.txid = p_txid FOR UPDATE;
    IF NOT FOUND OR t.decision IS NOT NULL THEN
        RAISE EXCEPTION 'transaction % was % by recovery', p_txid,
            coalesce(t.decision || 'ed', 'forgotten') USING ERRCODE = 'EOS07';
    END IF;
    v_hash := {schema}.append_event(p_key, r.event_seq + 1, r.last_hash,
        'prepared'::text::{schema}.event_kind, r.attempt,
        jsonb_build_object('txid', p_txid, 'protocol', t.protocol,
                           'participants', t.participants));
    v_hash := {schema}.append_event(p_key, r.event_seq + 2, v_hash,
        'decided'::text::{schema}.event_kind, r.attempt,
        jsonb_build_object('txid', p_txid, 'decision', 'commit'));
    UPDATE {schema}.ledger AS l SET event_seq = r.event_seq + 2, last_hash = v_hash
    WHERE l.key = p_key;
    UPDATE {schema}.twophase AS x SET decision = 'commit', decided_at = clock_timestamp()
    WHERE x.txid = p_txid;
    RETURN QUERY SELECT c.version, c.committed_at FROM {schema}.commit(p_key, p_owner, p_result) AS c;
END
$$;

-- Decide `abort` for p_txid unless it is decided already; return the decision in force.
-- The key gets an `aborted` event; a claim still held by the txid's owner is released
-- (state failed), so the next claim runs the key again. An unknown txid (its row was lost,
-- or never written) is recorded as aborted so that nobody can decide it later.
CREATE FUNCTION {schema}.twophase_abort(p_txid text, p_attempt integer, p_by text,
                                        p_reason text)
RETURNS text
LANGUAGE plpgsql
AS $$
DECLARE
    t {schema}.twophase;
    r {schema}.ledger;
    v_hash bytea;
BEGIN
    INSERT INTO {schema}.twophase AS x (txid, attempt, protocol, participants, decision,
                                        decided_at)
    VALUES (p_txid, p_attempt, CASE WHEN p_txid LIKE 'eos:3:%' THEN '3pc' ELSE '2pc' END,
            jsonb_build_object(), 'abort', clock_timestamp())
    ON CONFLICT ON CONSTRAINT twophase_pkey DO NOTHING;
    IF FOUND THEN
        RETURN 'abort';
    END IF;
    SELECT * INTO t FROM {schema}.twophase AS x WHERE x.txid = p_txid FOR UPDATE;
    IF t.decision IS NOT NULL THEN
        RETURN t.decision;
    END IF;
    UPDATE {schema}.twophase AS x SET decision = 'abort', decided_at = clock_timestamp()
    WHERE x.txid = p_txid;
    SELECT * INTO r FROM {schema}.ledger AS l WHERE l.key = t.key FOR UPDATE;
    IF FOUND THEN
        v_hash := {schema}.append_event(t.key, r.event_seq + 1, r.last_hash,
            'aborted'::text::{schema}.event_kind, t.attempt,
            jsonb_build_object('txid', p_txid, 'by', p_by, 'reason', p_reason));
        UPDATE {schema}.ledger AS l SET
            state = CASE WHEN r.owner = t.owner AND r.state = 'running'
                         THEN 'failed'::{schema}.effect_state ELSE r.state END,
            owner = CASE WHEN r.owner = t.owner THEN NULL ELSE r.owner END,
            updated_at = clock_timestamp(), event_seq = r.event_seq + 1, last_hash = v_hash
        WHERE l.key = t.key;
    END IF;
    RETURN 'abort';
END
$$;

-- Every participant finished p_txid: record the outcome. With p_by (a recovery, not the
-- attempt itself) the key gets a `recovered` event. A three-phase transaction that the
-- participants committed without the coordinator (termination protocol) is decided
-- `commit` here and its key committed with the result the participants recorded.
CREATE FUNCTION {schema}.twophase_resolved(p_txid text, p_outcome text, p_by text,
                                           p_result jsonb)
RETURNS text
LANGUAGE plpgsql
AS $$
DECLARE
    t {schema}.twophase;
    r {schema}.ledger;
    v_hash bytea;
    v_at timestamptz := clock_timestamp();
BEGIN
    IF p_by IS NULL THEN  -- the attempt's own bookkeeping after COMMIT PREPARED
        PERFORM set_config('synchronous_commit', 'off', true);
    END IF;
    SELECT * INTO t FROM {schema}.twophase AS x WHERE x.txid = p_txid FOR UPDATE;
    IF NOT FOUND OR t.outcome IS NOT NULL THEN
        RETURN t.outcome;
    END IF;
    IF p_outcome = 'committed' AND t.decision IS DISTINCT FROM 'commit' THEN
        IF t.decision = 'abort' OR t.protocol <> '3pc' THEN
            RAISE EXCEPTION 'transaction % is decided %, not commit', p_txid, t.decision
                USING ERRCODE = 'EOS08';
        END IF;
        -- Reconcile: the participants committed a three-phase transaction on their own.
        SELECT * INTO r FROM {schema}.ledger AS l WHERE l.key = t.key FOR UPDATE;
        v_hash := {schema}.append_event(t.key, r.event_seq + 1, r.last_hash,
            'recovered'::text::{schema}.event_kind, t.attempt,
            jsonb_build_object('txid', p_txid, 'outcome', p_outcome, 'by', p_by,
                               'decided_by', 'participants (termination protocol)'));
        v_hash := {schema}.append_event(t.key, r.event_seq + 2, v_hash,
            CASE WHEN r.state = 'committed' THEN 'replaced'::{schema}.event_kind
                 ELSE 'committed'::{schema}.event_kind END,
            t.attempt, jsonb_build_object('version', r.version + 1, 'txid', p_txid));
        UPDATE {schema}.ledger AS l SET state = 'committed', result = p_result,
            version = r.version + 1, committed_at = v_at, updated_at = v_at,
            owner = CASE WHEN r.owner = t.owner THEN NULL ELSE r.owner END,
            attempt = t.attempt, event_seq = r.event_seq + 2, last_hash = v_hash
        WHERE l.key = t.key;
        UPDATE {schema}.twophase AS x SET decision = 'commit', decided_at = v_at
        WHERE x.txid = p_txid;
    ELSIF p_outcome = 'aborted' AND t.decision IS DISTINCT FROM 'abort' THEN
        RAISE EXCEPTION 'transaction % is decided %, not abort', p_txid,
            coalesce(t.decision, 'nothing') USING ERRCODE = 'EOS08';
    ELSIF p_by IS NOT NULL AND t.key IS NOT NULL THEN
        SELECT * INTO r FROM {schema}.ledger AS l WHERE l.key = t.key FOR UPDATE;
        IF FOUND THEN
            v_hash := {schema}.append_event(t.key, r.event_seq + 1, r.last_hash,
                'recovered'::text::{schema}.event_kind, t.attempt,
                jsonb_build_object('txid', p_txid, 'outcome', p_outcome, 'by', p_by));
            UPDATE {schema}.ledger AS l SET event_seq = r.event_seq + 1, last_hash = v_hash,
                updated_at = v_at
            WHERE l.key = t.key;
        END IF;
    END IF;
    UPDATE {schema}.twophase AS x SET outcome = p_outcome, resolved_at = v_at
    WHERE x.txid = p_txid;
    RETURN p_outcome;
END
$$;
