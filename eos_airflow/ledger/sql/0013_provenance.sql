-- Schema revision 0013: what each version was made from, and who was told about it.
--
-- Three things an auditor or Airflow asks of a committed version, recorded in the ledger:
--
-- * Provenance. claim() and commit() take an optional p_detail (a JSON object) that joins the
--   `claimed` / `skipped` and `committed` / `replaced` events' detail: the DAG version and the
--   DAG bundle's name and version of the code that ran, and for lakehouse targets the Iceberg
--   snapshot ids or the Delta table version the effect produced. The protocol's own fields
--   (version, run_id, owner, dag_id, ...) are written after it and cannot be overridden.
-- * Input fingerprints. commit() takes an optional p_fingerprint, stored with the version
--   (versions.fingerprint) and in the commit event. check_fingerprint() compares a skipping
--   attempt's fingerprint with the committed version's and, when they differ, appends a
--   `mismatch` event (the attempt's inputs are not those the committed version was made
--   from: a changed query, changed arguments, changed code).
-- * Announcements. announce() records, once per committed version, that the version was
--   reported to Airflow as asset events (versions.announced, and an `announced` event): the
--   task that first reports a version announces it, every later skip of the same version
--   finds it announced and stays silent.
--
-- Both live in a table of their own, `versions`: adding columns to `ledger` would wait for
-- every running effect (their transactions read the ledger), and an upgrade must not. It
-- holds a row only for keys with a fingerprint or an announcement.
--
-- claim(), commit() and twophase_decide() gain trailing parameters with defaults, so every
-- existing call still resolves; the old signatures are dropped. Roles that could execute
-- the protocol (EXECUTE on release()) are granted the new functions, so a writer granted
-- before this revision keeps working without `eos-airflow db grant` again.

ALTER TYPE {schema}.event_kind ADD VALUE 'mismatch';
ALTER TYPE {schema}.event_kind ADD VALUE 'announced';

CREATE TABLE {schema}.versions (
    key text COLLATE "C" NOT NULL,
    version integer DEFAULT 0 NOT NULL,
    fingerprint text,
    announced integer DEFAULT 0 NOT NULL,
    CONSTRAINT versions_pkey PRIMARY KEY (key)
);
COMMENT ON TABLE {schema}.versions IS 'per key, what the ledger row does not hold about its committed versions: the input fingerprint and the announcements';
COMMENT ON COLUMN {schema}.versions.version IS 'the committed version the fingerprint belongs to';
COMMENT ON COLUMN {schema}.versions.fingerprint IS 'fingerprint of the inputs that version was made from (null: none given)';
COMMENT ON COLUMN {schema}.versions.announced IS 'the highest version reported to Airflow as asset events (0: none)';

-- Readers of the ledger read it too (the writer's and the auditor's SELECT).
DO $$
DECLARE
    v_ledger oid := (SELECT t.typrelid FROM pg_type AS t
                     WHERE t.oid = pg_typeof(NULL::{schema}.ledger));
    v_role oid;
BEGIN
    FOR v_role IN SELECT DISTINCT a.grantee FROM pg_class AS c, aclexplode(c.relacl) AS a
                  WHERE c.oid = v_ledger AND a.privilege_type = 'SELECT'
                    AND a.grantee NOT IN (c.relowner, 0)
    LOOP
        EXECUTE format('GRANT SELECT ON %s TO %s',
                       pg_typeof(NULL::{schema}.versions)::text::regclass, v_role::regrole);
    END LOOP;
END
$$;

-- event_detail: the caller's part of an event's detail: {{}} for NULL; a JSON object of at
-- most 8 kB, else EOS11.
CREATE FUNCTION {schema}.event_detail(p_detail jsonb) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
AS $$
BEGIN
    IF p_detail IS NULL THEN
        RETURN '{{}}'::jsonb;
    END IF;
    IF jsonb_typeof(p_detail) <> 'object' THEN
        RAISE EXCEPTION 'event detail must be a JSON object, not %', jsonb_typeof(p_detail)
            USING ERRCODE = 'EOS11';
    END IF;
    IF octet_length(p_detail::text) > 8192 THEN
        RAISE EXCEPTION 'event detail is % bytes, the limit is 8192', octet_length(p_detail::text)
            USING ERRCODE = 'EOS11';
    END IF;
    RETURN p_detail;
END
$$;

