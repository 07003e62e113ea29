"""The two clients and the protocol's declarations: every method is in `Client` and in
`AsyncClient` (a coroutine there) with the same parameters, and every field of a method's
params is a parameter of its client method."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import msgspec
import pytest

from taskctl import AsyncClient, Client
from taskd.protocol import METHODS, Method

# Client's methods that only a blocking socket has: select() waits on the connection.
BLOCKING_ONLY = {"fileno", "held_events"}
# The method that `connect` calls; and the client method that sends a method's params,
# where it is not the method's own name (`run` waits and returns the result).
CALLED_AS = {"hello": "connect", "run": "run_job"}
# A params field named `id` is the id of what the method is about.
ID_PARAMETER = {"unsubscribe": "subscription", "batch": "batch_id"}


def public(cls: type) -> dict[str, Callable[..., Any]]:
    return {
        name: member
        for name, member in vars(cls).items()
        if callable(member) and not name.startswith("_")
    }


def test_both_clients_have_the_same_methods() -> None:
    blocking, asynchronous = public(Client), public(AsyncClient)
    assert set(blocking) - BLOCKING_ONLY == set(asynchronous)


@pytest.mark.parametrize("name", sorted(set(public(Client)) - BLOCKING_ONLY))
def test_each_method_has_the_same_signature_in_both_clients(name: str) -> None:
    blocking, asynchronous = getattr(Client, name), getattr(AsyncClient, name)
    assert inspect.signature(blocking) == inspect.signature(asynchronous)
    assert inspect.iscoroutinefunction(asynchronous), f"AsyncClient.{name} is not async"
    assert asynchronous.__doc__ == blocking.__doc__


@pytest.mark.parametrize("method", METHODS.values(), ids=list(METHODS))
def test_every_method_is_called_by_both_clients_with_all_its_params(
    method: Method[Any, Any],
) -> None:
    name = CALLED_AS.get(method.name, method.name)
    for client in (Client, AsyncClient):
        assert name in public(client), f"{client.__name__} has no {name} for {method.name}"
    if method.name == "hello":
        return  # the client says who it is, and its protocol
    parameters = inspect.signature(getattr(Client, name)).parameters
    for field in msgspec.structs.fields(method.params):
        parameter = field.name
        if parameter == "id":
            parameter = ID_PARAMETER.get(method.name, "job_id")
        assert parameter in parameters, f"Client.{name} does not take {method.name}'s {field.name}"
