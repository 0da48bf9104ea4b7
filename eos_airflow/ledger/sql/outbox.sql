-- Named queries of the transactional outbox (eos_airflow/outbox) and the consumers' inbox.
-- {schema} is the quoted ledger schema; values are parameters.

-- name: outbox_last_seq
-- The sequence number reached by the effect version being written (committed chunks of a
-- chunked effect count; rolled-back attempts left nothing).
SELECT coalesce(max(seq), 0) AS seq FROM {schema}.outbox
WHERE effect_key = %(key)s AND version = %(version)s;

-- name: outbox_insert
INSERT INTO {schema}.outbox (effect_key, version, seq, message_id, destination, message_key,
                             payload, headers)
VALUES (%(key)s, %(version)s, %(seq)s, %(message_id)s, %(destination)s, %(message_key)s,
        %(payload)s::jsonb, %(headers)s::jsonb);

-- name: outbox_pending
-- The oldest undelivered messages of the relay's destinations; rows another relay holds
-- are skipped, rows taken here stay locked until this relay marks them delivered.
SELECT id, message_id::text AS message_id, destination, message_key, payload, headers
FROM {schema}.outbox
WHERE delivered_at IS NULL
  AND (destination = ANY(%(exact)s::text[])
       OR split_part(destination, ':', 1) = ANY(%(schemes)s::text[]))
ORDER BY id
LIMIT %(limit)s
FOR UPDATE SKIP LOCKED;

-- name: outbox_mark_delivered
UPDATE {schema}.outbox SET delivered_at = clock_timestamp(), delivered_by = %(relay)s
WHERE id = ANY(%(ids)s::bigint[]) AND delivered_at IS NULL;

-- name: outbox_backlog
SELECT destination, count(*) AS pending, min(created_at) AS oldest
FROM {schema}.outbox WHERE delivered_at IS NULL GROUP BY destination ORDER BY destination;

-- name: inbox_accept
-- Message ids not applied before by this consumer; the rest are re-sent duplicates.
INSERT INTO {schema}.inbox (consumer, message_id, source)
SELECT %(consumer)s, m.id, m.source
FROM unnest(%(ids)s::text[], %(sources)s::text[]) AS m(id, source)
ON CONFLICT (consumer, message_id) DO NOTHING
RETURNING message_id;
