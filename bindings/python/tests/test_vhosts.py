"""Virtual hosts from Python (protocol 1.3): the URL's path or ``vhost=`` names the virtual
host; queues of different virtual hosts are apart; an administrator adds, lists, limits and
deletes them; logins without permissions, to unknown virtual hosts and beyond a virtual
host's connection limit are refused, and so is a queue beyond its queue limit."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from urllib.parse import quote

import pytest
from conftest import Server, unique

import wharf
import wharf.aio


def vhost_url(server: Server, vhost: str, user: str = "guest", password: str = "guest") -> str:
    """The URL of `vhost` on `server`, its name percent-encoded (a '/' in it as %2F)."""
    return f"wharf://{user}:{password}@{server.addr}/{quote(vhost, safe='')}"


@pytest.fixture
def vhost(conn: wharf.Connection) -> Iterator[str]:
    """A fresh virtual host where guest (the administrator of the test server) may do all."""
    name = unique("vh")
    conn.add_vhost(name)
    conn.set_permissions("guest", ".*", ".*", ".*", vhost=name)
    yield name
    try:
        conn.delete_vhost(name)
    except wharf.NotFound:
        pass  # the test deleted it


def take(connection: wharf.Connection, queue: str, n_messages: int) -> list[bytes]:
    """The next `n_messages` bodies of `queue`, acked (fewer if none came for 5 s)."""
    bodies: list[bytes] = []
    with connection.consume(queue, timeout=5.0) as consumer:
        for message in consumer:
            bodies.append(message.body)
            message.ack()
            if len(bodies) == n_messages:
                break
    return bodies


def test_the_same_queue_name_in_two_vhosts_holds_different_messages(server: Server, vhost: str) -> None:
    queue = unique("q")
    with wharf.connect(vhost_url(server, "/")) as default, wharf.connect(vhost_url(server, vhost)) as other:
        default.declare_queue(queue)
        other.declare_queue(queue)
        default.publish(queue, b"in /")
        other.publish(queue, b"in the other")
        other.publish(queue, b"in the other, twice")
        assert default.queue_stats(queue).ready == 1
        assert other.queue_stats(queue).ready == 2
        assert take(default, queue, 1) == [b"in /"]
        assert take(other, queue, 2) == [b"in the other", b"in the other, twice"]
        assert queue in [stats.name for stats in other.list_queues()]
        other.delete_queue(queue)
        assert default.queue_stats(queue).ready == 0  # still there in /
        default.delete_queue(queue)


def test_the_vhost_keyword_overrides_the_urls_path(server: Server, vhost: str) -> None:
    queue = unique("q")
    with wharf.connect(vhost_url(server, "/"), vhost=vhost) as other:
        other.declare_queue(queue)
    with wharf.connect(vhost_url(server, vhost)) as same:
        assert same.queue_stats(queue).ready == 0  # declared in `vhost`, not in /
        same.delete_queue(queue)
    with wharf.connect(vhost_url(server, "/")) as default:
        with pytest.raises(wharf.NotFound):
            default.queue_stats(queue)


def test_a_user_without_permissions_in_a_vhost_is_refused_at_connect(
    server: Server, conn: wharf.Connection, vhost: str
) -> None:
    name = unique("user")
    conn.add_user(name, "pw")
    conn.set_permissions(name, ".*", ".*", ".*")  # in / only
    try:
        with wharf.connect(vhost_url(server, "/", name, "pw")):
            pass
        with pytest.raises(wharf.AccessRefused, match=f"vhost '{vhost}'"):
            wharf.connect(vhost_url(server, vhost, name, "pw"))
        conn.set_permissions(name, ".*", ".*", ".*", vhost=vhost)
        with wharf.connect(vhost_url(server, vhost, name, "pw")):
            pass
    finally:
        conn.delete_user(name)


def test_an_unknown_vhost_is_refused_at_connect(server: Server) -> None:
    name = unique("nowhere")
    with pytest.raises(wharf.AccessRefused, match=f"vhost '{name}' not found"):
        wharf.connect(vhost_url(server, name))
    with pytest.raises(wharf.AccessRefused, match="not found"):
        wharf.connect(server.url, vhost=name)


def test_an_administrator_adds_lists_and_deletes_vhosts(conn: wharf.Connection) -> None:
    name = f"/{unique('staging')}"  # a '/' in a name is fine
    conn.add_vhost(name, max_connections=5)
    listed = [info for info in conn.list_vhosts() if info["name"] == name]
    assert listed == [{"name": name, "max_connections": 5, "max_queues": None, "connections": 0, "queues": 0}]
    assert "/" in [info["name"] for info in conn.list_vhosts()]
    with pytest.raises(wharf.PreconditionFailed):
        conn.add_vhost(name)
    conn.set_vhost_limits(name, max_queues=10)  # replaces: no connection limit any more
    listed = [info for info in conn.list_vhosts() if info["name"] == name]
    assert (listed[0]["max_connections"], listed[0]["max_queues"]) == (None, 10)
    conn.delete_vhost(name)
    assert name not in [info["name"] for info in conn.list_vhosts()]
    with pytest.raises(wharf.NotFound):
        conn.delete_vhost(name)
    with pytest.raises(wharf.NotFound):
        conn.set_vhost_limits(name, max_queues=1)
    with pytest.raises(wharf.InvalidArgument):
        conn.add_vhost(unique("negative"), max_queues=-1)


def test_a_non_administrator_may_not_administer_vhosts(server: Server, conn: wharf.Connection) -> None:
    name = unique("user")
    conn.add_user(name, "pw")
    conn.set_permissions(name, ".*", ".*", ".*")
    try:
        with wharf.connect(vhost_url(server, "/", name, "pw")) as user:
            with pytest.raises(wharf.AccessRefused, match="administrator tag"):
                user.add_vhost(unique("vh"))
            with pytest.raises(wharf.AccessRefused):
                user.list_vhosts()
    finally:
        conn.delete_user(name)


def test_crossing_max_queues_is_a_resource_limit(server: Server, conn: wharf.Connection, vhost: str) -> None:
    conn.set_vhost_limits(vhost, max_queues=2)
    with wharf.connect(vhost_url(server, vhost)) as inside:
        inside.declare_queue("a")
        inside.declare_queue("b")
        inside.declare_queue("a")  # redeclaring an existing queue adds none
        with pytest.raises(wharf.ResourceLimit):
            inside.declare_queue("c")
        listed = [info for info in conn.list_vhosts() if info["name"] == vhost]
        assert (listed[0]["queues"], listed[0]["connections"]) == (2, 1)
        inside.delete_queue("b")
        inside.declare_queue("c")  # room again; the connection lived on
    with wharf.connect(vhost_url(server, "/")) as default:
        default.declare_queue(unique("q"), auto_delete=True)  # / has no such limit


def test_crossing_max_connections_is_refused_at_connect(server: Server, conn: wharf.Connection, vhost: str) -> None:
    conn.set_vhost_limits(vhost, max_connections=2)
    first = wharf.connect(vhost_url(server, vhost))
    second = wharf.connect(vhost_url(server, vhost))
    try:
        with pytest.raises(wharf.WharfError) as refused:
            wharf.connect(vhost_url(server, vhost))
        assert refused.value.code == wharf.ErrorCode.RESOURCE_LIMIT
        with wharf.connect(vhost_url(server, "/")):
            pass  # other virtual hosts are not counted
    finally:
        second.close()
    with wharf.connect(vhost_url(server, vhost)):
        pass  # a slot is free again
    first.close()


def test_asyncio_vhosts(server: Server, url: str) -> None:
    async def main() -> list[wharf.VhostInfo]:
        async with wharf.aio.connect(url) as conn:
            name = unique("aio-vh")
            await conn.add_vhost(name, max_queues=3)
            await conn.set_permissions("guest", ".*", ".*", ".*", vhost=name)
            await conn.set_vhost_limits(name, max_connections=4, max_queues=None)
            async with wharf.aio.connect(url, vhost=name) as inside:
                await inside.declare_queue("jobs")
            listed = [info for info in await conn.list_vhosts() if info["name"] == name]
            await conn.delete_vhost(name)
            return listed

    listed = asyncio.run(main())
    assert [(info["max_connections"], info["max_queues"], info["queues"]) for info in listed] == [(4, None, 1)]


def test_an_invalid_vhost_is_refused_before_connecting() -> None:
    # Port 9 on loopback: nothing is reached, the checks come first (no server needed).
    for url, vhost in [("wharf://127.0.0.1:9/a%0Ab", None), ("wharf://127.0.0.1:9/a/b", None), ("127.0.0.1:9", "")]:
        with pytest.raises(wharf.InvalidArgument):
            wharf.connect(url, vhost=vhost)
