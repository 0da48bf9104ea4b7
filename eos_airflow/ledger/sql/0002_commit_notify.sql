-- Ledger functions of schema revision 0002, installed by migration 0002_commit_notify.
-- {schema} is the quoted ledger schema; {channel_literal} the NOTIFY channel of this schema
-- (eos_airflow.ledger.queries.notify_channel).

-- True when a live waiter (LedgerSensor / LedgerTrigger) waits for p_key itself or for a
-- prefix of it. Waiters register before they check the key's state, and their check locks
-- the rows it reads (FOR SHARE), so a commit either sees the waiter here or is seen by it.
CREATE FUNCTION {schema}.is_awaited(p_key text) RETURNS boolean
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
    SELECT EXISTS (SELECT 1 FROM {schema}.waiters AS w
                   WHERE w.key = p_key AND NOT w.is_prefix AND w.expires_at > now())
        OR EXISTS (SELECT 1 FROM {schema}.waiters AS w
                   WHERE w.is_prefix AND starts_with(p_key, w.key) AND w.expires_at > now())
$$;

-- Step "commit", called inside the effect's transaction after the user's writes. Succeeds only
-- while p_owner still owns the key; otherwise raises SQLSTATE EOS01 so the whole transaction,
-- the user's writes included, rolls back (fencing).
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
        r.attempt, jsonb_build_object('version', r.version + 1, 'run_id', r.run_id));
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
