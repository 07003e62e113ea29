"""`taskd.outbox`, by the name it had first (`taskd.pg`): kept for the code that uses it."""

from taskd.outbox import EnqueueResult, enqueue, enqueue_sync

__all__ = ["EnqueueResult", "enqueue", "enqueue_sync"]
