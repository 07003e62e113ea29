"""The job store written once for both backends: its operations, their events, its methods.

An operation is a generator: it yields SQL statements and gets back their rows, without
doing any I/O itself (the way h11 writes HTTP), so that SQLite's writer thread drives it
with plain calls and asyncpg with `await`. The SQL that SQLite and PostgreSQL write
differently is each backend's dialect (`Dialect`); the rest is written here once.

A new operation is a method of `Store` (base.py), its generator here (jobs, nodes,
schedules, activity or reads), and its method in `SqlStore`; the dialects only if its SQL
must differ between the databases, the schemas only if it keeps something new.
"""
