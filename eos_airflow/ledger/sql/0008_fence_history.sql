-- Schema revision 0008: fencing remembers every try that claimed a key.
--
-- Until 0007, claim() fenced a lower try only while a higher try of the same task instance
-- still held the key. Model checking (model/ledger.pml) found two paths around it: the higher
-- try released the key (it failed) before the lower, late try claimed; or another origin took
-- the key over from a crashed higher try, so the ledger row no longer named the task instance.
-- In both, the lower try could then commit. Exactly-once held (one commit), but the fencing
-- guarantee did not. claim() now fences against the highest try of the task instance that ever
-- claimed the key: the row's attempt when the row names this task instance, else the claim
-- history (a rare path: the key was last claimed by another origin).
--
-- commit() now records the committing attempt's owner token in its event, so that an attempt
-- whose connection broke during COMMIT can learn from the ledger whether its commit happened.

CREATE OR REPLACE FUNCTION {schema}.claim(
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
    v_fence_try integer;
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

    v_same_ti := r.dag_id IS NOT DISTINCT FROM p_dag_id
        AND r.task_id IS NOT DISTINCT FROM p_task_id
        AND r.run_id IS NOT DISTINCT FROM p_run_id
        AND r.map_index IS NOT DISTINCT FROM p_map_index;
    -- Fencing: the highest try of this task instance that ever claimed the key. The row names
    -- the last claimant only; when another origin claimed since, the claim history tells.
    IF v_same_ti THEN
        v_fence_try := r.attempt;
    ELSIF p_dag_id IS NOT NULL THEN
        SELECT max(e.attempt) INTO v_fence_try FROM {schema}.ledger_events AS e
        WHERE e.key = p_key AND e.event = 'claimed'
            AND e.detail->>'dag_id' = p_dag_id AND e.detail->>'task_id' = p_task_id
            AND e.detail->>'run_id' = p_run_id
            AND (e.detail->>'map_index')::integer IS NOT DISTINCT FROM p_map_index;
    END IF;
    IF p_attempt < v_fence_try AND r.owner IS DISTINCT FROM p_owner THEN
        PERFORM set_config('synchronous_commit', 'on', true);
        v_hash := {schema}.append_event(p_key, r.event_seq + 1, r.last_hash, 'fenced',
            p_attempt, v_detail || jsonb_build_object('step', 'claim',
                                                      'owner_attempt', v_fence_try));
        UPDATE {schema}.ledger AS l SET event_seq = r.event_seq + 1, last_hash = v_hash,
            updated_at = v_at
        WHERE l.key = p_key;
        RETURN QUERY SELECT 'fenced'::text, r.state, v_fence_try, r.version, NULL::jsonb,
            r.owner, NULL::timestamptz;
        RETURN;
    END IF;

    IF r.owner IS NOT NULL AND r.owner <> p_owner THEN
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

-- The commit event names the owner token (see above); otherwise as in revision 0002.
CREATE OR REPLACE FUNCTION {schema}.commit(p_key text, p_owner uuid, p_result jsonb)
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
        r.attempt, jsonb_build_object('version', r.version + 1, 'run_id', r.run_id,
                                      'owner', p_owner));
    UPDATE {schema}.ledger AS l SET state = 'committed', result = p_result,
        version = r.version + 1, committed_at = v_at, updated_at = v_at, owner = NULL,
        event_seq = r.event_seq + 1, last_hash = v_hash
    WHERE l.key = p_key;
    PERFORM pg_advisory_unlock({schema}.lock_id(p_key, p_owner));
    -- Wake the sensors waiting for this key (delivered at COMMIT, so only committed keys
    -- notify). Only when someone waits: NOTIFY takes a database-wide lock at commit that
    -- would serialise every committing effect.
    IF {schema}.is_awaited(p_key) THEN
        PERFORM pg_notify({channel_literal}, p_key);
    END IF;
    RETURN QUERY SELECT r.version + 1, v_at;
END
$$;
