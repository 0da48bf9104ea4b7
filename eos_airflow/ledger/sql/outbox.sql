-- Named queries of the transactional outbox (protocol/outbox.py, protocol/ingest.py) and the consumers' inbox.
-- {schema} is the quoted ledger schema; values are parameters.

-- name: outbox_last_seq
-- The sequence number reached by the effect version being written (committed chunks of a
-- chunked effect count; rolled-back attempts left nothing).
SELECT coalesce(max(seq), 0) AS seq FROM {schema}.outbox
WHERE effect_key = %(key)s AND version = %(version)s;

-- name: outbox_insert
-- Only while the effect's owner token owns the key, for the version being written (EOS01).
SELECT {schema}.outbox_publish(%(key)s, %(owner)s, %(version)s, %(seq)s, %(message_id)s,
                               %(destination)s, %(message_key)s, %(payload)s::jsonb,
                               %(headers)s::jsonb);

-- name: outbox_pending
-- The oldest undelivered messages of the relay's destinations; rows another relay holds
-- are skipped, rows taken here stay locked until this relay marks them delivered.
SELECT id, message_id, destination, message_key, payload, headers
FROM {schema}.outbox_take(%(exact)s::text[], %(schemes)s::text[], %(limit)s);

-- name: outbox_mark_delivered
SELECT {schema}.outbox_mark(%(ids)s::bigint[], %(relay)s) AS marked;

-- name: outbox_backlog
SELECT destination, count(*) AS pending, min(created_at) AS oldest
FROM {schema}.outbox WHERE delivered_at IS NULL GROUP BY destination ORDER BY destination;

-- name: inbox_accept
-- Message ids not applied before by this consumer; the rest are re-sent duplicates.
SELECT t.message_id
FROM {schema}.inbox_accept(%(consumer)s, %(ids)s::text[], %(sources)s::text[]) AS t(message_id);

