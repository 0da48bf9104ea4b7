-- Ledger functions of schema revision 0001, installed by migration 0001_initial.
-- {schema} is replaced by the quoted ledger schema name (psycopg.sql.Identifier).
-- Each protocol step is one function call, so one round trip, and every decision it takes
-- appends its audit event in the same transaction as the state change.

-- The advisory lock an attempt holds on its session while it owns a key. When the owner's
-- process dies, PostgreSQL ends its session and releases the lock: this is how a claimant
-- from another run learns that the owner is gone, without trusting clocks or leases.
CREATE FUNCTION {schema}.lock_id(p_key text, p_owner uuid) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT hashtextextended(p_key || '/' || p_owner::text, 0) $$;

-- SHA-256 over the previous hash and a canonical encoding of the event:
-- key, seq, event, attempt, at (microseconds since the epoch) and detail (jsonb text),
-- joined by the unit separator U+001F. eos_airflow/ledger/chain.py computes the same.
-- STABLE, not IMMUTABLE: concat_ws, convert_to and extract are STABLE, and a SQL function
-- declared less volatile than its body is re-planned on every call instead of inlined.
CREATE FUNCTION {schema}.event_hash(
    p_prev bytea, p_key text, p_seq bigint, p_event {schema}.event_kind, p_attempt integer,
    p_at timestamptz, p_detail jsonb
) RETURNS bytea
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
    SELECT sha256(p_prev || convert_to(concat_ws(chr(31), p_key, p_seq, p_event, p_attempt,
        (extract(epoch FROM p_at) * 1000000)::bigint, p_detail::text), 'UTF8'))
$$;

-- Append event number p_seq of p_key after p_prev and return its hash. The caller holds the
-- key's ledger row lock and stores (p_seq, hash) in the row: the row is the chain's head.
CREATE FUNCTION {schema}.append_event(
    p_key text, p_seq bigint, p_prev bytea, p_event {schema}.event_kind, p_attempt integer,
    p_detail jsonb
) RETURNS bytea
LANGUAGE plpgsql
AS $$
DECLARE
    v_at timestamptz := clock_timestamp();
    v_hash bytea := {schema}.event_hash(p_prev, p_key, p_seq, p_event, p_attempt, v_at, p_detail);
BEGIN
    INSERT INTO {schema}.ledger_events (key, seq, event, attempt, at, detail, prev_hash, hash)
    VALUES (p_key, p_seq, p_event, p_attempt, v_at, p_detail, p_prev, v_hash);
    RETURN v_hash;
END
$$;

-- Step "claim". Returns one row whose action is:
--   run     this attempt owns the key (prior_state tells whether it replaces a committed effect)
--   skip    the key is committed; result is the stored result
--   refuse  the key is committed and on_committed = 'fail'
--   fenced  a newer attempt of the same task instance owns the key
--   wait    another live attempt owns the key; holder is its owner token
CREATE FUNCTION {schema}.claim(
    p_key text, p_owner uuid, p_attempt integer,
    p_dag_id text, p_task_id text, p_run_id text, p_map_index integer,
    p_host text, p_pid integer, p_on_committed text
) RETURNS TABLE (
    action text, prior_state {schema}.effect_state, attempt integer, version integer,
    result jsonb, holder uuid, committed_at timestamptz
)
LANGUAGE plpgsql
AS $$
DECLARE
    r {schema}.ledger;
    v_at timestamptz := clock_timestamp();
    v_genesis bytea := decode(repeat('00', 32), 'hex');
    v_detail jsonb := jsonb_build_object(
        'dag_id', p_dag_id, 'task_id', p_task_id, 'run_id', p_run_id, 'map_index', p_map_index,
        'host', p_host, 'pid', p_pid);
    v_hash bytea;
    v_same_ti boolean;
