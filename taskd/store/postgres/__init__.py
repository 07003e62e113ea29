"""The job store on PostgreSQL, shared by several daemons: `PostgresStore` in `.store`.

Nothing is imported here, so that `taskd.pg` (for applications) can use the SQL of
`.schema` and `.inserts` without loading asyncpg.
"""