DROP FUNCTION {schema}.claim(text, uuid, integer, text, text, text, integer, text, integer, text);
CREATE FUNCTION {schema}.claim(
    p_key text, p_owner uuid, p_attempt integer,
    p_dag_id text, p_task_id text, p_run_id text, p_map_index integer,
    p_host text, p_pid integer, p_on_committed text, p_detail jsonb DEFAULT NULL
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
    v_detail jsonb := {schema}.event_detail(p_detail) || jsonb_build_object(
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



DROP FUNCTION {schema}.commit(text, uuid, jsonb);
CREATE FUNCTION {schema}.commit(p_key text, p_owner uuid, p_result jsonb,
                                p_detail jsonb DEFAULT NULL, p_fingerprint text DEFAULT NULL)
RETURNS TABLE (version integer, committed_at timestamptz)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r {schema}.ledger;
    v_at timestamptz := clock_timestamp();
    v_hash bytea;
    v_detail jsonb := {schema}.event_detail(p_detail);
BEGIN
    SELECT * INTO r FROM {schema}.ledger AS l WHERE l.key = p_key FOR UPDATE;
    IF NOT FOUND OR r.owner IS DISTINCT FROM p_owner THEN
        RAISE EXCEPTION 'effect % is owned by attempt % now', p_key, r.attempt
            USING ERRCODE = 'EOS01';
    END IF;
    IF p_fingerprint IS NOT NULL THEN
        v_detail := v_detail || jsonb_build_object('fingerprint', p_fingerprint);
    END IF;
    v_hash := {schema}.append_event(p_key, r.event_seq + 1, r.last_hash,
        CASE WHEN r.state = 'committed' THEN 'replaced'::{schema}.event_kind
             ELSE 'committed'::{schema}.event_kind END,
        r.attempt, v_detail || jsonb_build_object('version', r.version + 1, 'run_id', r.run_id,
                                                  'owner', p_owner));
    UPDATE {schema}.ledger AS l SET state = 'committed', result = p_result,
        version = r.version + 1, committed_at = v_at, updated_at = v_at, owner = NULL,
        event_seq = r.event_seq + 1, last_hash = v_hash
    WHERE l.key = p_key;
    IF p_fingerprint IS NOT NULL THEN
        INSERT INTO {schema}.versions AS v (key, version, fingerprint)
        VALUES (p_key, r.version + 1, p_fingerprint)
        ON CONFLICT (key) DO UPDATE SET version = excluded.version,
            fingerprint = excluded.fingerprint;
    END IF;
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

DROP FUNCTION {schema}.twophase_decide(text, text, uuid, jsonb);
CREATE FUNCTION {schema}.twophase_decide(p_txid text, p_key text, p_owner uuid, p_result jsonb,
                                         p_detail jsonb DEFAULT NULL,
                                         p_fingerprint text DEFAULT NULL)
RETURNS TABLE (version integer, committed_at timestamptz)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
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
    RETURN QUERY SELECT c.version, c.committed_at
        FROM {schema}.commit(p_key, p_owner, p_result, p_detail, p_fingerprint) AS c;
END
$$;

-- check_fingerprint: a skipping attempt's inputs against those of the committed version
-- p_version. Matches (true) when they are equal, when the version was committed without a
-- fingerprint, or when the key is no longer committed at p_version (nothing to compare).
-- Otherwise appends `mismatch` (detail: version, both fingerprints, what the attempt does
-- about it, and p_detail) and returns false with the committed fingerprint.
CREATE FUNCTION {schema}.check_fingerprint(p_key text, p_version integer, p_fingerprint text,
                                           p_attempt integer, p_on_mismatch text,
                                           p_detail jsonb DEFAULT NULL)
RETURNS TABLE (matches boolean, committed text)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r {schema}.ledger;
    v_hash bytea;
    v_committed text;
    v_detail jsonb := {schema}.event_detail(p_detail);
BEGIN
    IF p_on_mismatch NOT IN ('warn', 'fail', 'replace') THEN
        RAISE EXCEPTION 'on_mismatch is warn, fail or replace, not %', p_on_mismatch
            USING ERRCODE = 'EOS11';
    END IF;
    SELECT * INTO r FROM {schema}.ledger AS l WHERE l.key = p_key FOR UPDATE;
    SELECT v.fingerprint INTO v_committed FROM {schema}.versions AS v
    WHERE v.key = p_key AND v.version = p_version;
    IF NOT FOUND OR r.state <> 'committed' OR r.version <> p_version
       OR v_committed IS NULL OR v_committed = p_fingerprint THEN
        RETURN QUERY SELECT true, v_committed;
        RETURN;
    END IF;
    v_hash := {schema}.append_event(p_key, r.event_seq + 1, r.last_hash,
        'mismatch'::text::{schema}.event_kind, p_attempt,
        v_detail || jsonb_build_object('version', r.version, 'committed_fingerprint',
            v_committed, 'fingerprint', p_fingerprint, 'on_mismatch', p_on_mismatch));
    UPDATE {schema}.ledger AS l SET event_seq = r.event_seq + 1, last_hash = v_hash,
        updated_at = clock_timestamp()
    WHERE l.key = p_key;
    RETURN QUERY SELECT false, v_committed;
END
$$;

-- announce: record that the committed version p_version was reported to Airflow (asset
-- events). Returns how that version was made ('committed' or 'replaced', from its commit
-- event) when this call announces it; NULL when it was announced before, or the key is not
-- committed at p_version (a newer version exists: that one is announced by its own task).
CREATE FUNCTION {schema}.announce(p_key text, p_version integer, p_attempt integer,
                                  p_detail jsonb DEFAULT NULL)
RETURNS text
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r {schema}.ledger;
    v_hash bytea;
    v_action text;
    v_detail jsonb := {schema}.event_detail(p_detail);
BEGIN
    SELECT * INTO r FROM {schema}.ledger AS l WHERE l.key = p_key FOR UPDATE;
    IF NOT FOUND OR r.version <> p_version OR r.committed_at IS NULL
       OR EXISTS (SELECT 1 FROM {schema}.versions AS v
                  WHERE v.key = p_key AND v.announced >= p_version) THEN
        RETURN NULL;
    END IF;
    SELECT e.event::text INTO v_action FROM {schema}.ledger_events AS e
    WHERE e.key = p_key AND e.event IN ('committed', 'replaced')
      AND (e.detail->>'version')::integer = p_version
    ORDER BY e.seq DESC LIMIT 1;
    v_action := coalesce(v_action, CASE WHEN p_version = 1 THEN 'committed' ELSE 'replaced' END);
    v_hash := {schema}.append_event(p_key, r.event_seq + 1, r.last_hash,
        'announced'::text::{schema}.event_kind, p_attempt,
        v_detail || jsonb_build_object('version', p_version, 'action', v_action));
    UPDATE {schema}.ledger AS l SET event_seq = r.event_seq + 1, last_hash = v_hash,
        updated_at = clock_timestamp()
    WHERE l.key = p_key;
    INSERT INTO {schema}.versions AS v (key, announced) VALUES (p_key, p_version)
    ON CONFLICT (key) DO UPDATE SET announced = excluded.announced;
    RETURN v_action;
END
$$;

-- Privileges as in 0011: nothing that writes is PUBLIC's; roles that executed the protocol
-- (EXECUTE on release()) execute the new and changed functions too.
REVOKE ALL ON FUNCTION {schema}.claim(text, uuid, integer, text, text, text, integer, text, integer, text, jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION {schema}.commit(text, uuid, jsonb, jsonb, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION {schema}.twophase_decide(text, text, uuid, jsonb, jsonb, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION {schema}.check_fingerprint(text, integer, text, integer, text, jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION {schema}.announce(text, integer, integer, jsonb) FROM PUBLIC;
DO $$
DECLARE
    v_ns oid := (SELECT c.relnamespace FROM pg_class AS c
                 WHERE c.oid = (SELECT t.typrelid FROM pg_type AS t
                                WHERE t.oid = pg_typeof(NULL::{schema}.ledger)));
    v_role oid;
    v_fn regprocedure;
BEGIN
    FOR v_role IN SELECT DISTINCT a.grantee FROM pg_proc AS p, aclexplode(p.proacl) AS a
                  WHERE p.pronamespace = v_ns AND p.proname = 'release'
                    AND a.privilege_type = 'EXECUTE' AND a.grantee NOT IN (p.proowner, 0)
    LOOP
        FOR v_fn IN SELECT p.oid::regprocedure FROM pg_proc AS p
                    WHERE p.pronamespace = v_ns
                      AND p.proname IN ('claim', 'commit', 'twophase_decide',
                                        'check_fingerprint', 'announce')
        LOOP
            EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %s', v_fn, v_role::regrole);
        END LOOP;
    END LOOP;
END
$$;