BEGIN
    -- Losing this transaction in a server crash is harmless: the crash also ends this
    -- attempt's session, so it cannot commit, and any later durable commit flushes it first.
    PERFORM set_config('synchronous_commit', 'off', true);

    v_hash := {schema}.event_hash(v_genesis, p_key, 1, 'claimed', p_attempt, v_at, v_detail);
    INSERT INTO {schema}.ledger AS l (key, state, attempt, owner, dag_id, task_id, run_id,
        map_index, host, pid, version, claimed_at, updated_at, event_seq, last_hash)
    VALUES (p_key, 'running', p_attempt, p_owner, p_dag_id, p_task_id, p_run_id, p_map_index,
        p_host, p_pid, 0, v_at, v_at, 1, v_hash)
    ON CONFLICT (key) DO NOTHING;
    IF FOUND THEN
        INSERT INTO {schema}.ledger_events (key, seq, event, attempt, at, detail, prev_hash, hash)
        VALUES (p_key, 1, 'claimed', p_attempt, v_at, v_detail, v_genesis, v_hash);
        PERFORM pg_advisory_lock({schema}.lock_id(p_key, p_owner));
        RETURN QUERY SELECT 'run'::text, NULL::{schema}.effect_state, p_attempt, 0,
            NULL::jsonb, NULL::uuid, NULL::timestamptz;
        RETURN;
    END IF;

    SELECT * INTO r FROM {schema}.ledger AS l WHERE l.key = p_key FOR UPDATE;

    IF r.state = 'committed' AND p_on_committed <> 'replace' THEN
        PERFORM set_config('synchronous_commit', 'on', true);
        v_hash := {schema}.append_event(p_key, r.event_seq + 1, r.last_hash, 'skipped', p_attempt,
            v_detail || jsonb_build_object('on_committed', p_on_committed,
                                           'version', r.version, 'committed_attempt', r.attempt));
        UPDATE {schema}.ledger AS l SET event_seq = r.event_seq + 1, last_hash = v_hash,
            updated_at = v_at
        WHERE l.key = p_key;
        RETURN QUERY SELECT CASE WHEN p_on_committed = 'fail' THEN 'refuse' ELSE 'skip' END,
            r.state, r.attempt, r.version, r.result, NULL::uuid, r.committed_at;
        RETURN;
    END IF;

    IF r.owner IS NOT NULL AND r.owner <> p_owner THEN
        v_same_ti := r.dag_id IS NOT DISTINCT FROM p_dag_id
            AND r.task_id IS NOT DISTINCT FROM p_task_id
            AND r.run_id IS NOT DISTINCT FROM p_run_id
            AND r.map_index IS NOT DISTINCT FROM p_map_index;
        IF v_same_ti AND p_attempt < r.attempt THEN
            PERFORM set_config('synchronous_commit', 'on', true);
            v_hash := {schema}.append_event(p_key, r.event_seq + 1, r.last_hash, 'fenced',
                p_attempt, v_detail || jsonb_build_object('step', 'claim',
                                                          'owner_attempt', r.attempt));
            UPDATE {schema}.ledger AS l SET event_seq = r.event_seq + 1, last_hash = v_hash,
                updated_at = v_at
            WHERE l.key = p_key;
            RETURN QUERY SELECT 'fenced'::text, r.state, r.attempt, r.version, NULL::jsonb,
                r.owner, NULL::timestamptz;
            RETURN;
        END IF;
        IF v_same_ti AND p_attempt > r.attempt THEN
            v_detail := v_detail || jsonb_build_object('took_over', jsonb_build_object(
                'attempt', r.attempt, 'reason', 'newer try of the same task instance'));
        ELSIF pg_try_advisory_xact_lock_shared({schema}.lock_id(p_key, r.owner)) THEN
            v_detail := v_detail || jsonb_build_object('took_over', jsonb_build_object(
                'attempt', r.attempt, 'run_id', r.run_id, 'host', r.host, 'pid', r.pid,
                'reason', 'previous owner''s session ended'));
        ELSE
            RETURN QUERY SELECT 'wait'::text, r.state, r.attempt, r.version,
                jsonb_build_object('dag_id', r.dag_id, 'task_id', r.task_id, 'run_id', r.run_id,
                    'map_index', r.map_index, 'host', r.host, 'pid', r.pid,
                    'claimed_at', r.claimed_at),
                r.owner, NULL::timestamptz;
            RETURN;
        END IF;
    END IF;

    IF r.state = 'committed' THEN
        v_detail := v_detail || jsonb_build_object('replacing_version', r.version);
    END IF;
    v_hash := {schema}.append_event(p_key, r.event_seq + 1, r.last_hash, 'claimed', p_attempt,
        v_detail);
    UPDATE {schema}.ledger AS l SET
        state = CASE WHEN r.state = 'committed' THEN 'committed'::{schema}.effect_state
                     ELSE 'running'::{schema}.effect_state END,
        attempt = p_attempt, owner = p_owner, dag_id = p_dag_id, task_id = p_task_id,
        run_id = p_run_id, map_index = p_map_index, host = p_host, pid = p_pid,
        claimed_at = v_at, updated_at = v_at, event_seq = r.event_seq + 1, last_hash = v_hash
    WHERE l.key = p_key;
    PERFORM pg_advisory_lock({schema}.lock_id(p_key, p_owner));
    RETURN QUERY SELECT 'run'::text, r.state, p_attempt, r.version,
        CASE WHEN r.state = 'committed' THEN r.result END, NULL::uuid, r.committed_at;
