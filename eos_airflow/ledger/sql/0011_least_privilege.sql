-- Schema revision 0011: least privilege for the role tasks connect as (the "writer").
--
-- Until 0010 the writer ran the protocol functions with its own rights, so it needed INSERT
-- on ledger_events and UPDATE on ledger -- and with them it could append any event, with a
-- hash anyone can compute, and move a key's chain head: a back-dated `committed` event passed
-- `ledger verify`, and every later attempt skipped the key. Now every function that changes
-- the ledger runs as the ledger's owner (SECURITY DEFINER, fixed search_path), the writer may
-- only EXECUTE them (granted by `eos-airflow db grant`, never to PUBLIC) and read the tables,
-- and each function records only what it does: its events carry the server's time and the
-- chain's next link. The writer can still run every kind of effect -- and so act as any
-- task, as tasks do -- but it can no longer write history except through the protocol.
--
-- Operator actions name their actor from the session (session_user), not from a parameter:
-- reopen() and gc_prune() take an optional on-behalf-of label (the Airflow user of the UI,
-- the OS user of the CLI) recorded beside it. reopen and gc are the owner's; the writer may
-- run recovery (expire_claims, the two-phase recovery steps), which touches only abandoned
-- attempts (revision 0010).
-- Existing grants move with this revision: a role that could claim (INSERT on ledger) keeps
-- running effects through the functions; every role other than the owner loses direct
-- INSERT, UPDATE, DELETE and TRUNCATE on the ledger's tables.

-- release() records what an attempt says about itself: failed, fenced or skipped (a
-- multi-database attempt that found its key committed by an earlier one). Nothing else.
CREATE OR REPLACE FUNCTION {schema}.release(
    p_key text, p_owner uuid, p_attempt integer, p_event {schema}.event_kind, p_detail jsonb
) RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    r {schema}.ledger;
    v_hash bytea;
BEGIN
    IF p_event::text NOT IN ('failed', 'fenced', 'skipped') THEN
        RAISE EXCEPTION 'release() records failed, fenced or skipped, not %', p_event
            USING ERRCODE = 'EOS09';
    END IF;
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

-- reopen: the actor is the session's role; p_on_behalf_of is what the caller says besides.
DROP FUNCTION {schema}.reopen(text, text, text);
CREATE FUNCTION {schema}.reopen(p_key text, p_reason text, p_on_behalf_of text DEFAULT NULL)
RETURNS TABLE (version integer, attempt integer)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
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
        jsonb_strip_nulls(jsonb_build_object('reason', p_reason, 'by', session_user::text,
                                             'on_behalf_of', p_on_behalf_of,
                                             'version', r.version)));
    UPDATE {schema}.ledger AS l
    SET state = 'reopened'::text::{schema}.effect_state, updated_at = clock_timestamp(),
        event_seq = r.event_seq + 1, last_hash = v_hash
    WHERE l.key = p_key;
    RETURN QUERY SELECT r.version, r.attempt;
END
$$;

-- gc_prune: as in revision 0006, with the actor from the session.
DROP FUNCTION {schema}.gc_prune(text[], timestamptz, text);
CREATE FUNCTION {schema}.gc_prune(p_keys text[], p_cutoff timestamptz,
                                  p_on_behalf_of text DEFAULT NULL)
RETURNS TABLE (pruned_key text, pruned_events bigint, pruned_through bigint)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    k text;
    r {schema}.ledger;
    v_through bigint;
    v_hash bytea;
    v_events bigint;
    v_versions integer;
    v_new bytea;
    v_removed bigint;
