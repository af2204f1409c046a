"""Errors: their classes, codes, and what happens to the connection."""

from __future__ import annotations

import pickle
import socket

import pytest
from conftest import unique

import wharf


def test_passive_declare_of_a_missing_queue_is_not_found_with_its_code(conn: wharf.Connection) -> None:
    with pytest.raises(wharf.NotFound) as raised:
        conn.declare_queue(unique("missing"), passive=True)
    err = raised.value
    assert isinstance(err, wharf.WharfError)
    assert err.code == wharf.ErrorCode.NOT_FOUND and isinstance(err.code, wharf.ErrorCode)
    assert "not found" in str(err)
    assert not conn.closed  # an operating error leaves the connection open
    conn.declare_queue(unique("still-works"))


def test_redeclaring_with_other_flags_is_precondition_failed(conn: wharf.Connection) -> None:
    name = unique("flags")
    conn.declare_queue(name, durable=True)
    with pytest.raises(wharf.PreconditionFailed) as raised:
        conn.declare_queue(name, durable=False)
    assert raised.value.code == wharf.ErrorCode.PRECONDITION_FAILED
    exchange = unique("ex")
    conn.declare_exchange(exchange, "direct")
    with pytest.raises(wharf.PreconditionFailed):
        conn.declare_exchange(exchange, "fanout")


def test_reserved_names_are_invalid_names_and_value_errors(conn: wharf.Connection) -> None:
    with pytest.raises(wharf.InvalidName) as raised:
        conn.declare_queue("wharf.reserved")
    assert isinstance(raised.value, ValueError)
    assert raised.value.code == wharf.ErrorCode.INVALID_NAME


def test_publish_to_a_missing_exchange_is_refused_with_not_found(conn: wharf.Connection) -> None:
    with pytest.raises(wharf.WharfError) as raised:
        conn.publish("key", b"x", exchange=unique("missing"))
    assert raised.value.code == wharf.ErrorCode.NOT_FOUND


def test_consuming_a_missing_queue_is_not_found(conn: wharf.Connection) -> None:
    with pytest.raises(wharf.NotFound):
        conn.consume(unique("missing"))


def test_invalid_arguments_are_value_errors() -> None:
    with pytest.raises(wharf.InvalidArgument) as raised:
        wharf.connect("http://127.0.0.1:1")
    assert isinstance(raised.value, ValueError) and raised.value.code is None
    with pytest.raises(ValueError):
        wharf.connect("wharf://127.0.0.1:1", request_timeout=-1.0)


def test_invalid_prefetch_is_an_invalid_argument(conn: wharf.Connection, queue: str) -> None:
    with pytest.raises(wharf.InvalidArgument):
        conn.consume(queue, prefetch=0)


def test_refused_connection_is_a_connect_error() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(wharf.ConnectError) as raised:
        wharf.connect(f"wharf://127.0.0.1:{port}", connect_timeout=5.0)
    assert isinstance(raised.value, ConnectionError)


def test_operations_after_close_raise_connection_closed(url: str) -> None:
    conn = wharf.connect(url)
    conn.close()
    conn.close()  # closing twice is fine
    assert conn.closed
    with pytest.raises(wharf.ConnectionClosed):
        conn.declare_queue(unique("late"))


def test_server_shutdown_is_connection_lost(tmp_path: object) -> None:
    from pathlib import Path

    from conftest import start_server

    assert isinstance(tmp_path, Path)
    server = start_server(tmp_path / "data")
    try:
        conn = wharf.connect(server.url)
        queue = conn.declare_queue(unique("q")).name
        consumer = conn.consume(queue)
    finally:
        server.stop()
    with pytest.raises(wharf.ConnectionLost) as raised:
        consumer.get(timeout=10.0)
    assert isinstance(raised.value, ConnectionError)
    with pytest.raises((wharf.ConnectionLost, wharf.ConnectionClosed)):
        conn.declare_queue(unique("q"))
    conn.close()


def test_errors_pickle_with_their_class_and_code() -> None:
    err = wharf.NotFound("queue 'x' not found", code=1)
    copy = pickle.loads(pickle.dumps(err))
    assert type(copy) is wharf.NotFound and copy.code == wharf.ErrorCode.NOT_FOUND and str(copy) == str(err)
    unknown = wharf.WharfError("future", code=999)
    assert unknown.code == 999
    lost = pickle.loads(pickle.dumps(wharf.ConnectionLost("gone")))
    assert isinstance(lost, ConnectionError) and lost.code is None
    timeout = wharf.Timeout("slow")
    assert isinstance(timeout, TimeoutError) and str(timeout) == "slow"


def test_every_error_class_is_a_wharf_error() -> None:
    for name in wharf.errors.__all__:
        cls = getattr(wharf, name)
        if name != "ErrorCode":
            assert issubclass(cls, wharf.WharfError), name
            assert cls.__doc__, name
