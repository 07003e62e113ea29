"""The table from each declared method to its one handler, and the error replies of the
domain's exceptions: stable codes are given here, and nowhere else."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any, NamedTuple, NoReturn

from taskd.deferred import Deferred
from taskd.protocol import METHODS, ErrorCode, Method, P, Params, R, RpcError
from taskd.scheduler import AmbiguousSchedule, UnknownSchedule
from taskd.store import InvalidTransition, JobNotFound, StoreError
from taskd.submit import PayloadInvalid, Refused, UnknownTask

Handler = Callable[[Any], Any]


class Binding(NamedTuple):
    method: Method[Any, Any]
    handler: Handler
    at_once: bool  # the handler answers without awaiting (see `bind_at_once`)


def bind(method: Method[P, R], handler: Callable[[P], Awaitable[R | Deferred[R]]]) -> Binding:
    """`handler` answers `method` (typed: it takes the method's params, gives its result,
    or a Deferred one)."""
    return Binding(method, handler, at_once=False)


def bind_at_once(method: Method[P, R], handler: Callable[[P], R | Deferred[R]]) -> Binding:
    """`handler` answers `method` without awaiting: it refuses the request (raises), or
    gives its result, or a Deferred one (a write it has submitted, answered at its commit).
    The control server calls it as the request arrives, with no task per request."""
    return Binding(method, handler, at_once=True)


class Dispatch:
    """Calls the handler of a method. Built from the bindings of every concern, it refuses
    to exist unless each method the service answers has exactly one handler."""

    def __init__(self, *groups: Iterable[Binding]) -> None:
        handlers: dict[str, Handler] = {}
        at_once: set[str] = set()
        for method, handler, now in (binding for group in groups for binding in group):
            if method.name in handlers or method.connection:
                raise ValueError(f"method {method.name} is answered twice")
            handlers[method.name] = handler
            if now:
                at_once.add(method.name)
        unanswered = [
            m.name for m in METHODS.values() if not m.connection and m.name not in handlers
        ]
        if unanswered:
            raise ValueError(f"no handler for {', '.join(unanswered)}")
        self._handlers = handlers
        # The methods `answer_at_once` answers (bound with `bind_at_once`).
        self.answered_at_once = frozenset(at_once)

    async def __call__(self, method: str, params: Params) -> Any:
        """The result of `method` (a name the server has checked), or RpcError; or a
        Deferred result, whose errors are given the same codes."""
        if method in self.answered_at_once:
            return self.answer_at_once(method, params)
        try:
            result = await self._handlers[method](params)
        except Exception as exc:
            _raise_translated(exc)
        return _translating(result)

    def answer_at_once(self, method: str, params: Params) -> Any:
        """As calling, for a method in `answered_at_once`: without awaiting."""
        try:
            result = self._handlers[method](params)
        except Exception as exc:
            _raise_translated(exc)
        if isinstance(result, Deferred):  # as `_translating`, inline: once per enqueue
            result.translate = rpc_error
        return result

    async def call(self, method: Method[P, R], params: P) -> R:
        """`method`'s result, typed (for callers in the daemon, such as the HTTP API)."""
        result = await self(method.name, params)
        if isinstance(result, Deferred):
            result = await result.result()
        typed: R = result
        return typed


def _raise_translated(exc: Exception) -> NoReturn:
    """Raise the error reply `exc` stands for; `exc` itself if it stands for none."""
    error = rpc_error(exc)
    if error is None:
        raise exc
    raise error from None


def _translating(result: Any) -> Any:
    """The result; a Deferred one's errors get the same error replies."""
    if isinstance(result, Deferred):
        result.translate = rpc_error
    return result


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