BEGIN
    FOREACH k IN ARRAY p_keys LOOP
        SELECT * INTO r FROM {schema}.ledger AS l WHERE l.key = k FOR UPDATE;
        CONTINUE WHEN NOT FOUND OR r.state::text <> 'committed' OR r.owner IS NOT NULL
            OR r.committed_at >= p_cutoff;
        SELECT max(e.seq) INTO v_through FROM {schema}.ledger_events AS e
        WHERE e.key = k AND e.at < p_cutoff;
        CONTINUE WHEN v_through IS NULL;
        SELECT count(*), count(*) FILTER (WHERE e.event::text IN ('committed', 'replaced'))
        INTO v_events, v_versions
        FROM {schema}.ledger_events AS e WHERE e.key = k AND e.seq <= v_through;
        CONTINUE WHEN NOT EXISTS (SELECT 1 FROM {schema}.ledger_events AS e
                                  WHERE e.key = k AND e.seq <= v_through
                                    AND e.event::text <> 'pruned');
        v_removed := v_events;
        SELECT e.hash INTO v_hash FROM {schema}.ledger_events AS e
        WHERE e.key = k AND e.seq = v_through;

        PERFORM set_config('eos.gc_prune', 'on', true);
        DELETE FROM {schema}.ledger_events AS e WHERE e.key = k AND e.seq <= v_through;
        PERFORM set_config('eos.gc_prune', 'off', true);

        INSERT INTO {schema}.pruned_chains AS p
            (key, through_seq, through_hash, events, versions, pruned_at)
        VALUES (k, v_through, v_hash, v_events, v_versions, clock_timestamp())
        ON CONFLICT ON CONSTRAINT pruned_chains_pkey DO UPDATE
        SET through_seq = excluded.through_seq, through_hash = excluded.through_hash,
            events = p.events + excluded.events, versions = p.versions + excluded.versions,
            pruned_at = excluded.pruned_at;
        SELECT p.events, p.versions INTO v_events, v_versions
        FROM {schema}.pruned_chains AS p WHERE p.key = k;

        v_new := {schema}.append_event(k, r.event_seq + 1, r.last_hash,
            'pruned'::text::{schema}.event_kind, r.attempt,
            jsonb_strip_nulls(jsonb_build_object(
                'through_seq', v_through, 'through_hash', encode(v_hash, 'hex'),
                'events', v_events, 'versions', v_versions, 'older_than', p_cutoff,
                'by', session_user::text, 'on_behalf_of', p_on_behalf_of)));
        UPDATE {schema}.ledger AS l SET event_seq = r.event_seq + 1, last_hash = v_new,
            updated_at = clock_timestamp()
        WHERE l.key = k;
        pruned_key := k;
        pruned_events := v_removed;
        pruned_through := v_through;
        RETURN NEXT;
    END LOOP;
END
$$;

-- After a connection broke during COMMIT: wait for the broken session's transaction (the row
-- lock), then hold the row while looking for the attempt's commit; if there is none, release
-- the claim under that lock, so that a late commit() of the broken session is fenced.
CREATE FUNCTION {schema}.commit_outcome(p_key text, p_owner uuid, p_attempt integer,
                                        p_detail jsonb)
RETURNS TABLE (version integer, committed_at timestamptz)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM 1 FROM {schema}.ledger AS l WHERE l.key = p_key FOR UPDATE;
    RETURN QUERY SELECT (e.detail->>'version')::integer, e.at
        FROM {schema}.ledger_events AS e
        WHERE e.key = p_key AND e.event IN ('committed', 'replaced')
          AND e.detail->>'owner' = p_owner::text;
    IF NOT FOUND THEN
        PERFORM {schema}.release(p_key, p_owner, p_attempt, 'failed', p_detail);
    END IF;
END
$$;

-- eos.publish(): a message of the version being written, only while p_owner owns the key.
CREATE FUNCTION {schema}.outbox_publish(
    p_key text, p_owner uuid, p_version integer, p_seq integer, p_message_id uuid,
    p_destination text, p_message_key text, p_payload jsonb, p_headers jsonb
) RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM 1 FROM {schema}.ledger AS l
    WHERE l.key = p_key AND l.owner = p_owner AND l.version + 1 = p_version;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'effect % is not owned by this attempt, or % is not its version',
            p_key, p_version USING ERRCODE = 'EOS01';
    END IF;
    INSERT INTO {schema}.outbox (effect_key, version, seq, message_id, destination,
                                 message_key, payload, headers)
    VALUES (p_key, p_version, p_seq, p_message_id, p_destination, p_message_key, p_payload,
            p_headers);
END
$$;

-- The relay: take the oldest undelivered messages (locked until the caller's transaction
-- ends; rows another relay holds are skipped), and mark them delivered.
CREATE FUNCTION {schema}.outbox_take(p_exact text[], p_schemes text[], p_limit integer)
RETURNS TABLE (id bigint, message_id text, destination text, message_key text,
               payload jsonb, headers jsonb)
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT o.id, o.message_id::text, o.destination, o.message_key, o.payload, o.headers
    FROM {schema}.outbox AS o
    WHERE o.delivered_at IS NULL
      AND (o.destination = ANY(p_exact) OR split_part(o.destination, ':', 1) = ANY(p_schemes))
    ORDER BY o.id
    LIMIT p_limit
    FOR UPDATE SKIP LOCKED
$$;

CREATE FUNCTION {schema}.outbox_mark(p_ids bigint[], p_relay text) RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_count integer;
BEGIN
    UPDATE {schema}.outbox AS o SET delivered_at = clock_timestamp(), delivered_by = p_relay
    WHERE o.id = ANY(p_ids) AND o.delivered_at IS NULL;
    GET DIAGNOSTICS v_count = ROW_COUNT;
    RETURN v_count;
END
$$;

-- A consumer's dedup: the message ids it had not applied before (in its effect's transaction).
CREATE FUNCTION {schema}.inbox_accept(p_consumer text, p_ids text[], p_sources text[])
RETURNS SETOF text
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    INSERT INTO {schema}.inbox AS i (consumer, message_id, source)
    SELECT p_consumer, m.id, m.source
    FROM unnest(p_ids, p_sources) AS m(id, source)
    ON CONFLICT (consumer, message_id) DO NOTHING
    RETURNING i.message_id::text
