-- The ledger schema as the migrations leave it at their head revision (0013), in one place.
--
-- This file is the readable reference of the current schema and protocol: the types, tables,
-- indexes, constraints, identity sequences, every function, the trigger and the privileges.
-- It is NOT an install path. Databases are created and upgraded only by the migrations
-- (`eos-airflow db migrate`: migrations/versions/*.py running sql/00NN_*.sql), which also
-- record what they applied (schema_migrations, alembic_version); nothing runs this file in
-- production. One path keeps every ledger, new or upgraded, on the same SQL and the same
-- record of it; a second install path would be a second schema to keep equal. tests/ledger/test_schema_reference.py builds one database by migrating to head
-- and another by executing this file, and fails on any difference between them (functions by
-- pg_get_functiondef, tables, columns, defaults, constraints, indexes, sequences, triggers,
-- comments, owners and privileges, and pg_dump --schema-only of both). A new revision that
-- changes the schema changes this file in the same commit.
--
-- Placeholders, as in every file of sql/ (rendered by eos_airflow.ledger.queries.render):
-- {schema} is the quoted ledger schema, {channel_literal} the NOTIFY channel of that schema
-- as a string literal, and a literal brace is written twice.
--
-- Function bodies are byte for byte the bodies the migrations install (PostgreSQL stores and
-- compares them as text); the comments above each function say what it does in the protocol.
-- docs/guarantees.md and docs/twophase.md explain the protocol itself.
--
-- Contents:
--   1. schema and types          5. chunks and source offsets     9. recovery
--   2. tables and indexes        6. outbox and inbox             10. operator actions
--   3. helpers                   7. waiters (sensors)            11. append-only events
--   4. one-database protocol     8. multi-database protocol      12. privileges

-- ==========================================================================================
-- 1. Schema and types
-- ==========================================================================================

-- The ledger lives in its own schema (`eos` by default; any plain lowercase identifier).
CREATE SCHEMA {schema};

-- Lifecycle of an effect key (eos_airflow.ledger.tables.EFFECT_STATES):
--   running    an attempt claimed the key and has not committed or failed yet
--   committed  an attempt's writes and the ledger's mark committed in one transaction
--   failed     the last attempt rolled back; the next claim runs the key again
--   reopened   an operator reopened a committed key (0003); the next claim runs it again
CREATE TYPE {schema}.effect_state AS ENUM ('running', 'committed', 'failed', 'reopened');

-- Kinds of audit events; every protocol decision appends one (tables.EVENT_KINDS says what
-- each records). Labels added by later revisions come after the first six, in their order.
CREATE TYPE {schema}.event_kind AS ENUM (
    'claimed', 'committed', 'replaced', 'skipped', 'fenced', 'failed',  -- 0001
    'reopened',                                                         -- 0003
    'checkpoint', 'resumed', 'offsets',                                 -- 0004
    'prepared', 'decided', 'aborted', 'recovered',                      -- 0005
    'pruned',                                                           -- 0006
    'mismatch', 'announced'                                             -- 0013
);

-- ==========================================================================================
-- 2. Tables and indexes
-- ==========================================================================================
-- Keys use the C collation: byte-wise order, the same on every server, and prefix scans
-- (LIKE 'sales/%') can use the primary key index.

-- One row per effect key: its state, the attempt that owns it (owner token) or last ran it,
-- where that attempt runs, the committed result and version, and the head of the key's
-- hash chain of events (event_seq, last_hash).
CREATE TABLE {schema}.ledger (
    key text COLLATE "C" NOT NULL,
    state {schema}.effect_state NOT NULL,
    attempt integer NOT NULL,
    owner uuid,
    dag_id text,
    task_id text,
    run_id text,
    map_index integer,
    host text,
    pid integer,
    result jsonb,
    version integer DEFAULT 0 NOT NULL,
    claimed_at timestamp with time zone NOT NULL,
    committed_at timestamp with time zone,
    updated_at timestamp with time zone NOT NULL,
    event_seq bigint DEFAULT 0 NOT NULL,
    last_hash bytea NOT NULL,
    CONSTRAINT ledger_pkey PRIMARY KEY (key)
);
COMMENT ON COLUMN {schema}.ledger.owner IS 'token of the live claim, if any';
CREATE INDEX ledger_origin_idx ON {schema}.ledger (dag_id, task_id, run_id);
CREATE INDEX ledger_state_idx ON {schema}.ledger (state);

-- What the ledger row does not hold about a key's committed versions (0013): the input
-- fingerprint of the version (check_fingerprint() compares a skip's with it) and the highest
-- version announced to Airflow (announce()). A row only for keys that have either.
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

-- The audit trail: every decision about a key, numbered per key (seq) and hash-chained
-- (hash = event_hash(prev_hash, ...)); append-only (section 11), verified by
-- `eos-airflow ledger verify`.
CREATE TABLE {schema}.ledger_events (
    id bigint GENERATED BY DEFAULT AS IDENTITY NOT NULL,
    key text COLLATE "C" NOT NULL,
    seq bigint NOT NULL,
    event {schema}.event_kind NOT NULL,
    attempt integer NOT NULL,
    at timestamp with time zone NOT NULL,
    detail jsonb NOT NULL,
    prev_hash bytea NOT NULL,
    hash bytea NOT NULL,
    CONSTRAINT ledger_events_pkey PRIMARY KEY (id),
    CONSTRAINT ledger_events_key_seq_key UNIQUE (key, seq)
);
CREATE INDEX ledger_events_at_idx ON {schema}.ledger_events (at);

-- Every revision applied, with the checksum of what it ran (ledger/migrate.py: the sha256 of
-- the sha256sum listing of the revision's wrapper and the SQL files it executes; revisions
-- recorded by eos-airflow before this form carry the wrapper's sha256).
CREATE TABLE {schema}.schema_migrations (
    revision text NOT NULL,
    description text NOT NULL,
    checksum text NOT NULL,
    package_version text NOT NULL,
    applied_at timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT schema_migrations_pkey PRIMARY KEY (revision)
);
COMMENT ON COLUMN {schema}.schema_migrations.checksum IS 'sha256 of the migration file';

-- Alembic's own record of the current revision (created by Alembic, one row).
CREATE TABLE {schema}.alembic_version (
    version_num character varying(32) NOT NULL,
    CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num)
);

-- Live waiters of LedgerSensor / LedgerTrigger (0002): commit() notifies only keys someone
-- waits for. A row expires unless its listener refreshes it.
CREATE TABLE {schema}.waiters (
    key text COLLATE "C" NOT NULL,
    is_prefix boolean NOT NULL,
    listener text NOT NULL,
    expires_at timestamp with time zone NOT NULL,
    CONSTRAINT waiters_pkey PRIMARY KEY (key, is_prefix, listener)
);
COMMENT ON COLUMN {schema}.waiters.key IS 'an effect key, or a key prefix when is_prefix';
COMMENT ON COLUMN {schema}.waiters.listener IS 'the waiting process (host:pid:token)';
CREATE INDEX waiters_prefix_idx ON {schema}.waiters (key) WHERE is_prefix;
CREATE INDEX waiters_listener_idx ON {schema}.waiters (listener);

-- Recovery points of chunked effects (0004): where each committed chunk of the version being
-- written ended in its source, so that a retry continues after the newest one.
CREATE TABLE {schema}.recovery_points (
    key text COLLATE "C" NOT NULL,
    version integer NOT NULL,
    seq integer NOT NULL,
    attempt integer NOT NULL,
    rows bigint NOT NULL,
    position jsonb,
    state jsonb,
    at timestamp with time zone NOT NULL,
    CONSTRAINT recovery_points_pkey PRIMARY KEY (key, version, seq)
);
COMMENT ON COLUMN {schema}.recovery_points.version IS 'the effect version being written';
COMMENT ON COLUMN {schema}.recovery_points.rows IS 'source items consumed up to this point';

-- The last committed position of each named source (0004), written in the transaction of
-- the effect that consumed up to it.
CREATE TABLE {schema}.offsets (
    source text COLLATE "C" NOT NULL,
    position jsonb,
    key text COLLATE "C" NOT NULL,
    attempt integer NOT NULL,
    updated_at timestamp with time zone NOT NULL,
    CONSTRAINT offsets_pkey PRIMARY KEY (source)
);
COMMENT ON COLUMN {schema}.offsets.key IS 'the effect that committed this position';

-- Where each pruned key's remaining chain starts (0006, `ledger gc`), so that verification
-- still covers what remains.
CREATE TABLE {schema}.pruned_chains (
    key text COLLATE "C" NOT NULL,
    through_seq bigint NOT NULL,
    through_hash bytea NOT NULL,
    events bigint NOT NULL,
    versions integer NOT NULL,
    pruned_at timestamp with time zone NOT NULL,
    CONSTRAINT pruned_chains_pkey PRIMARY KEY (key)
);
COMMENT ON COLUMN {schema}.pruned_chains.through_seq IS 'events 1..through_seq were removed';
COMMENT ON COLUMN {schema}.pruned_chains.through_hash IS 'hash of event through_seq: the prev_hash of the first remaining event';
COMMENT ON COLUMN {schema}.pruned_chains.versions IS 'committed and replaced events among the removed ones';

-- Per key and task instance, the highest try whose `claimed` event `ledger gc` removed (0012):
-- claim() fences with the remaining events and this table together. Nothing deletes from it.
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

-- The coordinator's decision log of multi-database effects (0005): one row per global
-- transaction, written before anything is prepared and decided in the same transaction as
-- the key's commit. Presumed abort: a txid without a `commit` decision never commits.
CREATE TABLE {schema}.twophase (
    txid text COLLATE "C" NOT NULL,
    key text COLLATE "C",
    attempt integer NOT NULL,
    owner uuid,
    protocol text NOT NULL,
    participants jsonb NOT NULL,
    decision text,
    outcome text,
    created_at timestamp with time zone DEFAULT clock_timestamp() NOT NULL,
    decided_at timestamp with time zone,
    resolved_at timestamp with time zone,
    CONSTRAINT twophase_pkey PRIMARY KEY (txid),
    CONSTRAINT twophase_protocol_check CHECK (protocol IN ('2pc', '3pc')),
    CONSTRAINT twophase_decision_check CHECK (decision IN ('commit', 'abort')),
    CONSTRAINT twophase_outcome_check CHECK (outcome IN ('committed', 'aborted'))
);
COMMENT ON COLUMN {schema}.twophase.participants IS 'name -> gid and conn_id: where each participant''s prepared transaction lives';
COMMENT ON COLUMN {schema}.twophase.decision IS 'NULL while undecided (presumed abort), commit or abort';
COMMENT ON COLUMN {schema}.twophase.outcome IS 'set once every participant finished: committed or aborted';
CREATE INDEX twophase_key_idx ON {schema}.twophase (key);
CREATE INDEX twophase_unresolved_idx ON {schema}.twophase (created_at) WHERE outcome IS NULL;

-- A participant's three-phase-commit votes (0005): the first vote written for a txid wins
-- (its primary key decides).
CREATE TABLE {schema}.precommits (
    txid text COLLATE "C" NOT NULL,
    key text COLLATE "C",
    attempt integer NOT NULL,
    state text NOT NULL,
    participants jsonb NOT NULL,
    result jsonb,
    at timestamp with time zone DEFAULT clock_timestamp() NOT NULL,
    CONSTRAINT precommits_pkey PRIMARY KEY (txid),
    CONSTRAINT precommits_state_check CHECK (state IN ('precommitted', 'aborted'))
);
COMMENT ON COLUMN {schema}.precommits.state IS 'the first vote written for the txid: precommitted (will commit) or aborted';

-- The transactional outbox (0007): `eos.publish(...)` inserts in the effect's transaction, a
-- relay delivers undelivered rows in id order with their message_id and marks them.
-- message_id derives from (effect_key, version, seq), so a retry publishes the same ids.
CREATE TABLE {schema}.outbox (
    id bigint GENERATED BY DEFAULT AS IDENTITY NOT NULL,
    effect_key text COLLATE "C" NOT NULL,
    version integer NOT NULL,
    seq integer NOT NULL,
    message_id uuid NOT NULL,
    destination text NOT NULL,
    message_key text,
    payload jsonb NOT NULL,
    headers jsonb DEFAULT '{{}}'::jsonb NOT NULL,
    created_at timestamp with time zone DEFAULT clock_timestamp() NOT NULL,
    delivered_at timestamp with time zone,
    delivered_by text,
    CONSTRAINT outbox_pkey PRIMARY KEY (id),
    CONSTRAINT outbox_message_id_key UNIQUE (message_id),
    CONSTRAINT outbox_effect_seq_key UNIQUE (effect_key, version, seq)
);
COMMENT ON COLUMN {schema}.outbox.destination IS 'scheme:name, e.g. nats:alerts.high or kafka:alerts';
COMMENT ON COLUMN {schema}.outbox.delivered_by IS 'relay identity that delivered the message';
CREATE INDEX outbox_pending_idx ON {schema}.outbox (id) WHERE delivered_at IS NULL;

-- The consumers' inbox (0007): message ids a consumer applied, committed with its writes.
CREATE TABLE {schema}.inbox (
    consumer text COLLATE "C" NOT NULL,
    message_id text COLLATE "C" NOT NULL,
    source text NOT NULL,
    received_at timestamp with time zone DEFAULT clock_timestamp() NOT NULL,
    CONSTRAINT inbox_pkey PRIMARY KEY (consumer, message_id)
);
COMMENT ON COLUMN {schema}.inbox.source IS 'where the message was read, e.g. kafka:alerts/0@17';

-- ==========================================================================================
-- 3. Helpers (pure, or reading only; callable by everyone)
-- ==========================================================================================

-- lock_id (0001): the session advisory lock an attempt holds while it owns a key. When the
-- owner's process dies, PostgreSQL ends its session and frees the lock: this is how a
-- claimant learns that the owner is gone, without clocks or leases.
CREATE FUNCTION {schema}.lock_id(p_key text, p_owner uuid) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT hashtextextended(p_key || '/' || p_owner::text, 0) $$;

-- offset_lock_id (0004): the transaction lock serialising effects that read or advance one
-- source, also when the source has no row yet. Seed 1; key locks use seed 0.
CREATE FUNCTION {schema}.offset_lock_id(p_source text) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT hashtextextended('offsets/' || p_source, 1) $$;

-- owner_alive (0010): the one test of whether an owner token's attempt still lives (its
-- session holds lock_id). claim() takes a key over, and recovery touches an attempt, only
-- when it is false.
CREATE FUNCTION {schema}.owner_alive(p_key text, p_owner uuid) RETURNS boolean
LANGUAGE sql VOLATILE
AS $$
    SELECT p_owner IS NOT NULL
        AND NOT pg_try_advisory_xact_lock_shared({schema}.lock_id(p_key, p_owner))
$$;

-- event_hash (0001): SHA-256 over the previous hash and a canonical encoding of the event
-- (key, seq, event, attempt, at in microseconds, detail), joined by U+001F.
-- eos_airflow/ledger/chain.py computes the same to verify a chain.
CREATE FUNCTION {schema}.event_hash(
    p_prev bytea, p_key text, p_seq bigint, p_event {schema}.event_kind, p_attempt integer,
    p_at timestamptz, p_detail jsonb
) RETURNS bytea
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
    SELECT sha256(p_prev || convert_to(concat_ws(chr(31), p_key, p_seq, p_event, p_attempt,
        (extract(epoch FROM p_at) * 1000000)::bigint, p_detail::text), 'UTF8'))
$$;

-- append_event (0001): append event p_seq of p_key after p_prev and return its hash. The
-- caller holds the key's row lock and stores (seq, hash) in the row, the chain's head.
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

-- event_detail (0013): the caller's part of an event's detail (claim, commit, mismatch,
-- announcement): {{}} for NULL; a JSON object of at most 8 kB, else EOS11.
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

-- is_awaited (0002, PL/pgSQL since 0009 so its plans are cached): does a live waiter wait
-- for p_key or a prefix of it? commit() sends NOTIFY only then.
CREATE FUNCTION {schema}.is_awaited(p_key text) RETURNS boolean
LANGUAGE plpgsql STABLE PARALLEL SAFE
AS $$
BEGIN
    RETURN EXISTS (SELECT 1 FROM {schema}.waiters AS w
                   WHERE w.key = p_key AND NOT w.is_prefix AND w.expires_at > now())
        OR EXISTS (SELECT 1 FROM {schema}.waiters AS w
                   WHERE w.is_prefix AND starts_with(p_key, w.key) AND w.expires_at > now());
END
$$;

-- ==========================================================================================
-- 4. One-database protocol: claim, run, commit or release
-- ==========================================================================================

-- claim (0001, fencing by claim history since 0008, history kept through gc since 0012,
-- p_detail joining its events' detail since 0013): step one of every effect, in its own
-- transaction, before the user's code runs. Inserts the key, or locks its row and decides:
--   run     this attempt owns the key now; prior_state is the key's state before (committed:
--           it writes a new version, on_committed=replace). It may take the key over from a
--           lower try of the same task instance or from an owner whose session ended; the
--           `claimed` event's detail says whom it took over from.
--   skip    the key is committed (result: the stored result); `refuse` if on_committed=fail
--   fenced  a higher try of the same task instance ever claimed the key (the row, the key's
--           `claimed` events and pruned_claims together know every try that claimed)
--   wait    another live attempt owns it (holder: its owner token)
-- On `run` the attempt takes its session lock lock_id(key, owner). Asynchronous commit:
-- losing a claim in a server crash is harmless, the crash also ends the attempt's session.
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

-- commit (0001; NOTIFY 0002; owner token in its event 0008; p_detail and the input
-- fingerprint 0013): called inside the effect's own
-- transaction after the user's writes. Succeeds only while p_owner owns the key, else raises
-- EOS01 so that the whole transaction, user writes included, rolls back (fencing). Writes
-- state committed, the result and version + 1, appends `committed` (or `replaced`) and
-- frees the owner's session lock.
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

-- release (0001; only failed, fenced or skipped since 0011): after the effect's transaction
-- rolled back, record why and release the key if this attempt still owns it (state failed:
-- the next claim runs it again); always drops the owner's session lock.
CREATE FUNCTION {schema}.release(
    p_key text, p_owner uuid, p_attempt integer, p_event {schema}.event_kind, p_detail jsonb
) RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
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

-- commit_outcome (0011): after a connection broke during COMMIT, learn whether the
-- attempt's commit happened (its event names the owner token); if not, release the claim
-- under the row lock, so that a late commit() of the broken session is fenced.
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

-- check_fingerprint (0013): a skipping attempt's inputs against those of the committed version
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

-- announce (0013): record that the committed version p_version was reported to Airflow (asset
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

-- ==========================================================================================
-- 5. Chunks and source offsets (0004)
-- ==========================================================================================

-- checkpoint: in a chunk's transaction after its writes; fenced like commit() (EOS01). The
-- key stays owned; records a recovery point of version + 1 and a `checkpoint` event.
CREATE FUNCTION {schema}.checkpoint(
    p_key text, p_owner uuid, p_rows bigint, p_position jsonb, p_state jsonb, p_detail jsonb
) RETURNS TABLE (seq integer, at timestamptz)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
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

-- resume: the owner continues after the newest recovery point of the version being written
-- (event `resumed`); no row when there is none (start from the beginning).
CREATE FUNCTION {schema}.resume(p_key text, p_owner uuid)
RETURNS TABLE (point_seq integer, point_rows bigint, point_position jsonb, point_state jsonb,
               point_attempt integer)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
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

-- advance_offsets: in the effect's transaction, write each source's new position (locked in
-- name order) and one `offsets` event with each source's old and new position.
CREATE FUNCTION {schema}.advance_offsets(p_key text, p_owner uuid, p_positions jsonb)
RETURNS jsonb
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
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

-- offset_position (0011): the committed position of a source, read under the source's lock
-- until the caller's transaction ends (eos.offsets).
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

-- ==========================================================================================
-- 6. Outbox and inbox (0007 tables; functions 0011)
-- ==========================================================================================

-- outbox_publish: eos.publish() -- a message of the version being written, only while
-- p_owner owns the key (EOS01 otherwise).
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

-- outbox_take: the relay takes the oldest undelivered messages for its destinations, locked
-- until its transaction ends; rows another relay holds are skipped.
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

-- outbox_mark: the relay marks the messages it delivered.
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

-- inbox_accept: a consumer's deduplication, in its effect's transaction: returns the message
-- ids it had not applied before.
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

-- ==========================================================================================
-- 7. Waiters: LedgerSensor and LedgerTrigger (0002 table; functions 0011)
-- ==========================================================================================

-- waiters_register / waiters_unregister / waiters_refresh / waiters_drop: a waiter registers
-- its keys and prefixes (before it checks their state), keeps them alive, and drops them.
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

-- watch_lock / watch_prefix_lock: a waiter's first check after registering; FOR SHARE waits
-- for a commit() in flight on these rows, so a commit before the registration is seen.
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

-- ==========================================================================================
-- 8. Multi-database protocol: two- and three-phase commit (0005; docs/twophase.md)
-- ==========================================================================================

-- twophase_begin: log the txid and its participants before anything is prepared; return the
-- key's other unresolved transactions, which the new owner finishes first.
CREATE FUNCTION {schema}.twophase_begin(
    p_txid text, p_key text, p_attempt integer, p_owner uuid, p_protocol text,
    p_participants jsonb
) RETURNS TABLE (txid text, protocol text, decision text, participants jsonb, attempt integer)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
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

-- twophase_claim: claim() and twophase_begin() in one round trip. Since 0010 it commits
-- synchronously when the attempt runs: the txid log is on disk before anything is prepared.
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
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
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
        -- claim() and twophase_begin() turned it off for this transaction: turn it on last
        PERFORM set_config('synchronous_commit', 'on', true);
    END IF;
    RETURN QUERY SELECT c.action, c.prior_state::text, c.attempt, c.version, c.result,
        c.holder, c.committed_at, v_others;
END
$$;

-- twophase_decide: the commit point -- decide `commit` and commit the key's entry in one
-- transaction, only while p_owner owns the key (EOS01) and nobody decided the txid (EOS07).
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

-- twophase_abort: decide `abort` unless decided already, and return the decision in force;
-- an unknown txid is recorded aborted so that nobody can decide it later.
CREATE FUNCTION {schema}.twophase_abort(p_txid text, p_attempt integer, p_by text,
                                        p_reason text)
RETURNS text
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
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

-- twophase_resolved: every participant finished; record the outcome. A three-phase
-- transaction the participants committed on their own is reconciled here (EOS08 on a
-- contradiction).
CREATE FUNCTION {schema}.twophase_resolved(p_txid text, p_outcome text, p_by text,
                                           p_result jsonb)
RETURNS text
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
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

-- twophase_forget (0011): an attempt that found its key committed before it prepared
-- anything removes its own undecided txid.
CREATE FUNCTION {schema}.twophase_forget(p_txid text, p_owner uuid) RETURNS void
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    DELETE FROM {schema}.twophase AS t
    WHERE t.txid = p_txid AND t.owner = p_owner AND t.decision IS NULL
$$;

-- precommit_vote (0011): a participant's three-phase vote, unless one exists; returns the
-- vote in force.
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

-- ==========================================================================================
-- 9. Recovery (`eos-airflow recover`)
-- ==========================================================================================

-- expire_claims (0011): release the claims whose owner's session ended (owner_alive false),
-- optionally only those older than p_older_than; each gets a `failed` event naming the
-- released owner token and the session's role. A live claim is never expired.
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

-- ==========================================================================================
-- 10. Operator actions (owner only: never granted to the writer)
-- ==========================================================================================

-- reopen (0003; actor from session_user since 0011): `eos-airflow ledger reopen KEY
-- --reason`: a committed, idle key goes to state reopened (result and version stay); the next
-- claim runs it again. EOS04: no such key; EOS05: not committed, or held by an attempt.
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

-- gc_prune (0006; actor from session_user since 0011; fencing history since 0012): `eos-airflow
-- ledger gc`: remove the old events of committed, idle keys, record where each remaining chain
-- starts (pruned_chains) and the highest try per task instance of the removed `claimed` events
-- (pruned_claims, also listed as `claims` in the key's hash-chained `pruned` event). The only path that deletes events.
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

-- ==========================================================================================
-- 11. Append-only events
-- ==========================================================================================

-- forbid_event_change (0001; gc_prune's exception since 0006): refuses UPDATE, DELETE and
-- TRUNCATE of ledger_events (EOS02), except gc_prune's DELETE: the transaction-local flag
-- eos.gc_prune, accepted only while the statement runs as the table's owner.
CREATE FUNCTION {schema}.forbid_event_change() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF TG_OP = 'DELETE' AND current_setting('eos.gc_prune', true) = 'on'
       AND current_user = (SELECT pg_get_userbyid(c.relowner) FROM pg_class AS c
                           WHERE c.oid = TG_RELID) THEN
        RETURN NULL;  -- gc_prune() removing a committed key's old prefix
    END IF;
    RAISE EXCEPTION 'ledger events are append-only (% refused)', TG_OP
        USING ERRCODE = 'EOS02',
              HINT = 'the audit trail cannot be edited; use eos-airflow ledger reopen to reprocess a key';
END
$$;

CREATE TRIGGER ledger_events_append_only
    BEFORE UPDATE OR DELETE OR TRUNCATE ON {schema}.ledger_events
    FOR EACH STATEMENT EXECUTE FUNCTION {schema}.forbid_event_change();

-- ==========================================================================================
-- 12. Privileges (0011)
-- ==========================================================================================
-- Every function that changes the ledger runs as the ledger's owner (SECURITY DEFINER, fixed
-- search_path), and no function but the pure helpers is PUBLIC's. The owner (the role that
-- ran `db migrate`) owns every object here. Roles are granted by `eos-airflow db grant`
-- (ledger/roles.py), not by the schema: the writer gets SELECT on the tables and EXECUTE on
-- every SECURITY DEFINER function but reopen and gc_prune; the auditor SELECT only.
-- (Upgrading to 0011 also moved existing grants: a role with INSERT on ledger got EXECUTE on
-- the protocol, and every role but the owner lost INSERT, UPDATE, DELETE and TRUNCATE on the
-- tables. A fresh database has no such grants to move.)
REVOKE ALL ON FUNCTION {schema}.append_event(text, bigint, bytea, {schema}.event_kind, integer, jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION {schema}.claim(text, uuid, integer, text, text, text, integer, text, integer, text, jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION {schema}.commit(text, uuid, jsonb, jsonb, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION {schema}.check_fingerprint(text, integer, text, integer, text, jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION {schema}.announce(text, integer, integer, jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION {schema}.release(text, uuid, integer, {schema}.event_kind, jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION {schema}.commit_outcome(text, uuid, integer, jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION {schema}.checkpoint(text, uuid, bigint, jsonb, jsonb, jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION {schema}.resume(text, uuid) FROM PUBLIC;
REVOKE ALL ON FUNCTION {schema}.advance_offsets(text, uuid, jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION {schema}.offset_position(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION {schema}.outbox_publish(text, uuid, integer, integer, uuid, text, text, jsonb, jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION {schema}.outbox_take(text[], text[], integer) FROM PUBLIC;
REVOKE ALL ON FUNCTION {schema}.outbox_mark(bigint[], text) FROM PUBLIC;
REVOKE ALL ON FUNCTION {schema}.inbox_accept(text, text[], text[]) FROM PUBLIC;
REVOKE ALL ON FUNCTION {schema}.waiters_register(text, text[], boolean[], double precision) FROM PUBLIC;
REVOKE ALL ON FUNCTION {schema}.waiters_unregister(text, text[], boolean[]) FROM PUBLIC;
REVOKE ALL ON FUNCTION {schema}.waiters_refresh(text, double precision) FROM PUBLIC;
REVOKE ALL ON FUNCTION {schema}.waiters_drop(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION {schema}.watch_lock(text[]) FROM PUBLIC;
REVOKE ALL ON FUNCTION {schema}.watch_prefix_lock(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION {schema}.twophase_begin(text, text, integer, uuid, text, jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION {schema}.twophase_claim(text, uuid, integer, text, text, text, integer, text, integer, text, text, text, jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION {schema}.twophase_decide(text, text, uuid, jsonb, jsonb, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION {schema}.twophase_abort(text, integer, text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION {schema}.twophase_resolved(text, text, text, jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION {schema}.twophase_forget(text, uuid) FROM PUBLIC;
REVOKE ALL ON FUNCTION {schema}.precommit_vote(text, text, integer, text, jsonb, jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION {schema}.expire_claims(timestamp with time zone) FROM PUBLIC;
REVOKE ALL ON FUNCTION {schema}.reopen(text, text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION {schema}.gc_prune(text[], timestamp with time zone, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION {schema}.forbid_event_change() FROM PUBLIC;
