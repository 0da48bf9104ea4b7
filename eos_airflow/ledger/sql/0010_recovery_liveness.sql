-- Schema revision 0010: recovery touches only what is provably abandoned, and a
-- multi-database claim is durable before anything is prepared.
--
-- owner_alive() is the one test of whether an owner token's attempt still lives: its session
-- holds the advisory lock claim() took (lock_id(key, owner)); when the process dies, the
-- server ends the session and frees the lock. claim() uses the same test to take a key over.
-- `eos-airflow recover` (expiring claims, aborting undecided multi-database transactions) and
-- a run that skips a committed key next to another run's live attempt now ask it before
-- they touch an attempt: a live attempt may still commit.
--
-- claim() commits asynchronously (synchronous_commit off): losing a single-database claim in a
-- server crash is harmless, because the crash also ends the attempt's session. Not so for
-- two-phase commit when the coordinator is a server of its own: if it crashes after the
-- participants PREPAREd, an asynchronous claim and transaction-id log can be lost while the
-- prepared transactions survive on the participants. The next try's claim was then a fresh
-- insert that never looked for them, `recover` read only the (lost) log, and the orphans held
-- their row locks: the next try blocked. twophase_claim() now commits with
-- synchronous_commit on whenever the attempt runs, so the log of every transaction id is on
-- disk before its attempt can prepare anything. (One WAL flush more per multi-database effect.)

-- A shared transaction-level try of the owner's lock: free only when no session holds the
-- owner's exclusive session lock. (Taken and released within the caller's transaction.)
CREATE FUNCTION {schema}.owner_alive(p_key text, p_owner uuid) RETURNS boolean
LANGUAGE sql VOLATILE
AS $$
    SELECT p_owner IS NOT NULL
        AND NOT pg_try_advisory_xact_lock_shared({schema}.lock_id(p_key, p_owner))
$$;

CREATE OR REPLACE FUNCTION {schema}.twophase_claim(
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
        -- claim() and twophase_begin() turned it off for this transaction: turn it on last
        PERFORM set_config('synchronous_commit', 'on', true);
    END IF;
    RETURN QUERY SELECT c.action, c.prior_state::text, c.attempt, c.version, c.result,
        c.holder, c.committed_at, v_others;
END
$$;
