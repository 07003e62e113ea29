"""The table from each declared method to its one handler, and the error replies of the
domain's exceptions: stable codes are given here, and nowhere else."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any, NamedTuple

from taskd.deferred import Deferred
from taskd.protocol import METHODS, ErrorCode, Method, P, Params, R, RpcError
from taskd.scheduler import AmbiguousSchedule, UnknownSchedule
from taskd.store import InvalidTransition, JobNotFound, StoreError
from taskd.submit import PayloadInvalid, Refused, UnknownTask

Handler = Callable[[Any], Awaitable[Any]]


class Binding(NamedTuple):
    method: Method[Any, Any]
    handler: Handler


def bind(method: Method[P, R], handler: Callable[[P], Awaitable[R | Deferred[R]]]) -> Binding:
    """`handler` answers `method` (typed: it takes the method's params, gives its result,
    or a Deferred one)."""
    return Binding(method, handler)


class Dispatch:
    """Calls the handler of a method. Built from the bindings of every concern, it refuses
    to exist unless each method the service answers has exactly one handler."""

    def __init__(self, *groups: Iterable[Binding]) -> None:
        handlers: dict[str, Handler] = {}
        for method, handler in (binding for group in groups for binding in group):
            if method.name in handlers or method.connection:
                raise ValueError(f"method {method.name} is answered twice")
            handlers[method.name] = handler
        unanswered = [
            m.name for m in METHODS.values() if not m.connection and m.name not in handlers
        ]
        if unanswered:
            raise ValueError(f"no handler for {', '.join(unanswered)}")
        self._handlers = handlers

    async def __call__(self, method: str, params: Params) -> Any:
        """The result of `method` (a name the server has checked), or RpcError; or a
        Deferred result, whose errors are given the same codes."""
        try:
            result = await self._handlers[method](params)
        except Exception as exc:
            error = rpc_error(exc)
            if error is None:
                raise
            raise error from None
        if isinstance(result, Deferred):
            result.translate = rpc_error
        return result

    async def call(self, method: Method[P, R], params: P) -> R:
        """`method`'s result, typed (for callers in the daemon, such as the HTTP API)."""
        result = await self(method.name, params)
        if isinstance(result, Deferred):
            result = await result.result()
        typed: R = result
        return typed


def rpc_error(exc: BaseException) -> RpcError | None:
    """The error reply a domain exception stands for; None for any other exception."""
    if isinstance(exc, RpcError):
        return exc
    if isinstance(exc, Refused):
        return _refusal(exc)
    if isinstance(exc, UnknownSchedule):
        return RpcError(ErrorCode.UNKNOWN_SCHEDULE, str(exc), {"schedule": exc.reference})
    if isinstance(exc, AmbiguousSchedule):
        return RpcError(ErrorCode.INVALID_PARAMS, str(exc))
    if isinstance(exc, JobNotFound):
        return RpcError(ErrorCode.UNKNOWN_JOB, str(exc), {"id": exc.job_id})
    if isinstance(exc, InvalidTransition):
        return RpcError(ErrorCode.CONFLICT, str(exc))
    if isinstance(exc, StoreError):
        return RpcError(ErrorCode.STORE_ERROR, str(exc))
    return None


def _refusal(exc: Refused) -> RpcError:
    """The error reply for a request the submitter refused."""
    data: dict[str, Any] = {} if exc.index is None else {"index": exc.index}
    if isinstance(exc, UnknownTask):
        return RpcError(ErrorCode.UNKNOWN_TASK, str(exc), {"task": exc.name, **data})
    code = (
        ErrorCode.PAYLOAD_INVALID if isinstance(exc, PayloadInvalid) else ErrorCode.INVALID_PARAMS
    )
    return RpcError(code, str(exc), data or None)
