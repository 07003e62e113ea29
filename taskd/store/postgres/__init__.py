"""The job store on PostgreSQL, shared by several daemons: `PostgresStore` in `.store`.

Nothing is imported here, so that `taskd.outbox` (for applications) can use `.dialect`
without loading asyncpg.
"""