$$;

-- Waiters (LedgerSensor, LedgerTrigger): register, unregister, keep alive, drop.
CREATE FUNCTION {schema}.waiters_register(p_listener text, p_keys text[],
                                          p_is_prefix boolean[], p_ttl double precision)
RETURNS void
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    INSERT INTO {schema}.waiters AS w (key, is_prefix, listener, expires_at)
    SELECT t.key, t.is_prefix, p_listener, now() + make_interval(secs => p_ttl)
    FROM unnest(p_keys, p_is_prefix) AS t(key, is_prefix)
    ON CONFLICT (key, is_prefix, listener) DO UPDATE SET expires_at = excluded.expires_at
$$;

CREATE FUNCTION {schema}.waiters_unregister(p_listener text, p_keys text[],
                                            p_is_prefix boolean[])
RETURNS void
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    DELETE FROM {schema}.waiters AS w
    USING unnest(p_keys, p_is_prefix) AS t(key, is_prefix)
    WHERE w.listener = p_listener AND w.key = t.key AND w.is_prefix = t.is_prefix
$$;

CREATE FUNCTION {schema}.waiters_refresh(p_listener text, p_ttl double precision)
RETURNS void
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    DELETE FROM {schema}.waiters AS w WHERE w.expires_at < now();
    UPDATE {schema}.waiters AS w SET expires_at = now() + make_interval(secs => p_ttl)
    WHERE w.listener = p_listener
$$;

CREATE FUNCTION {schema}.waiters_drop(p_listener text) RETURNS void
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    DELETE FROM {schema}.waiters AS w WHERE w.listener = p_listener
$$;

-- A waiter's first check after registering: FOR SHARE waits for a commit() in flight on these
-- rows, so a commit that ran before the registration is seen.
CREATE FUNCTION {schema}.watch_lock(p_keys text[])
RETURNS TABLE (key text, state text, result jsonb)
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT l.key::text, l.state::text, l.result FROM {schema}.ledger AS l
    WHERE l.key = ANY(p_keys)
    FOR SHARE
$$;

CREATE FUNCTION {schema}.watch_prefix_lock(p_prefix text)
RETURNS TABLE (key text, state text, result jsonb)
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT l.key::text, l.state::text, l.result FROM {schema}.ledger AS l
    WHERE l.key >= p_prefix AND l.key < p_prefix || chr(1114111) AND starts_with(l.key, p_prefix)
    FOR SHARE
$$;

-- The committed position of a source, read under the source's lock (until the caller's
-- transaction ends), as eos.offsets needs it.
CREATE FUNCTION {schema}.offset_position(p_source text)
RETURNS TABLE (committed_position jsonb)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM pg_advisory_xact_lock({schema}.offset_lock_id(p_source));
    RETURN QUERY SELECT o.position FROM {schema}.offsets AS o WHERE o.source = p_source
        FOR UPDATE;
END
$$;

-- A three-phase vote, unless one exists; returns the vote in force (none when another
-- session's vote committed while this one waited: the caller reads again).
CREATE FUNCTION {schema}.precommit_vote(p_txid text, p_key text, p_attempt integer,
                                        p_state text, p_participants jsonb, p_result jsonb)
RETURNS TABLE (state text, result jsonb)
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    WITH written AS (
        INSERT INTO {schema}.precommits AS p (txid, key, attempt, state, participants, result)
        VALUES (p_txid, p_key, p_attempt, p_state, p_participants, p_result)
        ON CONFLICT (txid) DO NOTHING
        RETURNING p.state, p.result
    )
    SELECT w.state, w.result FROM written AS w
    UNION ALL
    SELECT p.state, p.result FROM {schema}.precommits AS p WHERE p.txid = p_txid
    LIMIT 1
$$;

-- An attempt that found its key committed by an earlier transaction before it prepared
-- anything: its own undecided txid never had a participant, so it leaves no row.
CREATE FUNCTION {schema}.twophase_forget(p_txid text, p_owner uuid) RETURNS void
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    DELETE FROM {schema}.twophase AS t
    WHERE t.txid = p_txid AND t.owner = p_owner AND t.decision IS NULL
$$;

-- `eos-airflow recover`: expire the claims whose owner's session ended (with p_older_than,
-- only those claimed before it). A claim held by a live session is never expired. Each
-- expired claim gets a `failed` event naming the released owner token and the session's role.
CREATE FUNCTION {schema}.expire_claims(p_older_than timestamptz)
RETURNS TABLE (key text, attempt integer, run_id text, claimed_at timestamptz, reason text)
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    WITH stale AS (
        SELECT l.key, l.owner, l.attempt, l.state, l.event_seq, l.last_hash, l.claimed_at
        FROM {schema}.ledger AS l
        WHERE l.owner IS NOT NULL AND (p_older_than IS NULL OR l.claimed_at < p_older_than)
        FOR UPDATE SKIP LOCKED
    ), expired AS (
        SELECT s.*, {schema}.append_event(s.key, s.event_seq + 1, s.last_hash, 'failed',
                   s.attempt, jsonb_build_object(
                       'recovered_by', 'eos-airflow recover', 'by', session_user::text,
                       'reason', 'owner session ended', 'claimed_at', s.claimed_at,
                       'released_owner', s.owner)) AS hash
        FROM stale AS s
        WHERE NOT {schema}.owner_alive(s.key, s.owner)
    )
    UPDATE {schema}.ledger AS l
    SET state = CASE WHEN e.state = 'running' THEN 'failed'::{schema}.effect_state
                     ELSE e.state END,
        owner = NULL, event_seq = e.event_seq + 1, last_hash = e.hash,
        updated_at = clock_timestamp()
    FROM expired AS e
    WHERE l.key = e.key
    RETURNING l.key::text, l.attempt, l.run_id, e.claimed_at, 'owner session ended'
