"""taskd: a local task daemon. Task files import what they need from here.

The names are loaded on first use, so that taskctl, which imports the wire protocol from
this package, does not pay for the task API at every start.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from taskd.definition import Fail, Retry, TaskContext, TaskDefinition, TaskFailed, define_task

__version__ = "0.1.0"
__all__ = [
    "Fail",
    "Retry",
    "TaskContext",
    "TaskDefinition",
    "TaskFailed",
    "__version__",
    "define_task",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from taskd import definition

        return getattr(definition, name)
    raise AttributeError(f"module 'taskd' has no attribute {name!r}")
