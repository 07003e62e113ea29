"""Each declared method has exactly one handler: the connection's own (hello, subscribe,
unsubscribe), or one of the service's; the daemon cannot be built otherwise."""

from __future__ import annotations

from typing import Any

import pytest

from taskd.protocol import JOB, METHODS, STATUS, JobParams
from taskd.server import ANSWERED_HERE
from taskd.service import (
    Dispatch,
    JobMethods,
    NodeMethods,
    ScheduleMethods,
    StatusMethods,
    bind,
)

NOTHING: Any = None  # binding a handler does not use what the class would use


def concerns() -> list[Any]:
    return [
        JobMethods(NOTHING, NOTHING, NOTHING, NOTHING).bindings(),
        ScheduleMethods(NOTHING, NOTHING, NOTHING).bindings(),
        StatusMethods(NOTHING, NOTHING, NOTHING, NOTHING).bindings(),
        NodeMethods(NOTHING, NOTHING, NOTHING).bindings(),
    ]


def test_the_services_concerns_answer_every_method_once() -> None:
    Dispatch(*concerns())  # raises if a method has no handler, or two


def test_the_connection_answers_the_methods_declared_so() -> None:
    declared = {method.params for method in METHODS.values() if method.connection}
    assert declared == set(ANSWERED_HERE)


def test_a_method_without_a_handler_is_refused() -> None:
    everything = [binding for group in concerns() for binding in group]
    with pytest.raises(ValueError, match="no handler for status"):
        Dispatch([binding for binding in everything if binding.method is not STATUS])


def test_a_method_with_two_handlers_is_refused() -> None:
    async def job(params: JobParams) -> Any:
        return None

    with pytest.raises(ValueError, match="method job is answered twice"):
        Dispatch(*concerns(), [bind(JOB, job)])
