"""The methods that maintain this daemon: reload it, prune its store, scrape its metrics."""

from __future__ import annotations

from typing import Protocol

from taskd import protocol
from taskd.config import Config, Retention
from taskd.metrics import Metrics
from taskd.models import FINISHED_STATUSES, JobStatus
from taskd.protocol import (
    MetricsParams,
    PruneParams,
    PruneResult,
    ReloadParams,
    ReloadResult,
)
from taskd.service.dispatch import Binding, bind
from taskd.store import Store


class Reloadable(Protocol):
    """The daemon, which holds the configuration and re-reads it."""

    @property
    def config(self) -> Config: ...

    async def reload(self) -> ReloadResult: ...


class NodeMethods:
    """Reload, prune and metrics."""

    def __init__(self, store: Store, daemon: Reloadable, metrics: Metrics) -> None:
        self._store = store
        self._daemon = daemon
        self._metrics = metrics

    def bindings(self) -> list[Binding]:
        return [
            bind(protocol.RELOAD, self.reload),
            bind(protocol.PRUNE, self.prune),
            bind(protocol.METRICS, self.metrics),
        ]

    async def reload(self, params: ReloadParams) -> ReloadResult:
        return await self._daemon.reload()

    async def prune(self, params: PruneParams) -> PruneResult:
        if params.older_than is not None:
            ages: dict[JobStatus, float] = dict.fromkeys(FINISHED_STATUSES, params.older_than)
        else:
            ages = retention_ages(self._daemon.config.retention)
        return PruneResult(deleted=await self._store.prune(ages))

    async def metrics(self, params: MetricsParams) -> str:
        return await self._metrics.render()


def retention_ages(retention: Retention) -> dict[JobStatus, float]:
    """Finished jobs older than these many seconds are pruned."""
    return {
        "succeeded": retention.succeeded,
        "failed": retention.failed,
        "cancelled": retention.cancelled,
    }
