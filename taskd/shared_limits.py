"""The shared limits (`[limits.NAME]`) of the tasks loaded, as the store counts them, and
their use, and that of the keyed tasks' values (`limit_key`), as `taskctl status`, `why`
and /metrics show it."""

from __future__ import annotations

from taskd.models import KeyedUse, LimitUse
from taskd.store import SharedLimit, Store
from taskd.tasks import TaskRegistry


def store_limits(tasks: TaskRegistry, *, unused: bool = False) -> dict[str, SharedLimit]:
    """The shared limits as a claim holds them: those that loaded tasks name (and, with
    `unused`, the others too)."""
    return {
        name: SharedLimit(limit.tasks, limit.concurrency, limit.interval)
        for name, limit in tasks.limits.items()
        if limit.tasks or unused
    }


async def keyed_uses(store: Store, tasks: TaskRegistry) -> list[KeyedUse]:
    """Each task with a `limit_key`, and how many of its values run and wait; raises
    StoreError."""
    keyed = tasks.limit_keys()
    if not keyed:
        return []
    used = await store.values_in_use(list(keyed))
    return [KeyedUse(task, path, *used[task]) for task, path in keyed.items()]


async def limit_uses(store: Store, tasks: TaskRegistry) -> list[LimitUse]:
    """Each shared limit and its use across every daemon sharing the store; raises
    StoreError."""
    if not tasks.limits:
        return []
    states = await store.limit_states(store_limits(tasks, unused=True))
    return [
        LimitUse(
            name=name,
            tasks=list(limit.tasks),
            running=states[name].running,
            waiting=states[name].waiting,
            concurrency=limit.concurrency,
            rate=limit.rate,
            next_start=states[name].next_start,
        )
        for name, limit in tasks.limits.items()
    ]
