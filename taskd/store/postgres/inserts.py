"""Inserting jobs: one statement per round, unique keys resolved against the active jobs.

No asyncpg here.
"""

from __future__ import annotations

from taskd.store.postgres.schema import channel

INSERT_ROUNDS = 3  # an insert that met an active job which then finished is tried again

# One row per job, in order; `{s}.now()` is the store's clock. The statement tells the other
# daemons itself (at its commit), so that it needs no transaction around it.
INSERT_SQL = """
WITH new AS (
    INSERT INTO {s}.jobs (task, status, origin, payload, priority, run_at, max_attempts, key,
                          parent_id, created_at)
    SELECT task, 'pending', origin, payload, priority, coalesce(run_at, {s}.now() + delay),
           max_attempts, key, parent_id, {s}.now()
    FROM unnest({p1}::text[], {p2}::text[], {p3}::bytea[], {p4}::integer[],
                {p5}::double precision[], {p6}::double precision[], {p7}::integer[],
                {p8}::text[], {p9}::bigint[]) WITH ORDINALITY
         AS v(task, origin, payload, priority, run_at, delay, max_attempts, key, parent_id, n)
    ORDER BY n
    ON CONFLICT DO NOTHING
    RETURNING id, task, key, run_at - {s}.now() AS due_in
), notice AS (
    SELECT pg_notify('{channel}', json_build_object('sender', {p10}::text,
                                                    'due', min(due_in))::text)
    FROM new HAVING count(*) > 0
)
SELECT id, task, key, due_in, (SELECT count(*) FROM notice) AS told FROM new
"""

ACTIVE_KEYS_SQL = """
SELECT id, task, key FROM {s}.jobs
WHERE key IS NOT NULL AND status IN ('pending', 'running')
  AND (task, key) IN (SELECT * FROM unnest({p1}::text[], {p2}::text[]))
"""


def statement(template: str, schema: str) -> str:
    """A template with its schema, its channel, and `$1`-style parameters."""
    marks = {f"p{n}": f"${n}" for n in range(1, 11)}
    return template.format(s=schema, channel=channel(schema), **marks)
