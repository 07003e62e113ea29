"""The client side of taskd: `Client` (blocking), `AsyncClient` (asyncio), and their errors.

from taskctl import Client
with Client() as client:
    result = client.run("jobs:send-email", {"to": "a@example.com", ...})
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from taskctl.client import Client, enqueue_params
from taskctl.errors import (
    Busy,
    Conflict,
    DaemonUnavailable,
    InvalidParams,
    JobFailed,
    PayloadInvalid,
    PermissionDenied,
    ProtocolError,
    ReloadFailed,
    RequestTimeout,
    ShuttingDown,
    StoreFailure,
    TaskdError,
    UnknownJob,
    UnknownSchedule,
    UnknownTask,
    WaitTimeout,
)

if TYPE_CHECKING:
    from taskctl.aio import AsyncClient

__all__ = [
    "AsyncClient",
    "Busy",
    "Client",
    "Conflict",
    "DaemonUnavailable",
    "InvalidParams",
    "JobFailed",
    "PayloadInvalid",
    "PermissionDenied",
    "ProtocolError",
    "ReloadFailed",
    "RequestTimeout",
    "ShuttingDown",
    "StoreFailure",
    "TaskdError",
    "UnknownJob",
    "UnknownSchedule",
    "UnknownTask",
    "WaitTimeout",
    "enqueue_params",
]


def __getattr__(name: str) -> Any:
    # asyncio takes tens of milliseconds to import; the command line never needs it.
    if name == "AsyncClient":
        from taskctl.aio import AsyncClient

        return AsyncClient
    raise AttributeError(f"module 'taskctl' has no attribute {name!r}")
