-- Schema revision 0004: recovery points of chunked (checkpointed) effects, and source offsets
-- committed with the outputs.
--
-- A chunked effect commits its writes chunk by chunk. Each chunk's transaction also calls
-- checkpoint(), which is fenced like commit() (only the owner token may call it) but keeps the
-- key owned, and records where in the source the chunk ended (a recovery point). A retry reads
-- the newest recovery point of the version being written and continues after it.
--
-- offsets holds the last committed position of each named source (a Kafka partition, a
-- table's monotonic column, ...); advance_offsets() writes new positions in the effect's
-- transaction, so outputs and positions commit or roll back together.
-- (New enum values are used only when these functions run, after the migration committed.)

ALTER TYPE {schema}.event_kind ADD VALUE IF NOT EXISTS 'checkpoint';
ALTER TYPE {schema}.event_kind ADD VALUE IF NOT EXISTS 'resumed';
ALTER TYPE {schema}.event_kind ADD VALUE IF NOT EXISTS 'offsets';

CREATE TABLE {schema}.recovery_points (
    key text COLLATE "C" NOT NULL,
    version integer NOT NULL,
    seq integer NOT NULL,
    attempt integer NOT NULL,
    rows bigint NOT NULL,
    position jsonb,
    state jsonb,
    at timestamptz NOT NULL,
    CONSTRAINT recovery_points_pkey PRIMARY KEY (key, version, seq)
);
COMMENT ON COLUMN {schema}.recovery_points.version IS 'the effect version being written';
COMMENT ON COLUMN {schema}.recovery_points.rows IS 'source items consumed up to this point';

CREATE TABLE {schema}.offsets (
    source text COLLATE "C" NOT NULL,
    position jsonb,
    key text COLLATE "C" NOT NULL,
    attempt integer NOT NULL,
    updated_at timestamptz NOT NULL,
    CONSTRAINT offsets_pkey PRIMARY KEY (source)
);
COMMENT ON COLUMN {schema}.offsets.key IS 'the effect that committed this position';

-- The transaction lock serialising effects that read or advance one source (also when the
-- source has no row yet, which FOR UPDATE alone cannot lock). Seed 1: key locks use seed 0.
CREATE FUNCTION {schema}.offset_lock_id(p_source text) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT hashtextextended('offsets/' || p_source, 1) $$;

-- Step "checkpoint", called in a chunk's transaction after the chunk's writes. Fenced like
-- commit(): SQLSTATE EOS01 when p_owner no longer owns the key, so the chunk rolls back.
-- The key stays owned (state running); the recovery point belongs to version + 1.
CREATE FUNCTION {schema}.checkpoint(
    p_key text, p_owner uuid, p_rows bigint, p_position jsonb, p_state jsonb, p_detail jsonb
) RETURNS TABLE (seq integer, at timestamptz)
LANGUAGE plpgsql
AS $$
DECLARE
    r {schema}.ledger;
    v_at timestamptz := clock_timestamp();
    v_seq integer;
    v_hash bytea;
BEGIN
    SELECT * INTO r FROM {schema}.ledger AS l WHERE l.key = p_key FOR UPDATE;
    IF NOT FOUND OR r.owner IS DISTINCT FROM p_owner THEN
        RAISE EXCEPTION 'effect % is owned by attempt % now', p_key, r.attempt
            USING ERRCODE = 'EOS01';
    END IF;
    SELECT coalesce(max(rp.seq), 0) + 1 INTO v_seq FROM {schema}.recovery_points AS rp
    WHERE rp.key = p_key AND rp.version = r.version + 1;
    INSERT INTO {schema}.recovery_points (key, version, seq, attempt, rows, position, state, at)
    VALUES (p_key, r.version + 1, v_seq, r.attempt, p_rows, p_position, p_state, v_at);
    v_hash := {schema}.append_event(p_key, r.event_seq + 1, r.last_hash,
        'checkpoint'::text::{schema}.event_kind, r.attempt,
        jsonb_build_object('seq', v_seq, 'rows', p_rows, 'position', p_position)
            || coalesce(p_detail, jsonb_build_object()));
    UPDATE {schema}.ledger AS l SET updated_at = v_at, event_seq = r.event_seq + 1,
        last_hash = v_hash
    WHERE l.key = p_key;
    RETURN QUERY SELECT v_seq, v_at;
END
$$;

-- Step "resume": the owner continues after the newest recovery point of the version being
-- written. Fenced like checkpoint(); appends event `resumed` saying where it continues.
-- Returns no row when there is no recovery point (the attempt starts from the beginning).
CREATE FUNCTION {schema}.resume(p_key text, p_owner uuid)
RETURNS TABLE (point_seq integer, point_rows bigint, point_position jsonb, point_state jsonb,
               point_attempt integer)
LANGUAGE plpgsql
AS $$
DECLARE
    r {schema}.ledger;
    p {schema}.recovery_points;
    v_hash bytea;
BEGIN
    SELECT * INTO r FROM {schema}.ledger AS l WHERE l.key = p_key FOR UPDATE;
    IF NOT FOUND OR r.owner IS DISTINCT FROM p_owner THEN
        RAISE EXCEPTION 'effect % is owned by attempt % now', p_key, r.attempt
            USING ERRCODE = 'EOS01';
    END IF;
    SELECT * INTO p FROM {schema}.recovery_points AS rp
    WHERE rp.key = p_key AND rp.version = r.version + 1 ORDER BY rp.seq DESC LIMIT 1;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    v_hash := {schema}.append_event(p_key, r.event_seq + 1, r.last_hash,
        'resumed'::text::{schema}.event_kind, r.attempt,
        jsonb_build_object('after_seq', p.seq, 'rows', p.rows, 'position', p.position,
                           'checkpointed_by_attempt', p.attempt));
    UPDATE {schema}.ledger AS l SET updated_at = clock_timestamp(),
        event_seq = r.event_seq + 1, last_hash = v_hash
    WHERE l.key = p_key;
    RETURN QUERY SELECT p.seq, p.rows, p.position, p.state, p.attempt;
END
$$;

-- Write the positions staged by an effect (p_positions maps source to position) in the effect's
-- transaction, and append one `offsets` event with each source's old and new position.
-- Sources are locked in name order (no deadlock between effects advancing several). Fenced
-- like commit() when p_owner is given.
CREATE FUNCTION {schema}.advance_offsets(p_key text, p_owner uuid, p_positions jsonb)
RETURNS jsonb
LANGUAGE plpgsql
AS $$
DECLARE
    r {schema}.ledger;
    v_at timestamptz := clock_timestamp();
    v_source text;
    v_old jsonb;
    v_moves jsonb := jsonb_build_object();
    v_hash bytea;
BEGIN
    SELECT * INTO r FROM {schema}.ledger AS l WHERE l.key = p_key FOR UPDATE;
    IF NOT FOUND OR (p_owner IS NOT NULL AND r.owner IS DISTINCT FROM p_owner) THEN
        RAISE EXCEPTION 'effect % is owned by attempt % now', p_key, r.attempt
            USING ERRCODE = 'EOS01';
    END IF;
    FOR v_source IN SELECT s FROM jsonb_object_keys(p_positions) AS s ORDER BY s COLLATE "C"
    LOOP
        PERFORM pg_advisory_xact_lock({schema}.offset_lock_id(v_source));
        v_old := NULL;
        SELECT o.position INTO v_old FROM {schema}.offsets AS o WHERE o.source = v_source
        FOR UPDATE;
        INSERT INTO {schema}.offsets AS o (source, position, key, attempt, updated_at)
        VALUES (v_source, p_positions -> v_source, p_key, r.attempt, v_at)
        ON CONFLICT (source) DO UPDATE SET position = excluded.position, key = excluded.key,
            attempt = excluded.attempt, updated_at = excluded.updated_at;
        v_moves := v_moves || jsonb_build_object(v_source, jsonb_build_object(
            'from', v_old, 'to', p_positions -> v_source));
    END LOOP;
    v_hash := {schema}.append_event(p_key, r.event_seq + 1, r.last_hash,
        'offsets'::text::{schema}.event_kind, r.attempt, jsonb_build_object('offsets', v_moves));
    UPDATE {schema}.ledger AS l SET updated_at = v_at, event_seq = r.event_seq + 1,
        last_hash = v_hash
    WHERE l.key = p_key;
    RETURN v_moves;
END
$$;
