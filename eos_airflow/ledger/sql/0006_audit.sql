-- Schema revision 0006: garbage collection of old history that stays verifiable.
--
-- `eos-airflow ledger gc --older-than 30d` removes the oldest events of committed, idle keys.
-- Events are append-only (trigger ledger_events_append_only), so removal has one deliberate,
-- audited path: gc_prune(), a SECURITY DEFINER function owned by the schema owner. Only it
-- sets the transaction-local flag `eos.gc_prune` the trigger accepts, and the trigger accepts
-- the flag only when the statement runs as the table owner (inside gc_prune) -- a writer role
-- that sets the flag itself is still refused.
--
-- For each pruned key, pruned_chains keeps where the remaining chain starts (the removed
-- prefix's last seq and hash, how many events and committed versions it held), and a `pruned`
-- event appended to the key's chain records the same, hash-chained: verification starts
-- each key's chain there, and removing more of it, or editing the table, is detected.
-- (New enum values are used only when gc_prune() runs, after the migration committed.)

ALTER TYPE {schema}.event_kind ADD VALUE IF NOT EXISTS 'pruned';

CREATE TABLE {schema}.pruned_chains (
    key text COLLATE "C" NOT NULL,
    through_seq bigint NOT NULL,
    through_hash bytea NOT NULL,
    events bigint NOT NULL,
    versions integer NOT NULL,
    pruned_at timestamptz NOT NULL,
    CONSTRAINT pruned_chains_pkey PRIMARY KEY (key)
);
COMMENT ON COLUMN {schema}.pruned_chains.through_seq IS 'events 1..through_seq were removed';
COMMENT ON COLUMN {schema}.pruned_chains.through_hash IS 'hash of event through_seq: the prev_hash of the first remaining event';
COMMENT ON COLUMN {schema}.pruned_chains.versions IS 'committed and replaced events among the removed ones';

CREATE OR REPLACE FUNCTION {schema}.forbid_event_change() RETURNS trigger
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

-- Remove the events older than p_cutoff of each committed, idle key in p_keys whose commit is
-- older than p_cutoff. Returns one row per pruned key. Keys that changed since they were
-- selected (claimed again, reopened, committed recently) are left alone.
CREATE FUNCTION {schema}.gc_prune(p_keys text[], p_cutoff timestamptz, p_actor text)
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
        -- nothing but the previous gc's own `pruned` event: leave it
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
            jsonb_build_object('through_seq', v_through, 'through_hash', encode(v_hash, 'hex'),
                               'events', v_events, 'versions', v_versions,
                               'older_than', p_cutoff, 'by', p_actor));
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
REVOKE EXECUTE ON FUNCTION {schema}.gc_prune(text[], timestamptz, text) FROM PUBLIC;
