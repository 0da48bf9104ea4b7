-- Schema revision 0009: is_awaited() in PL/pgSQL, so that its plans are cached.
--
-- commit() asks is_awaited() whether a sensor waits for the key. As a SQL-language function
-- that PL/pgSQL cannot inline, it was parsed and planned again on every call: about half of
-- commit()'s server time (75 of 136 microseconds per effect, measured with
-- track_functions = 'all'). As PL/pgSQL, its two index probes are planned once per session.
-- Same result and the same locking as revision 0002.

CREATE OR REPLACE FUNCTION {schema}.is_awaited(p_key text) RETURNS boolean
LANGUAGE plpgsql STABLE PARALLEL SAFE
AS $$
BEGIN
    RETURN EXISTS (SELECT 1 FROM {schema}.waiters AS w
                   WHERE w.key = p_key AND NOT w.is_prefix AND w.expires_at > now())
        OR EXISTS (SELECT 1 FROM {schema}.waiters AS w
                   WHERE w.is_prefix AND starts_with(p_key, w.key) AND w.expires_at > now());
END
$$;
