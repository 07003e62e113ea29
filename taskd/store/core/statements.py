"""Statements, and the steps of an operation: the statements it yields and the rows it gets.

The SQL written once for both databases follows one convention, which each dialect renders:
`{s}.jobs` names a table (PostgreSQL puts the store's schema there, SQLite nothing), a
parameter is `:name`, and `:now` is the store's clock (PostgreSQL: `{s}.now()`; SQLite:
the clock read once for the transaction, bound as a parameter).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Generator, Sequence
from typing import Any, NamedTuple, TypeVar

from taskd.store.rows import Row

T = TypeVar("T")


class Statement(NamedTuple):
    """One statement and its parameters: a mapping of `:name`s (or, in SQLite's own SQL, a
    sequence for its `?`s); with `many`, a sequence of those, one per execution."""

    sql: str
    params: Any = ()  # none
    many: bool = False


# What an operation does: it yields statements, gets back each one's rows (none for `many`),
# and returns its result.
Steps = Generator[Statement, list[Row], T]


def run_steps(steps: Steps[T], execute: Callable[[Statement], list[Row]]) -> T:
    """Drive `steps` with a blocking `execute` (SQLite's, in its connection's thread)."""
    rows: Any = None  # nothing to send to a generator that has not started
    while True:
        try:
            statement = steps.send(rows)
        except StopIteration as done:
            result: T = done.value
            return result
        rows = execute(statement)


async def run_steps_async(
    steps: Steps[T], execute: Callable[[Statement], Awaitable[list[Row]]]
) -> T:
    """Drive `steps` with a coroutine `execute` (asyncpg's, psycopg's)."""
    rows: Any = None
    while True:
        try:
            statement = steps.send(rows)
        except StopIteration as done:
            result: T = done.value
            return result
        rows = await execute(statement)


def members(name: str, values: Sequence[Any]) -> tuple[str, dict[str, Any]]:
    """`:name_0, :name_1`: the parameters of an IN list, and their values."""
    params = {f"{name}_{n}": value for n, value in enumerate(values)}
    return ", ".join(f":{key}" for key in params), params


def compose(template: str, **parts: str) -> str:
    """A template with its `{parts}` filled in and its `{s}` left for the dialect."""
    return template.format(s="{s}", **parts)
