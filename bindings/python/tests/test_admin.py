"""Administration from Python (issue #18): users and permissions managed by an administrator
over the protocol, with the blocking and asyncio APIs; a non-administrator is refused."""

from __future__ import annotations

import asyncio

import pytest
from conftest import Server, unique

import wharf
import wharf.aio


def test_an_administrator_manages_users_and_permissions(server: Server, conn: wharf.Connection) -> None:
    name = unique("user")
    conn.add_user(name, "s3cret", tags=["monitoring"])
    assert {"name": name, "tags": ["monitoring"]} in conn.list_users()
    url = f"wharf://{name}:s3cret@{server.addr}"
    with pytest.raises(wharf.AccessRefused):
        wharf.connect(url)  # no permissions yet
    conn.set_permissions(name, f"^{name}-", ".*", ".*")
    assert {"user": name, "vhost": "/", "configure": f"^{name}-", "write": ".*", "read": ".*"} in (
        conn.list_permissions()
    )
    with wharf.connect(url) as user:
        user.declare_queue(f"{name}-q")
        with pytest.raises(wharf.AccessRefused, match="configure access to queue"):
            user.declare_queue("not-mine")
        with pytest.raises(wharf.AccessRefused, match="administrator tag"):
            user.add_user(unique("other"), "pw")
        user.declare_queue(f"{name}-q2")  # refusals leave the connection open
    conn.set_topic_permissions(name, "events", "^a\\.", ".*")
    assert conn.list_topic_permissions() == [
        {"user": name, "vhost": "/", "exchange": "events", "write": "^a\\.", "read": ".*"}
    ]
    conn.clear_topic_permissions(name)
    assert conn.list_topic_permissions() == []
    with pytest.raises(wharf.InvalidArgument):
        conn.set_permissions(name, "(", "", "")
    with pytest.raises(wharf.PreconditionFailed):
        conn.add_user(name, "again")
    conn.change_password(name, "n3w")
    with pytest.raises(wharf.AccessRefused):
        wharf.connect(url)
    conn.set_user_tags(name, [])
    conn.clear_permissions(name)
    conn.delete_user(name)
    with pytest.raises(wharf.NotFound):
        conn.delete_user(name)


def test_asyncio_administration(url: str) -> None:
    async def main() -> list[wharf.UserInfo]:
        async with wharf.aio.connect(url) as conn:
            name = unique("aio-user")
            await conn.add_user(name, "pw", tags=["management"])
            await conn.set_user_tags(name, ["monitoring"])
            await conn.set_permissions(name, ".*", ".*", ".*")
            await conn.change_password(name, "pw2")
            await conn.set_topic_permissions(name, "events", ".*", ".*")
            assert len(await conn.list_topic_permissions()) >= 1
            await conn.clear_topic_permissions(name, exchange="events")
            assert name in [permission["user"] for permission in await conn.list_permissions()]
            await conn.clear_permissions(name)
            users = [user for user in await conn.list_users() if user["name"] == name]
            await conn.delete_user(name)
            return users

    users = asyncio.run(main())
    assert [user["tags"] for user in users] == [["monitoring"]]
