"""taskd: a local task daemon. Task files import what they need from here."""

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
