"""The PostgreSQL schema: its migrations (each a list of statements), and its channel.

Every object lives in one PostgreSQL schema (`taskd` unless `[postgres] schema` says
otherwise), so that taskd's tables can share an application's database. `{s}` in the
statements is that schema's name. No asyncpg here: `taskd.outbox` imports this module.
"""

from __future__ import annotations

from taskd.store.core.migrations import TRACEPARENT_COLUMN

# The store's "now", in seconds since the epoch: the database's clock (the statement's
# start), unless a session sets `taskd.now` (the tests' clock, which the store passes in).
NOW_FUNCTION = """
CREATE OR REPLACE FUNCTION {s}.now() RETURNS double precision LANGUAGE sql STABLE AS $$
    SELECT coalesce(
        nullif(current_setting('taskd.now', true), '')::double precision,
        extract(epoch FROM statement_timestamp())::double precision)
$$
"""

# A write's notice to the other daemons (`payload` on `channel`), sent only if a node other
# than the writer's own (`node`; NULL: an application's insert, taskd.outbox) is alive: a
# lone daemon's writes cost its server no NOTIFY, relayed back to its own listening
# connection for nothing (its server's CPU per lone insert, net of this function's ~6 µs:
# ~265 -> ~237 µs; the daemon's instructions per enqueue: -12k). Each statement of a
# volatile function takes a snapshot of its own: the read of the nodes sees every
# registration that committed before the shared lock was granted. A node that registers
# then waits for the lock, exclusively (`notices.NODES_BARRIER_SQL`), before it reads what
# it waits for: a write that did not see it holds the lock until it commits, so that the
# node's reads see it. Returns whether it sent the notice.
NOTIFY_FUNCTION = """
CREATE FUNCTION {s}.notify(channel text, node text, payload text) RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM pg_advisory_xact_lock_shared(hashtextextended(channel || chr(31) || 'nodes', 0));
    IF EXISTS (SELECT FROM {s}.nodes WHERE expires >= {s}.now() AND id IS DISTINCT FROM node)
    THEN
        PERFORM pg_notify(channel, payload);
        RETURN true;
    END IF;
    RETURN false;
END
$$
"""