$$;

-- The protocol's steps of revisions before this one run as the owner too.
ALTER FUNCTION {schema}.claim(text, uuid, integer, text, text, text, integer, text, integer, text)
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION {schema}.commit(text, uuid, jsonb)
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION {schema}.release(text, uuid, integer, {schema}.event_kind, jsonb)
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION {schema}.checkpoint(text, uuid, bigint, jsonb, jsonb, jsonb)
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION {schema}.resume(text, uuid)
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION {schema}.advance_offsets(text, uuid, jsonb)
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION {schema}.twophase_begin(text, text, integer, uuid, text, jsonb)
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION {schema}.twophase_claim(text, uuid, integer, text, text, text, integer, text,
                                       integer, text, text, text, jsonb)
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION {schema}.twophase_decide(text, text, uuid, jsonb)
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION {schema}.twophase_abort(text, integer, text, text)
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION {schema}.twophase_resolved(text, text, text, jsonb)
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

-- Nothing that writes is PUBLIC's; pure helpers (hashes, lock ids, owner_alive) stay callable.
-- Then move existing grants: a role that could claim keeps running effects, through EXECUTE;
-- no role but the owner writes the tables directly.
DO $$
DECLARE
    -- the ledger table, found through its row type (no schema name inside a string literal)
    v_ledger oid := (SELECT t.typrelid FROM pg_type AS t
                     WHERE t.oid = pg_typeof(NULL::{schema}.ledger));
    v_ns oid := (SELECT c.relnamespace FROM pg_class AS c WHERE c.oid = v_ledger);
    v_owner oid := (SELECT n.nspowner FROM pg_namespace AS n WHERE n.oid = v_ns);
    v_fn regprocedure;
    v_role oid;
BEGIN
    FOR v_fn IN SELECT p.oid::regprocedure FROM pg_proc AS p
                WHERE p.pronamespace = v_ns
                  AND p.proname NOT IN ('lock_id', 'offset_lock_id', 'event_hash',
                                        'is_awaited', 'owner_alive')
    LOOP
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', v_fn);
    END LOOP;
    FOR v_role IN SELECT DISTINCT a.grantee FROM pg_class AS c, aclexplode(c.relacl) AS a
                  WHERE c.oid = v_ledger AND a.privilege_type = 'INSERT'
                    AND a.grantee NOT IN (c.relowner, 0)
    LOOP
        FOR v_fn IN SELECT p.oid::regprocedure FROM pg_proc AS p
                    WHERE p.pronamespace = v_ns AND p.prosecdef
                      AND p.proname NOT IN ('reopen', 'gc_prune')
        LOOP
            EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %s', v_fn, v_role::regrole);
        END LOOP;
    END LOOP;
    FOR v_role IN SELECT DISTINCT a.grantee FROM pg_class AS c, aclexplode(c.relacl) AS a
                  WHERE c.relnamespace = v_ns AND c.relkind IN ('r', 'p')
                    AND a.privilege_type IN ('INSERT', 'UPDATE', 'DELETE', 'TRUNCATE')
                    AND a.grantee NOT IN (c.relowner, v_owner)
    LOOP
        IF v_role = 0 THEN
            EXECUTE format('REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON ALL TABLES IN SCHEMA %s '
                           'FROM PUBLIC', v_ns::regnamespace);
        ELSE
            EXECUTE format('REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON ALL TABLES IN SCHEMA %s '
                           'FROM %s', v_ns::regnamespace, v_role::regrole);
        END IF;
    END LOOP;
END
$$;
