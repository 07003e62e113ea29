"""Inserting jobs: one statement per round, unique keys resolved against the active jobs.

No asyncpg here: `taskd.pg` builds its statement from the same parts.
"""

from __future__ import annotations

INSERT_ROUNDS = 3  # an insert that met an active job which then finished is tried again

# One row per job, in order; `{s}.now()` is the store's clock.
INSERT_SQL = """
INSERT INTO {s}.jobs (task, status, origin, payload, priority, run_at, max_attempts, key,
                      parent_id, created_at)
SELECT task, 'pending', origin, payload, priority, coalesce(run_at, {s}.now() + delay),
       max_attempts, key, parent_id, {s}.now()
FROM unnest({p1}::text[], {p2}::text[], {p3}::bytea[], {p4}::integer[],
            {p5}::double precision[], {p6}::double precision[], {p7}::integer[], {p8}::text[],
            {p9}::bigint[]) WITH ORDINALITY
     AS v(task, origin, payload, priority, run_at, delay, max_attempts, key, parent_id, n)
ORDER BY n
ON CONFLICT DO NOTHING
RETURNING id, task, key, run_at - {s}.now() AS due_in
"""

ACTIVE_KEYS_SQL = """
SELECT id, task, key FROM {s}.jobs
WHERE key IS NOT NULL AND status IN ('pending', 'running')
  AND (task, key) IN (SELECT * FROM unnest({p1}::text[], {p2}::text[]))
"""


def statement(template: str, schema: str, placeholder: str = "$") -> str:
    """A template with its schema, and `$1`-style (asyncpg) or `%s` (psycopg) parameters."""
    marks = {f"p{n}": (f"${n}" if placeholder == "$" else "%s") for n in range(1, 10)}
    return template.format(s=schema, **marks)