# Version N of the schema is MIGRATIONS[:N]; {s}.migrations holds the versions applied.
# Never edit a released migration: add one.
MIGRATIONS: list[list[str]] = [
    [
        NOW_FUNCTION,
        """
        CREATE TABLE {s}.jobs (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            task text NOT NULL,
            status text NOT NULL
                CHECK (status IN ('pending', 'running', 'succeeded', 'failed', 'cancelled')),
            origin text NOT NULL,
            payload bytea NOT NULL,
            result bytea,
            error text,
            attempts integer NOT NULL DEFAULT 0,
            max_attempts integer NOT NULL,
            priority integer NOT NULL DEFAULT 0,
            key text,
            crashes integer NOT NULL DEFAULT 0,
            parent_id bigint,
            run_at double precision NOT NULL,
            created_at double precision NOT NULL,
            started_at double precision,
            finished_at double precision,
            worker text,
            lease_expires double precision,
            epoch integer NOT NULL DEFAULT 0,
            waiting boolean NOT NULL DEFAULT false
        )
        """,
        # Single-flight and unique keys: one active job per (task, key).
        """
        CREATE UNIQUE INDEX jobs_active_key ON {s}.jobs (task, key)
            WHERE key IS NOT NULL AND status IN ('pending', 'running')
        """,
        "CREATE INDEX jobs_claim_order ON {s}.jobs (priority, run_at, id) WHERE status = 'pending'",
        """
        CREATE INDEX jobs_task_claim_order ON {s}.jobs (task, priority, run_at, id)
            WHERE status = 'pending'
        """,
        "CREATE INDEX jobs_pending_due ON {s}.jobs (run_at) WHERE status = 'pending'",
        "CREATE INDEX jobs_running ON {s}.jobs (task) WHERE status = 'running'",
        """
        CREATE INDEX jobs_finished ON {s}.jobs (status, finished_at)
            WHERE status IN ('succeeded', 'failed', 'cancelled')
        """,
        "CREATE INDEX jobs_task_status ON {s}.jobs (task, status)",
        """
        CREATE TABLE {s}.job_errors (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            job_id bigint NOT NULL,
            attempt integer NOT NULL,
            kind text NOT NULL,
            message text NOT NULL,
            traceback text,
            at double precision NOT NULL
        )
        """,
        "CREATE INDEX job_errors_job ON {s}.job_errors (job_id)",
        """
        CREATE TABLE {s}.schedules (
            id text PRIMARY KEY,
            last_tick double precision,
            paused boolean NOT NULL DEFAULT false,
            coalesced integer NOT NULL DEFAULT 0,
            covered_until double precision,
            fired_at double precision,
            last_jobs text NOT NULL DEFAULT '[]'
        )
        """,
        """
        CREATE TABLE {s}.schedule_ticks (
            schedule text NOT NULL,
            tick double precision NOT NULL,
            fired_at double precision NOT NULL,
            jobs text NOT NULL DEFAULT '[]',
            PRIMARY KEY (schedule, tick)
        )
        """,
        "CREATE INDEX schedule_ticks_fired ON {s}.schedule_ticks (fired_at)",
        # A heartbeat row per node, kept when it stops (`expires` NULL) so that N in its
        # workers' names (`node/N`) never repeats; `schedules` is a digest of its schedules.
        """
        CREATE TABLE {s}.nodes (
            id text PRIMARY KEY,
            worker text NOT NULL UNIQUE,
            starts integer NOT NULL,
            host text NOT NULL,
            pid integer NOT NULL,
            started_at double precision NOT NULL,
            seen_at double precision NOT NULL,
            expires double precision,
            schedules text
        )
        """,
    ],
    # Progress and logs of running jobs (`ctx.progress`, `ctx.logger`): the latest progress
    # in the job's row, its last lines in job_logs, and how many older lines were let go.
    [
        """
        ALTER TABLE {s}.jobs ADD COLUMN progress_done double precision,
            ADD COLUMN progress_total double precision, ADD COLUMN progress_message text,
            ADD COLUMN progress_at double precision,
            ADD COLUMN logs_dropped bigint NOT NULL DEFAULT 0
        """,
        """
        CREATE TABLE {s}.job_logs (
            id bigserial PRIMARY KEY,
            job_id bigint NOT NULL,
            epoch integer NOT NULL,
            seq integer NOT NULL,
            at double precision NOT NULL,
            level text NOT NULL,
            message text NOT NULL
        )
        """,
        "CREATE INDEX job_logs_job ON {s}.job_logs (job_id, id)",
    ],
    # Each attempt's start and worker, for its timeline (`taskctl why`).
    [
        "ALTER TABLE {s}.job_errors ADD COLUMN started_at double precision",
        "ALTER TABLE {s}.job_errors ADD COLUMN worker text",
    ],
    # Workflows: a job that waits for other jobs (`after`) counts the parents it still waits
    # for in `blocked`, and meanwhile keeps the time it is due in `release_at` (its `run_at`
    # is HELD, past any claim); `job_deps` links parents to children.
    [
        """
        ALTER TABLE {s}.jobs ADD COLUMN blocked integer NOT NULL DEFAULT 0,
            ADD COLUMN release_at double precision,
            ADD COLUMN after_failure text NOT NULL DEFAULT 'cancel'
        """,
        """
        CREATE TABLE {s}.job_deps (
            parent_id bigint NOT NULL,
            child_id bigint NOT NULL,
            PRIMARY KEY (parent_id, child_id)
        )
        """,
        "CREATE INDEX job_deps_child ON {s}.job_deps (child_id)",
        # Batches (`enqueue_many(..., on_finish=TASK)`): a counter row each, so that a job's
        # end costs one update of it, never a scan of the batch.
        "ALTER TABLE {s}.jobs ADD COLUMN batch_id bigint",
        "CREATE INDEX jobs_batch ON {s}.jobs (batch_id) WHERE batch_id IS NOT NULL",
        """
        CREATE TABLE {s}.batches (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            on_finish text,
            on_finish_attempts integer NOT NULL DEFAULT 3,
            total integer NOT NULL,
            ended integer NOT NULL DEFAULT 0,
            succeeded integer NOT NULL DEFAULT 0,
            failed integer NOT NULL DEFAULT 0,
            cancelled integer NOT NULL DEFAULT 0,
            created_at double precision NOT NULL,
            finished_at double precision,
            callback_id bigint
        )
        """,
    ],
    # Each worker's slots (`workers`), for `why` to count the workers busy on every daemon.
    ["ALTER TABLE {s}.nodes ADD COLUMN slots integer NOT NULL DEFAULT 0"],
    [TRACEPARENT_COLUMN.replace("{s}", "{s}.")],
    # Tasks paused (`taskctl pause NAME`): no attempt of theirs starts until resumed.
    [
        """
        CREATE TABLE {s}.paused_tasks (
            task text PRIMARY KEY,
            since double precision NOT NULL
        )
        """,
    ],
    # Rate limits (GCRA): per limit, the theoretical arrival time of its next start.
    [
        """
        CREATE TABLE {s}.rate_limits (
            kind text NOT NULL,
            name text NOT NULL,
            tat double precision NOT NULL,
            PRIMARY KEY (kind, name)
        )
        """,
    ],
    # Uniqueness windows (`unique_for`): the jobs of a task and key, by creation.
    ["CREATE INDEX jobs_task_key ON {s}.jobs (task, key, created_at) WHERE key IS NOT NULL"],
    # Per-key limits (`limit_key`): each job's key value ('' for the tasks without one), the
    # pending jobs of each key in claim order and the running ones, and each task's turn
    # among its keys (round-robin).
    [
        "ALTER TABLE {s}.jobs ADD COLUMN limit_key text NOT NULL DEFAULT ''",
        """
        CREATE INDEX jobs_task_limit_key_claim ON {s}.jobs (task, limit_key, priority, run_at, id)
            WHERE status = 'pending'
        """,
        """
        CREATE INDEX jobs_task_limit_key_running ON {s}.jobs (task, limit_key)
            WHERE status = 'running'
        """,
        """
        CREATE TABLE {s}.key_turns (
            task text PRIMARY KEY,
            last_key text,
            lap_from text,
            lap_at double precision,
            rested_at double precision,
            rested_wake double precision
        )
        """,
        "CREATE INDEX rate_limits_tat ON {s}.rate_limits (kind, tat)",
    ],
    # The Jobs page's origin filter: the newest jobs of an origin, however rare.
    ["CREATE INDEX jobs_origin ON {s}.jobs (origin, id)"],
    # The jobs per task and status, kept by triggers in the transaction of every statement
    # that makes, moves or deletes jobs: `status` and `/metrics` sum them, never count the
    # jobs. Each server process (`backend`, its pid) writes rows of its own, which no other
    # transaction writes at the same time: daemons never wait on each other for a counter.
    # `prune` folds the rows of processes that are gone into its own.
    [
        """
        CREATE TABLE {s}.job_counts (
            task text NOT NULL,
            status text NOT NULL,
            backend integer NOT NULL,
            n bigint NOT NULL,
            PRIMARY KEY (task, status, backend)
        )
        """,
        "INSERT INTO {s}.job_counts (task, status, backend, n)"
        " SELECT task, status, 0, count(*) FROM {s}.jobs GROUP BY task, status",
        """
        CREATE FUNCTION {s}.count_jobs() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF TG_OP = 'INSERT' THEN
                INSERT INTO {s}.job_counts AS c (task, status, backend, n)
                SELECT task, status, pg_backend_pid(), count(*) FROM new_rows
                GROUP BY task, status ORDER BY task, status
                ON CONFLICT (task, status, backend) DO UPDATE SET n = c.n + excluded.n;
            ELSIF TG_OP = 'DELETE' THEN
                INSERT INTO {s}.job_counts AS c (task, status, backend, n)
                SELECT task, status, pg_backend_pid(), -count(*) FROM old_rows
                GROUP BY task, status ORDER BY task, status
                ON CONFLICT (task, status, backend) DO UPDATE SET n = c.n + excluded.n;
            ELSE
                INSERT INTO {s}.job_counts AS c (task, status, backend, n)
                SELECT task, status, pg_backend_pid(), sum(n) FROM (
                    SELECT task, status, 1 AS n FROM new_rows
                    UNION ALL SELECT task, status, -1 FROM old_rows
                ) AS moved
                GROUP BY task, status HAVING sum(n) <> 0 ORDER BY task, status
                ON CONFLICT (task, status, backend) DO UPDATE SET n = c.n + excluded.n;
            END IF;
            RETURN NULL;
        END
        $$
        """,
        """
        CREATE TRIGGER jobs_counted_insert AFTER INSERT ON {s}.jobs
        REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION {s}.count_jobs()
        """,
        """
        CREATE TRIGGER jobs_counted_update AFTER UPDATE ON {s}.jobs
        REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
        FOR EACH STATEMENT EXECUTE FUNCTION {s}.count_jobs()
        """,
        """
        CREATE TRIGGER jobs_counted_delete AFTER DELETE ON {s}.jobs
        REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION {s}.count_jobs()
        """,
    ],
    # A claim's flow lock and its read of the paused tasks in one round trip: each statement
    # of a volatile function takes a snapshot of its own, so the read sees every pause that
    # committed before the lock was granted (READ COMMITTED), as a statement after it would.
    [
        """
        CREATE FUNCTION {s}.paused_after_flow_lock(flow text) RETURNS SETOF text
        LANGUAGE plpgsql VOLATILE AS $$
        BEGIN
            PERFORM pg_advisory_xact_lock_shared(hashtextextended(flow, 0));
            RETURN QUERY SELECT task FROM {s}.paused_tasks;
        END
        $$
        """,
    ],
    # Indexes that no statement needs, and that the hot path writes to (an UPDATE that
    # changes an indexed column adds the new row to every index whose WHERE it meets): the
    # pending jobs' by every insert and retry, the running jobs' by every claim. Each
    # statement that read one reads no more rows through another (EXPLAIN ANALYZE next to
    # 100,000 pending jobs): pending jobs are walked by (task, priority, run_at, id),
    # jobs_task_claim_order; a task's running jobs are the leading column of
    # jobs_task_limit_key_running, which has the same WHERE.
    [
        "DROP INDEX {s}.jobs_claim_order",
        "DROP INDEX {s}.jobs_pending_due",
        "DROP INDEX {s}.jobs_running",
    ],
    # The `limit_key` path each task's active jobs were keyed by: a start whose
    # configuration changed it keys them again, as a reload does.
    ["CREATE TABLE {s}.limit_key_paths (task text PRIMARY KEY, path text NOT NULL)"],
    # What a claim reads and locks before its claim statement, in one round trip: each keyed
    # task's turn (`turn`; locked unless it rests, made if new: taskd.store.core.keys), in
    # the order given; then the flow lock (shared) and the paused tasks after it (`paused`);
    # then of the tasks whose room it counts under their concurrency limits (`limited`)
    # those with pending jobs (one probe of the pending jobs' index each), each locked in
    # one order, so that two daemons cannot both fill the same room (`counted`). A task with
    # no pending job is not locked: the claims of several daemons do not wait for each
    # other on a limited task with nothing to start. Each statement of a volatile function
    # takes a snapshot of its own: each read sees what committed before the lock it follows,
    # and the claim statement after it counts the running jobs of the claims that held them.
    [
        """
        CREATE FUNCTION {s}.claim_start(flow text, prefix text, keyed text[], limited text[])
        RETURNS TABLE (t_kind text, t_task text, t_last_key text, t_lap_from text,
                       t_lap_at double precision, t_rested_at double precision,
                       t_rested_wake double precision, t_now double precision)
        LANGUAGE plpgsql VOLATILE AS $$
        DECLARE
            turn text;
            pending text[];
        BEGIN
            FOREACH turn IN ARRAY keyed LOOP
                RETURN QUERY SELECT 'turn', k.task, k.last_key, k.lap_from, k.lap_at,
                    k.rested_at, k.rested_wake, {s}.now() FROM {s}.key_turns AS k
                WHERE k.task = turn AND k.rested_at IS NOT NULL
                    AND (k.rested_wake IS NULL OR {s}.now() < k.rested_wake);
                IF NOT FOUND THEN
                    RETURN QUERY SELECT 'turn', k.task, k.last_key, k.lap_from, k.lap_at,
                        k.rested_at, k.rested_wake, {s}.now() FROM {s}.key_turns AS k
                    WHERE k.task = turn AND NOT (k.rested_at IS NOT NULL
                        AND (k.rested_wake IS NULL OR {s}.now() < k.rested_wake))
                    FOR UPDATE OF k;
                END IF;
                IF NOT FOUND THEN  -- new, or it came to rest meanwhile: the lock decides
                    INSERT INTO {s}.key_turns AS k (task) VALUES (turn)
                    ON CONFLICT ON CONSTRAINT key_turns_pkey DO NOTHING;
                    RETURN QUERY SELECT 'turn', k.task, k.last_key, k.lap_from, k.lap_at,
                        k.rested_at, k.rested_wake, {s}.now() FROM {s}.key_turns AS k
                    WHERE k.task = turn FOR UPDATE OF k;
                END IF;
            END LOOP;
            PERFORM pg_advisory_xact_lock_shared(hashtextextended(flow, 0));
            RETURN QUERY SELECT 'paused', p.task, NULL, NULL, NULL::double precision,
                NULL::double precision, NULL::double precision, NULL::double precision
            FROM {s}.paused_tasks AS p;
            SELECT array_agg(t.task) INTO pending FROM unnest(limited) AS t(task)
            WHERE NOT EXISTS (SELECT 1 FROM {s}.paused_tasks AS p WHERE p.task = t.task)
              AND t.task = (SELECT j.task FROM {s}.jobs AS j WHERE j.status = 'pending'
                            AND j.task >= t.task ORDER BY j.task, j.priority, j.run_at, j.id
                            LIMIT 1);
            PERFORM pg_advisory_xact_lock(k) FROM (
                SELECT DISTINCT hashtextextended(prefix || t.task, 0) AS k
                FROM unnest(pending) AS t(task) ORDER BY k) AS keys;
            RETURN QUERY SELECT 'counted', t.task, NULL, NULL, NULL::double precision,
                NULL::double precision, NULL::double precision, NULL::double precision
            FROM unnest(pending) AS t(task);
        END
        $$
        """,
        # Whether jobs wait for this one (`after`), as a job's end reads it in the statement
        # that records it: a snapshot of its own, taken after the end's UPDATE got the row,
        # sees the link of an insert that held the row (FOR SHARE) until its commit.
        """
        CREATE FUNCTION {s}.has_children(parent bigint) RETURNS boolean
        LANGUAGE plpgsql VOLATILE AS $$
        BEGIN
            RETURN EXISTS (SELECT 1 FROM {s}.job_deps WHERE parent_id = parent);
        END
        $$
        """,
    ],
    # The claim statement and its next-due statement planned once per connection, not at
    # each claim: PostgreSQL's plan cache kept choosing a custom plan for them, planned at
    # every execution (planning 1.2-3.4 ms vs execution 1.1 ms mid-drain, on a store of
    # 600,000 pending jobs), for the same plan as the generic one. claim_start sets it for
    # the rest of its transaction, unless a keyed task's turn walks in this claim: the
    # walk's statements (and the keyed claim by ids) keep their custom plans, planned with
    # the table's size as it is, where a generic plan made while the table was small (a
    # fresh store) read all pending jobs at each claim (by the partial index of the
    # pending jobs, for a few ids). The claim's statements compare a status with a
    # literal, as every partial index's WHERE does, and read the jobs table by index probes
    # only, with no join whose method a row estimate chooses (dialect.QUEUES), so that
    # their generic plan reads the same indexes whatever the parameters and the table's
    # size. The writes after a claim in its transaction (the next item of a group commit)
    # plan generic too: an outcome's (FINISH_SQL) reads the running jobs' partial index.
    [
        """
        CREATE OR REPLACE FUNCTION {s}.claim_start(
            flow text, prefix text, keyed text[], limited text[])
        RETURNS TABLE (t_kind text, t_task text, t_last_key text, t_lap_from text,
                       t_lap_at double precision, t_rested_at double precision,
                       t_rested_wake double precision, t_now double precision)
        LANGUAGE plpgsql VOLATILE AS $$
        DECLARE
            turn text;
            pending text[];
            walking boolean := false;
        BEGIN
            FOREACH turn IN ARRAY keyed LOOP
                RETURN QUERY SELECT 'turn', k.task, k.last_key, k.lap_from, k.lap_at,
                    k.rested_at, k.rested_wake, {s}.now() FROM {s}.key_turns AS k
                WHERE k.task = turn AND k.rested_at IS NOT NULL
                    AND (k.rested_wake IS NULL OR {s}.now() < k.rested_wake);
                IF NOT FOUND THEN
                    walking := true;
                    RETURN QUERY SELECT 'turn', k.task, k.last_key, k.lap_from, k.lap_at,
                        k.rested_at, k.rested_wake, {s}.now() FROM {s}.key_turns AS k
                    WHERE k.task = turn AND NOT (k.rested_at IS NOT NULL
                        AND (k.rested_wake IS NULL OR {s}.now() < k.rested_wake))
                    FOR UPDATE OF k;
                END IF;
                IF NOT FOUND THEN  -- new, or it came to rest meanwhile: the lock decides
                    INSERT INTO {s}.key_turns AS k (task) VALUES (turn)
                    ON CONFLICT ON CONSTRAINT key_turns_pkey DO NOTHING;
                    RETURN QUERY SELECT 'turn', k.task, k.last_key, k.lap_from, k.lap_at,
                        k.rested_at, k.rested_wake, {s}.now() FROM {s}.key_turns AS k
                    WHERE k.task = turn FOR UPDATE OF k;
                END IF;
            END LOOP;
            IF NOT walking THEN
                PERFORM set_config('plan_cache_mode', 'force_generic_plan', true);
            ELSIF current_setting('plan_cache_mode') = 'force_generic_plan' THEN
                SET LOCAL plan_cache_mode TO DEFAULT;  -- set by a claim before, in this transaction
            END IF;
            PERFORM pg_advisory_xact_lock_shared(hashtextextended(flow, 0));
            RETURN QUERY SELECT 'paused', p.task, NULL, NULL, NULL::double precision,
                NULL::double precision, NULL::double precision, NULL::double precision
            FROM {s}.paused_tasks AS p;
            SELECT array_agg(t.task) INTO pending FROM unnest(limited) AS t(task)
            WHERE NOT EXISTS (SELECT 1 FROM {s}.paused_tasks AS p WHERE p.task = t.task)
              AND t.task = (SELECT j.task FROM {s}.jobs AS j WHERE j.status = 'pending'
                            AND j.task >= t.task ORDER BY j.task, j.priority, j.run_at, j.id
                            LIMIT 1);
            PERFORM pg_advisory_xact_lock(k) FROM (
                SELECT DISTINCT hashtextextended(prefix || t.task, 0) AS k
                FROM unnest(pending) AS t(task) ORDER BY k) AS keys;
            RETURN QUERY SELECT 'counted', t.task, NULL, NULL, NULL::double precision,
                NULL::double precision, NULL::double precision, NULL::double precision
            FROM unnest(pending) AS t(task);
        END
        $$
        """,
    ],
    # The jobs of a task without a `limit_key` have no value of one (NULL; '' is a keyed
    # task's job whose payload has none), and the index of the keyed pending jobs leaves
    # them out: an insert of theirs writes no entry there (the server's CPU a job of a batch
    # of 1,000: 20.2 -> 15.7 µs). Their value was '', as that of a keyed job with none: a
    # task whose path `limit_key_paths` does not record has none now (a start keys its jobs
    # again if its configuration gives it one). The running jobs' index keeps them all: it
    # is also the one every read of the running jobs takes (a recovery, a renewal, `list
    # --status running`, the room of an unkeyed task with a concurrency limit).
    [
        "DROP INDEX {s}.jobs_task_limit_key_claim",
        "ALTER TABLE {s}.jobs ALTER COLUMN limit_key DROP NOT NULL,"
        " ALTER COLUMN limit_key DROP DEFAULT",
        "UPDATE {s}.jobs SET limit_key = NULL WHERE limit_key IS NOT NULL"
        " AND task NOT IN (SELECT task FROM {s}.limit_key_paths)",
        """
        CREATE INDEX jobs_task_limit_key_claim ON {s}.jobs (task, limit_key, priority, run_at, id)
            WHERE status = 'pending' AND limit_key IS NOT NULL
        """,
    ],
    # The job counters as a ledger: each statement that makes, moves or deletes jobs appends
    # what it changed per task and status, a heap insert into a table with no index, where
    # the upsert of its server process's row probed and updated one (a lone insert: the
    # trigger's share of its server process's CPU 14% -> 9.5%, perf; 33.7 -> 28.2 µs an
    # insert and its commit, in a loop on the server). A row-level trigger would cost a lone
    # insert less, and a batch's jobs 2.6 µs each more (4.7 -> 7.0 µs a row of a
    # 1,000-row insert). No writer waits on another's row still. The reads sum the rows,
    # as they did; each recovery (every lease/3 in each daemon) and each prune fold them
    # into a row per task and status (`dialect.FOLD_COUNTS_SQL`): a read sums at most the
    # rows of the statements since (100,000 rows: ~25 ms). The rows kept per server
    # process are entries like any other.
    [
        "ALTER TABLE {s}.job_counts DROP CONSTRAINT job_counts_pkey, DROP COLUMN backend",
        """
        CREATE OR REPLACE FUNCTION {s}.count_jobs() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF TG_OP = 'INSERT' THEN
                INSERT INTO {s}.job_counts (task, status, n)
                SELECT task, status, count(*) FROM new_rows GROUP BY task, status;
            ELSIF TG_OP = 'DELETE' THEN
                INSERT INTO {s}.job_counts (task, status, n)
                SELECT task, status, -count(*) FROM old_rows GROUP BY task, status;
            ELSE
                INSERT INTO {s}.job_counts (task, status, n)
                SELECT task, status, sum(n) FROM (
                    SELECT task, status, 1 AS n FROM new_rows
                    UNION ALL SELECT task, status, -1 FROM old_rows
                ) AS moved
                GROUP BY task, status HAVING sum(n) <> 0;
            END IF;
            RETURN NULL;
        END
        $$
        """,
    ],
    # Every notice goes through `notify` (taskd.store.postgres.notices): sent only when some
    # other node is alive to hear it, decided in the writer's own transaction.
    [NOTIFY_FUNCTION],
]


def channel(schema: str) -> str:
    """The LISTEN/NOTIFY channel of a schema's daemons."""
    return f"taskd:{schema}"
