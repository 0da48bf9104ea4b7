-- Schema revision 0012: gc keeps the fencing history.
--
-- Since 0008 claim() fences a lower try against the highest try of its task instance that
-- ever claimed the key: the ledger row's attempt when the row names that task instance, else
-- the key's `claimed` events. `ledger gc` removes the old events of committed keys, those
-- `claimed` events among them. A key whose higher try committed and was pruned, then reopened
-- and claimed by another run, no longer knew that higher try: the lower, late try of the
-- first run claimed and committed instead of being fenced.
--
-- gc_prune() now writes, in the transaction that removes a key's prefix, the highest try of
-- each task instance whose `claimed` events it removes into pruned_claims (merged with what
-- earlier runs of gc wrote there), and the key's `pruned` event records the same (`claims`),
-- hash-chained. Nothing deletes from pruned_claims. So every `claimed` event a key ever had
-- is either still in its chain or counted in pruned_claims, and claim() reads both. claim()
-- and commit() write nothing more than before: the fallback read of claim() -- taken only
-- when the row names another task instance -- gains one index probe.
--
-- Existing ledgers need no backfill: their `claimed` events are still in the chain until
-- the next gc, which summarises them. (Claims that an earlier gc removed before this revision
-- are gone; nothing records them.)

CREATE TABLE {schema}.pruned_claims (
    key text COLLATE "C" NOT NULL,
    dag_id text NOT NULL,
    task_id text NOT NULL,
    run_id text NOT NULL,
    map_index integer,
    attempt integer NOT NULL,
    pruned_at timestamptz NOT NULL
);
CREATE INDEX pruned_claims_key_idx ON {schema}.pruned_claims (key);
COMMENT ON TABLE {schema}.pruned_claims IS 'per key and task instance, the highest try whose claimed event gc removed: fencing reads it with the remaining events';
COMMENT ON COLUMN {schema}.pruned_claims.attempt IS 'the highest try of this task instance among the removed claimed events';

-- Readers of the events read the fencing history too (the writer's and the auditor's SELECT).
DO $$
DECLARE
    v_events oid := (SELECT t.typrelid FROM pg_type AS t
                     WHERE t.oid = pg_typeof(NULL::{schema}.ledger_events));
    v_role oid;
BEGIN
    FOR v_role IN SELECT DISTINCT a.grantee FROM pg_class AS c, aclexplode(c.relacl) AS a
                  WHERE c.oid = v_events AND a.privilege_type = 'SELECT'
                    AND a.grantee NOT IN (c.relowner, 0)
    LOOP
        EXECUTE format('GRANT SELECT ON %s TO %s',
                       pg_typeof(NULL::{schema}.pruned_claims)::text::regclass, v_role::regrole);
    END LOOP;
END
$$;

-- claim(): as in revision 0008 (run as the owner since 0011), the claim history now includes
-- pruned_claims.
CREATE OR REPLACE FUNCTION {schema}.claim(
    p_key text, p_owner uuid, p_attempt integer,
    p_dag_id text, p_task_id text, p_run_id text, p_map_index integer,
    p_host text, p_pid integer, p_on_committed text
) RETURNS TABLE (
    action text, prior_state {schema}.effect_state, attempt integer, version integer,
    result jsonb, holder uuid, committed_at timestamptz
)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
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
    -- the last claimant only; when another origin claimed since, the claim history tells: the
    -- `claimed` events still in the chain, and the highest try among those gc removed.
    IF v_same_ti THEN
        v_fence_try := r.attempt;
    ELSIF p_dag_id IS NOT NULL THEN
        SELECT max(h.attempt) INTO v_fence_try FROM (
            SELECT e.attempt FROM {schema}.ledger_events AS e
            WHERE e.key = p_key AND e.event = 'claimed'
                AND e.detail->>'dag_id' = p_dag_id AND e.detail->>'task_id' = p_task_id
                AND e.detail->>'run_id' = p_run_id
                AND (e.detail->>'map_index')::integer IS NOT DISTINCT FROM p_map_index
            UNION ALL
            SELECT p.attempt FROM {schema}.pruned_claims AS p
            WHERE p.key = p_key AND p.dag_id = p_dag_id AND p.task_id = p_task_id
                AND p.run_id = p_run_id AND p.map_index IS NOT DISTINCT FROM p_map_index
        ) AS h;
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

-- gc_prune(): as in revision 0011, and before it removes a key's prefix it merges the highest
-- try per task instance of the prefix's `claimed` events into pruned_claims (the key's row is
-- locked, so two runs of gc on one key take turns). The `pruned` event records the merged
-- history as `claims`.
CREATE OR REPLACE FUNCTION {schema}.gc_prune(p_keys text[], p_cutoff timestamptz,
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
    v_claims jsonb;
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

        -- the fencing history first: the highest try per task instance of what stays counted
        -- (earlier gc) and of the `claimed` events about to be removed
        WITH earlier AS (
            DELETE FROM {schema}.pruned_claims AS p WHERE p.key = k
            RETURNING p.dag_id, p.task_id, p.run_id, p.map_index, p.attempt
        ), claims AS (
            SELECT c.dag_id, c.task_id, c.run_id, c.map_index, max(c.attempt) AS attempt
            FROM (
                SELECT o.dag_id, o.task_id, o.run_id, o.map_index, o.attempt FROM earlier AS o
                UNION ALL
                SELECT e.detail->>'dag_id', e.detail->>'task_id', e.detail->>'run_id',
                       (e.detail->>'map_index')::integer, e.attempt
                FROM {schema}.ledger_events AS e
                WHERE e.key = k AND e.seq <= v_through AND e.event::text = 'claimed'
                  AND e.detail->>'dag_id' IS NOT NULL AND e.detail->>'task_id' IS NOT NULL
                  AND e.detail->>'run_id' IS NOT NULL
            ) AS c
            GROUP BY c.dag_id, c.task_id, c.run_id, c.map_index
        ), written AS (
            INSERT INTO {schema}.pruned_claims AS p
                (key, dag_id, task_id, run_id, map_index, attempt, pruned_at)
            SELECT k, c.dag_id, c.task_id, c.run_id, c.map_index, c.attempt, clock_timestamp()
            FROM claims AS c
            RETURNING p.dag_id, p.task_id, p.run_id, p.map_index, p.attempt
        )
        SELECT jsonb_agg(jsonb_build_object('dag_id', w.dag_id, 'task_id', w.task_id,
                                            'run_id', w.run_id, 'map_index', w.map_index,
                                            'attempt', w.attempt)
                         ORDER BY w.dag_id, w.task_id, w.run_id, w.map_index)
        INTO v_claims FROM written AS w;

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
                'by', session_user::text, 'on_behalf_of', p_on_behalf_of,
                'claims', v_claims)));
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
