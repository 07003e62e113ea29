"""Callbacks for one kind of notification, as the store's events and the daemon's news keep
them: one that fails is logged, and the rest still run."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)


class Listeners:
    """The callbacks for one kind of notification; calling this calls each of them."""

    __slots__ = ("_callbacks", "_kind")

    def __init__(self, kind: str) -> None:
        self._kind = kind
        self._callbacks: list[Callable[..., None]] = []

    def add(self, callback: Callable[..., None]) -> None:
        self._callbacks.append(callback)

    def __call__(self, *args: Any) -> None:
        for callback in self._callbacks:
            try:
                callback(*args)
            except Exception:
                logger.exception("a listener of %s failed", self._kind)