END
$$;

-- Step "commit", called inside the effect's transaction after the user's writes. Succeeds only
-- while p_owner still owns the key; otherwise raises SQLSTATE EOS01 so the whole transaction,
-- the user's writes included, rolls back (fencing).
CREATE FUNCTION {schema}.commit(p_key text, p_owner uuid, p_result jsonb)
RETURNS TABLE (version integer, committed_at timestamptz)
LANGUAGE plpgsql
AS $$
DECLARE
    r {schema}.ledger;
    v_at timestamptz := clock_timestamp();
    v_hash bytea;
BEGIN
    SELECT * INTO r FROM {schema}.ledger AS l WHERE l.key = p_key FOR UPDATE;
    IF NOT FOUND OR r.owner IS DISTINCT FROM p_owner THEN
        RAISE EXCEPTION 'effect % is owned by attempt % now', p_key, r.attempt
            USING ERRCODE = 'EOS01';
    END IF;
    v_hash := {schema}.append_event(p_key, r.event_seq + 1, r.last_hash,
        CASE WHEN r.state = 'committed' THEN 'replaced'::{schema}.event_kind
             ELSE 'committed'::{schema}.event_kind END,
        r.attempt, jsonb_build_object('version', r.version + 1, 'run_id', r.run_id));
    UPDATE {schema}.ledger AS l SET state = 'committed', result = p_result,
        version = r.version + 1, committed_at = v_at, updated_at = v_at, owner = NULL,
        event_seq = r.event_seq + 1, last_hash = v_hash
    WHERE l.key = p_key;
    PERFORM pg_advisory_unlock({schema}.lock_id(p_key, p_owner));
    RETURN QUERY SELECT r.version + 1, v_at;
END
$$;

-- After a rolled-back effect transaction: record why (p_event 'failed' or 'fenced'), release
-- the key if this attempt still owns it, and drop the owner's session lock.
CREATE FUNCTION {schema}.release(
    p_key text, p_owner uuid, p_attempt integer, p_event {schema}.event_kind, p_detail jsonb
) RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    r {schema}.ledger;
    v_hash bytea;
BEGIN
    SELECT * INTO r FROM {schema}.ledger AS l WHERE l.key = p_key FOR UPDATE;
    IF FOUND THEN
        v_hash := {schema}.append_event(p_key, r.event_seq + 1, r.last_hash, p_event, p_attempt,
            p_detail);
        UPDATE {schema}.ledger AS l SET
            state = CASE WHEN r.owner = p_owner AND r.state = 'running'
                         THEN 'failed'::{schema}.effect_state ELSE r.state END,
            owner = CASE WHEN r.owner = p_owner THEN NULL ELSE r.owner END,
            updated_at = clock_timestamp(), event_seq = r.event_seq + 1, last_hash = v_hash
        WHERE l.key = p_key;
    END IF;
    PERFORM pg_advisory_unlock({schema}.lock_id(p_key, p_owner));
END
$$;

-- Events are append-only: the writer cannot change or delete history. (A superuser can
-- still disable the trigger; `eos-airflow ledger verify` detects what such a user changes.)
CREATE FUNCTION {schema}.forbid_event_change() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    RAISE EXCEPTION 'ledger events are append-only (% refused)', TG_OP
        USING ERRCODE = 'EOS02',
              HINT = 'the audit trail cannot be edited; use eos-airflow ledger reopen to reprocess a key';
END
$$;

CREATE TRIGGER ledger_events_append_only
    BEFORE UPDATE OR DELETE OR TRUNCATE ON {schema}.ledger_events
    FOR EACH STATEMENT EXECUTE FUNCTION {schema}.forbid_event_change();
