-- Named queries of the audit tools (eos-airflow ledger export | stats, doctor): reads only.

-- name: export_events
SELECT e.id, e.key, e.seq, e.event::text AS event, e.attempt, e.at, e.detail,
       encode(e.prev_hash, 'hex') AS prev_hash, encode(e.hash, 'hex') AS hash
FROM {schema}.ledger_events AS e
WHERE (%(since)s::timestamptz IS NULL OR e.at >= %(since)s)
  AND (%(prefix)s::text IS NULL OR e.key LIKE %(prefix)s ESCAPE '\')
ORDER BY e.id;

-- name: count_events
SELECT count(*) FROM {schema}.ledger_events AS e
WHERE (%(since)s::timestamptz IS NULL OR e.at >= %(since)s)
  AND (%(prefix)s::text IS NULL OR e.key LIKE %(prefix)s ESCAPE '\');

-- name: stats_by_group
-- Event counts per DAG (of the key's ledger row) or per day (UTC) of the event.
SELECT CASE WHEN %(by)s = 'day' THEN to_char(e.at AT TIME ZONE 'UTC', 'YYYY-MM-DD')
            ELSE coalesce(l.dag_id, '(no dag)') END AS grp,
       e.event::text AS event, count(*) AS n
FROM {schema}.ledger_events AS e
LEFT JOIN {schema}.ledger AS l ON l.key = e.key
WHERE (%(since)s::timestamptz IS NULL OR e.at >= %(since)s)
GROUP BY 1, 2
ORDER BY 1, 2;

-- name: commit_latency
-- Milliseconds from an attempt's claim to its commit (the event just before it).
SELECT count(*) AS n,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY ms) AS p50,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY ms) AS p95,
       percentile_cont(0.99) WITHIN GROUP (ORDER BY ms) AS p99,
       max(ms) AS max
FROM (
    SELECT e.event, e.at >= coalesce(%(since)s::timestamptz, '-infinity') AS recent,
           extract(epoch FROM e.at - lag(e.at) OVER (PARTITION BY e.key ORDER BY e.seq)) * 1000
               AS ms,
           lag(e.event) OVER (PARTITION BY e.key ORDER BY e.seq) AS before
    FROM {schema}.ledger_events AS e
) AS t
WHERE t.event IN ('committed', 'replaced') AND t.before = 'claimed' AND t.recent;

-- name: entry_states
SELECT state::text AS state, count(*) AS n FROM {schema}.ledger GROUP BY 1 ORDER BY 1;

-- name: doctor_facts
SELECT current_setting('server_version_num')::int AS server_version_num,
       current_setting('max_prepared_transactions')::int AS max_prepared_transactions,
       current_setting('synchronous_commit') AS synchronous_commit,
       current_user AS role,
       -- any revision's claim(): the doctor also looks at ledgers not migrated yet
       (SELECT bool_or(has_function_privilege(p.oid, 'EXECUTE'))
          FROM pg_proc AS p JOIN pg_namespace AS n ON n.oid = p.pronamespace
         WHERE n.nspname = %(schema)s AND p.proname = 'claim') AS can_claim,
       (SELECT tgenabled <> 'D' FROM pg_trigger
         WHERE tgname = 'ledger_events_append_only'
           AND tgrelid = format('%%I.ledger_events', %(schema)s::text)::regclass) AS append_only;

-- name: applied_migrations
SELECT revision, checksum, package_version, applied_at
FROM {schema}.schema_migrations ORDER BY applied_at, revision;

-- name: orphaned_claims
-- Running keys whose owner's session is gone (a crash): the next claim takes them over.
SELECT count(*) FROM {schema}.ledger AS l
WHERE l.owner IS NOT NULL
  AND NOT EXISTS (
      SELECT 1 FROM pg_locks AS k
      WHERE k.locktype = 'advisory' AND k.granted AND k.objsubid = 1
        AND k.database = (SELECT oid FROM pg_database WHERE datname = current_database())
        AND ((k.classid::bigint << 32) | k.objid::bigint) = {schema}.lock_id(l.key, l.owner));

-- name: recover_claims
-- Expire claims whose owner's session ended (with older_than, only those claimed before it);
-- a claim held by a live session is never expired (expire_claims, schema revision 0011).
SELECT key, attempt, run_id, claimed_at, reason
FROM {schema}.expire_claims(%(older_than)s::timestamptz);

-- name: live_claims
-- Claims held by a live session, claimed before older_than: left alone by recover, listed.
SELECT l.key, l.attempt, l.run_id, l.host, l.pid, l.claimed_at
FROM {schema}.ledger AS l
WHERE l.owner IS NOT NULL AND l.claimed_at < %(older_than)s::timestamptz
  AND {schema}.owner_alive(l.key, l.owner)
ORDER BY l.claimed_at;

-- name: chain_entries
-- What verify checks each key's events against: the chain head and the state they imply.
SELECT key, event_seq, last_hash, state::text AS state, attempt, version,
       result IS NOT NULL AS has_result
FROM {schema}.ledger ORDER BY key;

-- name: chain_starts
-- Keys whose oldest events ledger gc removed: their remaining chain starts after through_seq;
-- claims is what gc kept of the removed claims for fencing (pruned_claims).
SELECT c.key, c.through_seq, c.through_hash, c.versions,
       (SELECT coalesce(jsonb_agg(jsonb_build_array(p.dag_id, p.task_id, p.run_id,
                                                    p.map_index, p.attempt)), '[]'::jsonb)
        FROM {schema}.pruned_claims AS p WHERE p.key = c.key) AS claims
FROM {schema}.pruned_chains AS c;

-- name: newest_event
SELECT id, key, seq, hash FROM {schema}.ledger_events ORDER BY id DESC LIMIT 1;

-- name: event_totals
SELECT (SELECT count(*) FROM {schema}.ledger_events),
       (SELECT coalesce(sum(events), 0)::bigint FROM {schema}.pruned_chains);

-- name: event_hash_at
SELECT hash FROM {schema}.ledger_events WHERE key = %(key)s AND seq = %(seq)s;

-- name: gc_candidates
-- Committed, idle keys committed before the cutoff that still have events older than it
-- (other than a previous gc's `pruned` event).
SELECT l.key FROM {schema}.ledger AS l
WHERE l.state::text = 'committed' AND l.owner IS NULL AND l.committed_at < %(cutoff)s
  AND EXISTS (SELECT 1 FROM {schema}.ledger_events AS e
              WHERE e.key = l.key AND e.at < %(cutoff)s AND e.event::text <> 'pruned')
  AND (%(prefix)s::text IS NULL OR l.key LIKE %(prefix)s ESCAPE '\')
ORDER BY l.key;

-- name: gc_preview
-- What gc would remove for the given keys (dry run): events older than the cutoff, up to the
-- newest of them.
SELECT count(*) AS events FROM {schema}.ledger_events AS e
JOIN (SELECT e2.key, max(e2.seq) AS through FROM {schema}.ledger_events AS e2
      WHERE e2.key = ANY(%(keys)s) AND e2.at < %(cutoff)s GROUP BY e2.key) AS t
  ON t.key = e.key AND e.seq <= t.through;

-- name: gc_prune
SELECT pruned_key, pruned_events, pruned_through
FROM {schema}.gc_prune(%(keys)s, %(cutoff)s, %(on_behalf_of)s);

-- Reads of the audit page (eos_airflow/web).

-- name: web_entries
SELECT key, state::text AS state, attempt, version, dag_id, task_id, run_id, map_index, host,
       claimed_at, committed_at, updated_at, event_seq, result
FROM {schema}.ledger
WHERE (%(dag_id)s::text IS NULL OR dag_id = %(dag_id)s)
  AND (%(state)s::text IS NULL OR state::text = %(state)s)
  AND (%(prefix)s::text IS NULL OR key LIKE %(prefix)s ESCAPE '\')
  AND (%(since)s::timestamptz IS NULL OR updated_at >= %(since)s)
  AND (%(all_dags)s OR dag_id = ANY(%(dag_ids)s))
ORDER BY updated_at DESC, key
LIMIT %(limit)s;

-- name: web_ti_keys
-- Keys a task instance touched: the ledger rows it claimed last, and keys whose events name
-- it (a key template shared by several runs, or a later run that replaced it).
SELECT l.key FROM {schema}.ledger AS l
WHERE l.dag_id = %(dag_id)s AND l.task_id = %(task_id)s AND l.run_id = %(run_id)s
  AND l.map_index = %(map_index)s
UNION
SELECT DISTINCT e.key FROM {schema}.ledger_events AS e
WHERE e.detail @> jsonb_build_object('dag_id', %(dag_id)s::text, 'task_id', %(task_id)s::text,
                                     'run_id', %(run_id)s::text,
                                     'map_index', %(map_index)s::int)
ORDER BY 1
LIMIT 100;

-- name: web_activity
-- Commits, skips, fences and failures per hour or day (UTC) since a time.
SELECT date_trunc(%(bucket)s, e.at AT TIME ZONE 'UTC') AS bucket,
       count(*) FILTER (WHERE e.event::text IN ('committed', 'replaced')) AS commits,
       count(*) FILTER (WHERE e.event::text = 'skipped') AS skips,
       count(*) FILTER (WHERE e.event::text = 'fenced') AS fences,
       count(*) FILTER (WHERE e.event::text = 'failed') AS failures
FROM {schema}.ledger_events AS e
LEFT JOIN {schema}.ledger AS l ON l.key = e.key
WHERE e.at >= %(since)s AND (%(all_dags)s OR l.dag_id = ANY(%(dag_ids)s))
GROUP BY 1
ORDER BY 1;
