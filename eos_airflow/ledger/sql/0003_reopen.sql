-- Schema revision 0003: `eos-airflow ledger reopen KEY --reason ...` lets an operator
-- deliberately reprocess a committed effect. The key goes to state `reopened` (its result and
-- version stay, so the next attempt sees them as `eos.previous` and can remove the old
-- outputs); the next claim runs it again, and the event records who reopened it and why.
-- (New enum values may be added inside the migration's transaction; they are only used when
-- reopen() runs, after it committed.)

ALTER TYPE {schema}.effect_state ADD VALUE IF NOT EXISTS 'reopened';
ALTER TYPE {schema}.event_kind ADD VALUE IF NOT EXISTS 'reopened';

-- SQLSTATE EOS04: no such key; EOS05: the key is not committed, or an attempt holds it.
CREATE FUNCTION {schema}.reopen(p_key text, p_reason text, p_actor text)
RETURNS TABLE (version integer, attempt integer)
LANGUAGE plpgsql
AS $$
DECLARE
    r {schema}.ledger;
    v_hash bytea;
BEGIN
    SELECT * INTO r FROM {schema}.ledger AS l WHERE l.key = p_key FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no ledger entry for key %', p_key USING ERRCODE = 'EOS04';
    END IF;
    IF r.state::text <> 'committed' OR r.owner IS NOT NULL THEN
        RAISE EXCEPTION 'key % is %, not committed and idle', p_key,
            CASE WHEN r.owner IS NOT NULL THEN 'held by a running attempt' ELSE r.state::text END
            USING ERRCODE = 'EOS05';
    END IF;
    v_hash := {schema}.append_event(p_key, r.event_seq + 1, r.last_hash,
        'reopened'::text::{schema}.event_kind, r.attempt,
        jsonb_build_object('reason', p_reason, 'by', p_actor, 'version', r.version));
    UPDATE {schema}.ledger AS l
    SET state = 'reopened'::text::{schema}.effect_state, updated_at = clock_timestamp(),
        event_seq = r.event_seq + 1, last_hash = v_hash
    WHERE l.key = p_key;
    RETURN QUERY SELECT r.version, r.attempt;
END
$$;
