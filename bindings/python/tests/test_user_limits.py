"""Users' own limits from Python (protocol 1.3, RabbitMQ's user limits): an administrator sets
and lists them; a login of the user beyond its ``max_connections`` is refused at connect, and
a new queue beyond its ``max_queues`` is refused at declare, while other users go on."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from conftest import Server, unique

import wharf
import wharf.aio

PASSWORD = "pw"


def user_url(server: Server, user: str, password: str = PASSWORD) -> str:
    return f"wharf://{user}:{password}@{server.addr}"


@pytest.fixture
def user(conn: wharf.Connection) -> Iterator[str]:
    """A fresh user (not an administrator) that may do all in /; deleted afterwards."""
    name = unique("user")
    conn.add_user(name, PASSWORD)
    conn.set_permissions(name, ".*", ".*", ".*")
    yield name
    conn.delete_user(name)


def limits_of(conn: wharf.Connection, user: str) -> list[wharf.UserLimitsInfo]:
    return [info for info in conn.list_user_limits() if info["user"] == user]


def test_crossing_max_connections_is_refused_at_connect(server: Server, conn: wharf.Connection, user: str) -> None:
    conn.set_user_limits(user, max_connections=2)
    first = wharf.connect(user_url(server, user))
    second = wharf.connect(user_url(server, user))
    try:
        with pytest.raises(wharf.WharfError) as refused:
            wharf.connect(user_url(server, user))
        assert refused.value.code == wharf.ErrorCode.RESOURCE_LIMIT
        assert f"connection limit (2) of user '{user}' is reached" in str(refused.value)
        with wharf.connect(server.url):
            pass  # other users' logins are not counted
    finally:
        second.close()
    with wharf.connect(user_url(server, user)):
        pass  # a slot is free again
    first.close()


def test_lifting_max_connections_lets_the_user_in_again(server: Server, conn: wharf.Connection, user: str) -> None:
    conn.set_user_limits(user, max_connections=0)
    with pytest.raises(wharf.WharfError) as refused:
        wharf.connect(user_url(server, user))
    assert refused.value.code == wharf.ErrorCode.RESOURCE_LIMIT
    conn.set_user_limits(user)  # both None: no limit of its own
    with wharf.connect(user_url(server, user)):
        pass


def test_crossing_max_queues_is_a_resource_limit(server: Server, conn: wharf.Connection, user: str) -> None:
    first, second, third = unique("q"), unique("q"), unique("q")
    others = unique("q")
    conn.declare_queue(others)  # declared by guest: not the user's
    conn.set_user_limits(user, max_queues=2)
    try:
        with wharf.connect(user_url(server, user)) as limited:
            limited.declare_queue(first)
            limited.declare_queue(second)
            limited.declare_queue(first)  # redeclaring an existing queue adds none
            with pytest.raises(wharf.ResourceLimit):
                limited.declare_queue(third)
            limited.delete_queue(second)
            limited.declare_queue(third)  # room again; the connection lived on
            with pytest.raises(wharf.ResourceLimit):
                limited.declare_queue(unique("q"))
        conn.declare_queue(unique("q"), auto_delete=True)  # guest has no such limit
    finally:
        for name in (first, second, third, others):
            try:
                conn.delete_queue(name)
            except wharf.NotFound:
                pass


def test_an_administrator_sets_and_lists_user_limits(conn: wharf.Connection, user: str) -> None:
    assert limits_of(conn, user) == [{"user": user, "max_connections": None, "max_queues": None}]
    conn.set_user_limits(user, max_connections=3, max_queues=7)
    assert limits_of(conn, user) == [{"user": user, "max_connections": 3, "max_queues": 7}]
    conn.set_user_limits(user, max_queues=1)  # replaces both: no connection limit any more
    assert limits_of(conn, user) == [{"user": user, "max_connections": None, "max_queues": 1}]
    listed = conn.list_user_limits()
    names = [info["user"] for info in listed]
    assert "guest" in names  # every user, with limits or without
    assert names == sorted(names)
    with pytest.raises(wharf.NotFound):
        conn.set_user_limits(unique("nobody"), max_connections=1)
    with pytest.raises(wharf.InvalidArgument):
        conn.set_user_limits(user, max_queues=-1)
    with pytest.raises(wharf.InvalidArgument):
        conn.set_user_limits(user, max_connections=2**32)


def test_a_non_administrator_may_not_administer_user_limits(server: Server, user: str) -> None:
    with wharf.connect(user_url(server, user)) as limited:
        with pytest.raises(wharf.AccessRefused, match="administrator tag"):
            limited.set_user_limits(user, max_connections=100)
        with pytest.raises(wharf.AccessRefused):
            limited.list_user_limits()


def test_asyncio_user_limits(server: Server, url: str, user: str) -> None:
    async def main() -> list[wharf.UserLimitsInfo]:
        async with wharf.aio.connect(url) as conn:
            await conn.set_user_limits(user, max_connections=1, max_queues=None)
            listed = [info for info in await conn.list_user_limits() if info["user"] == user]
            async with wharf.aio.connect(user_url(server, user)):
                with pytest.raises(wharf.WharfError) as refused:
                    await wharf.aio.connect(user_url(server, user))
                assert refused.value.code == wharf.ErrorCode.RESOURCE_LIMIT
            return listed

    listed = asyncio.run(main())
    assert listed == [{"user": user, "max_connections": 1, "max_queues": None}]
