//! Virtual hosts end to end (issue #18): the address's path chooses one; queues of the same
//! name in two are two queues; permissions are per virtual host; limits are enforced;
//! deleting one deletes what it holds and closes its connections; they survive a restart.
//! The CLI and `kill -9` are in `crates/wharf/tests/vhosts.rs`.

mod common;

use common::TestServer;
use wharf_client::{
    Client, ClientError, ClientOptions, ConsumeOptions, Credentials, Message, PermissionInfo,
    VhostLimits,
};
use wharf_protocol::ErrorCode;

fn in_vhost(addr: &std::net::SocketAddr, vhost: &str) -> String {
    let path = vhost.replace('%', "%25").replace('/', "%2F");
    format!("wharf://{addr}/{path}")
}

async fn login(
    addr: &std::net::SocketAddr,
    vhost: &str,
    user: &str,
    password: &str,
) -> Result<Client, ClientError> {
    let options = ClientOptions {
        credentials: Credentials::plain(user, password),
        ..ClientOptions::default()
    };
    Client::connect_with(&in_vhost(addr, vhost), options).await
}

fn full(user: &str, vhost: &str) -> PermissionInfo {
    PermissionInfo {
        user: user.to_owned(),
        vhost: vhost.to_owned(),
        configure: ".*".to_owned(),
        write: ".*".to_owned(),
        read: ".*".to_owned(),
    }
}

/// Adds `vhost` with `limits` and gives guest every permission there.
async fn add_vhost_for_guest(admin: &Client, vhost: &str, limits: VhostLimits) {
    admin.add_vhost(vhost, limits).await.unwrap();
    admin.set_permissions(full("guest", vhost)).await.unwrap();
}

async fn ready(client: &Client, queue: &str) -> u64 {
    client.queue_stats(queue).await.unwrap().ready
}

#[tokio::test]
async fn the_same_queue_in_two_vhosts_holds_different_messages() {
    let server = TestServer::start().await;
    let addr = server.addr();
    let admin = Client::connect(&addr.to_string()).await.unwrap();
    add_vhost_for_guest(&admin, "staging", VhostLimits::default()).await;
    let root = login(&addr, "/", "guest", "guest").await.unwrap();
    let staging = login(&addr, "staging", "guest", "guest").await.unwrap();
    for client in [&root, &staging] {
        client.declare_queue("orders").await.unwrap();
        client
            .bind_queue("orders", "wharf.topic", "orders.#")
            .await
            .unwrap();
    }
    root.publish("", "orders", Message::new("in /"))
        .await
        .unwrap();
    for body in ["one", "two"] {
        staging
            .publish("wharf.topic", "orders.new", Message::new(body))
            .await
            .unwrap();
    }
    assert_eq!(
        (
            ready(&root, "orders").await,
            ready(&staging, "orders").await
        ),
        (1, 2)
    );
    // A consumer in one gets only that one's messages.
    let mut consumer = staging
        .consume("orders", ConsumeOptions::default())
        .await
        .unwrap();
    let first = consumer.next().await.unwrap().unwrap();
    assert_eq!(&first.body()[..], b"one");
    first.ack().await.unwrap();
    assert_eq!(ready(&root, "orders").await, 1);
    // Listings are per virtual host too.
    let names: Vec<String> = staging
        .list_queues()
        .await
        .unwrap()
        .into_iter()
        .map(|queue| queue.name)
        .collect();
    assert_eq!(names, ["orders"]);
    let vhosts: Vec<(String, u32)> = admin
        .list_vhosts()
        .await
        .unwrap()
        .into_iter()
        .map(|info| (info.name, info.queues))
        .collect();
    assert_eq!(vhosts, [("/".to_owned(), 1), ("staging".to_owned(), 1)]);
}

#[tokio::test]
async fn permissions_are_per_vhost_and_an_unknown_vhost_is_refused() {
    let server = TestServer::start_with(|config| {
        config.auth_failure_delay = std::time::Duration::from_millis(10);
    })
    .await;
    let addr = server.addr();
    let admin = Client::connect(&addr.to_string()).await.unwrap();
    admin
        .add_vhost("team-a", VhostLimits::default())
        .await
        .unwrap();
    admin.add_user("alice", "pw", &[]).await.unwrap();
    // Permissions on a virtual host that does not exist are refused, as RabbitMQ does.
    let err = admin
        .set_permissions(full("alice", "team-b"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound), "{err:?}");
    admin
        .set_permissions(full("alice", "team-a"))
        .await
        .unwrap();
    let alice = login(&addr, "team-a", "alice", "pw").await.expect("team-a");
    alice.declare_queue("work").await.unwrap();
    // Not on /: refused at login.
    let err = login(&addr, "/", "alice", "pw").await.unwrap_err();
    assert!(
        matches!(&err, ClientError::ServerClosed { code: ErrorCode::AccessRefused, reason }
            if reason.contains("access to vhost '/' refused for user 'alice'")),
        "{err:?}"
    );
    // An unknown virtual host: refused, with its name, whoever asks.
    let err = login(&addr, "nope", "guest", "guest").await.unwrap_err();
    assert!(
        matches!(&err, ClientError::ServerClosed { code: ErrorCode::AccessRefused, reason }
            if reason.contains("vhost 'nope' not found")),
        "{err:?}"
    );
    // Adding an existing one is refused (its limits are set with set_vhost_limits); the
    // default one cannot be deleted.
    let err = admin
        .add_vhost("team-a", VhostLimits::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::PreconditionFailed), "{err:?}");
    let err = admin.delete_vhost("/").await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::AccessRefused), "{err:?}");
    let err = admin.delete_vhost("nope").await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound), "{err:?}");
    // Only administrators manage virtual hosts.
    let err = alice
        .add_vhost("mine", VhostLimits::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::AccessRefused), "{err:?}");
    assert!(!alice.is_closed());
}

#[tokio::test]
async fn vhost_limits_refuse_the_queue_and_the_connection_past_them() {
    let server = TestServer::start().await;
    let addr = server.addr();
    let admin = Client::connect(&addr.to_string()).await.unwrap();
    let limits = VhostLimits {
        max_connections: Some(2),
        max_queues: Some(3),
    };
    add_vhost_for_guest(&admin, "small", limits).await;
    let first = login(&addr, "small", "guest", "guest").await.unwrap();
    let _second = login(&addr, "small", "guest", "guest").await.unwrap();
    let err = login(&addr, "small", "guest", "guest").await.unwrap_err();
    assert!(
        matches!(&err, ClientError::ServerClosed { code: ErrorCode::ResourceLimit, reason }
            if reason.contains("connection limit (2) is reached")),
        "{err:?}"
    );
    // Other virtual hosts are not limited by it.
    login(&addr, "/", "guest", "guest").await.unwrap();
    for name in ["a", "b", "c"] {
        first.declare_queue(name).await.unwrap();
    }
    let err = first.declare_queue("d").await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::ResourceLimit), "{err:?}");
    assert!(
        err.to_string().contains("queues in the virtual host"),
        "{err}"
    );
    // The connection goes on; a closed connection frees its slot; raised limits apply at once.
    first.declare_queue("a").await.unwrap();
    // Its close returns once the broker let it go (CloseOk comes after), slot included.
    first.close().await.unwrap();
    let third = login(&addr, "small", "guest", "guest").await.unwrap();
    admin
        .set_vhost_limits(
            "small",
            VhostLimits {
                max_connections: None,
                max_queues: Some(4),
            },
        )
        .await
        .unwrap();
    third.declare_queue("d").await.unwrap();
    login(&addr, "small", "guest", "guest").await.unwrap();
}

#[tokio::test]
async fn deleting_a_vhost_deletes_its_queues_and_closes_its_connections() {
    let server = TestServer::start_with(|config| {
        config.heartbeat = std::time::Duration::from_millis(200);
    })
    .await;
    let addr = server.addr();
    let admin = Client::connect(&addr.to_string()).await.unwrap();
    add_vhost_for_guest(&admin, "doomed", VhostLimits::default()).await;
    let busy = login(&addr, "doomed", "guest", "guest").await.unwrap();
    busy.declare_queue("q").await.unwrap();
    busy.publish("", "q", Message::new("x").persistent(true))
        .await
        .unwrap();
    let idle = login(&addr, "doomed", "guest", "guest").await.unwrap();
    let mut consumer = idle.consume("q", ConsumeOptions::default()).await.unwrap();
    let _delivered = consumer.next().await.unwrap().unwrap();
    admin.declare_queue("q").await.unwrap();
    admin.delete_vhost("doomed").await.unwrap();
    // The busy connection is closed at its next frame, the idle consumer at its next
    // heartbeat.
    let err = busy.declare_queue("q2").await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::ConnectionForced), "{err:?}");
    let ended = tokio::time::timeout(common::DEADLINE, consumer.next())
        .await
        .expect("the consumer ends");
    assert!(matches!(ended, None | Some(Err(_))), "{ended:?}");
    // Gone with everything it held; its permissions too. The queue of the same name in / stays.
    let err = login(&addr, "doomed", "guest", "guest").await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::AccessRefused), "{err:?}");
    assert!(admin.list_permissions("doomed").await.unwrap().is_empty());
    assert!(admin.queue_stats("q").await.is_ok());
    // Added again under the same name, it is a new, empty virtual host.
    add_vhost_for_guest(&admin, "doomed", VhostLimits::default()).await;
    let again = login(&addr, "doomed", "guest", "guest").await.unwrap();
    let err = again.queue_stats("q").await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound), "{err:?}");
}

#[tokio::test]
async fn vhosts_their_queues_messages_and_limits_survive_a_restart() {
    let server = TestServer::start().await;
    let addr = server.addr();
    let admin = Client::connect(&addr.to_string()).await.unwrap();
    let limits = VhostLimits {
        max_connections: Some(5),
        max_queues: Some(6),
    };
    admin.add_vhost("kept", limits).await.unwrap();
    admin
        .add_vhost("dropped", VhostLimits::default())
        .await
        .unwrap();
    admin.set_permissions(full("guest", "kept")).await.unwrap();
    let kept = login(&addr, "kept", "guest", "guest").await.unwrap();
    kept.declare_queue("jobs").durable(true).await.unwrap();
    admin.declare_queue("jobs").durable(true).await.unwrap();
    for body in ["a", "b", "c"] {
        kept.publish("", "jobs", Message::new(body).persistent(true))
            .await
            .unwrap();
    }
    admin
        .publish("", "jobs", Message::new("root").persistent(true))
        .await
        .unwrap();
    admin.delete_vhost("dropped").await.unwrap();
    drop((kept, admin));
    let dir = server.dir;
    server.server.stop().await.unwrap();
    let config = wharf_server::ServerConfig::ephemeral(dir.path());
    let restarted = wharf_server::RunningServer::start(config).await.unwrap();
    let addr = restarted.addr;
    let admin = Client::connect(&addr.to_string()).await.unwrap();
    let vhosts: Vec<(String, VhostLimits)> = admin
        .list_vhosts()
        .await
        .unwrap()
        .into_iter()
        .map(|info| (info.name, info.limits))
        .collect();
    assert_eq!(
        vhosts,
        [
            ("/".to_owned(), VhostLimits::default()),
            ("kept".to_owned(), limits)
        ]
    );
    let kept = login(&addr, "kept", "guest", "guest").await.unwrap();
    assert_eq!(ready(&kept, "jobs").await, 3);
    assert_eq!(ready(&admin, "jobs").await, 1);
}

/// A user's own limits (RabbitMQ's user limits): its connections, and the queues it declared
/// that still exist, whatever the virtual host; other users are not held by them.
#[tokio::test]
async fn a_users_own_limits_cap_its_connections_and_its_queues() {
    let server = TestServer::start().await;
    let addr = server.addr();
    let users = &server.server.users;
    users.add("dave", "pw", &[]).unwrap();
    let admin = Client::connect(&addr.to_string()).await.unwrap();
    admin
        .add_vhost("other", VhostLimits::default())
        .await
        .unwrap();
    for vhost in ["/", "other"] {
        admin.set_permissions(full("dave", vhost)).await.unwrap();
    }
    users
        .set_limits(
            "dave",
            wharf_server::auth::UserLimits {
                max_connections: Some(2),
                max_queues: Some(2),
            },
        )
        .unwrap();
    let first = login(&addr, "/", "dave", "pw").await.unwrap();
    let second = login(&addr, "other", "dave", "pw").await.unwrap();
    let err = login(&addr, "/", "dave", "pw").await.unwrap_err();
    assert!(
        matches!(&err, ClientError::ServerClosed { code: ErrorCode::ResourceLimit, reason }
            if reason.contains("connection limit (2) of user 'dave' is reached")),
        "{err:?}"
    );
    // guest is not held by dave's limits.
    for _ in 0..3 {
        login(&addr, "/", "guest", "guest").await.unwrap();
    }
    first.declare_queue("d1").durable(true).await.unwrap();
    second.declare_queue("d2").await.unwrap();
    let err = first.declare_queue("d3").await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::ResourceLimit), "{err:?}");
    assert!(
        err.to_string().contains("queues declared by the user"),
        "{err}"
    );
    // A redeclare is no new queue; deleting one frees its place; guest declares freely.
    first.declare_queue("d1").durable(true).await.unwrap();
    admin.declare_queue("g1").await.unwrap();
    second.delete_queue("d2").await.unwrap();
    first.declare_queue("d3").await.unwrap();
    // The durable queue still counts after a restart (its declarer is in the log).
    drop((first, second, admin));
    let dir = server.dir;
    server.server.stop().await.unwrap();
    let config = wharf_server::ServerConfig::ephemeral(dir.path());
    let restarted = wharf_server::RunningServer::start(config).await.unwrap();
    let addr = restarted.addr;
    let dave = login(&addr, "/", "dave", "pw").await.unwrap();
    dave.declare_queue("d4").await.unwrap();
    let err = dave.declare_queue("d5").await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::ResourceLimit), "{err:?}");
    // Limits removed: no limit of its own is left.
    restarted
        .users
        .set_limits("dave", wharf_server::auth::UserLimits::default())
        .unwrap();
    dave.declare_queue("d5").await.unwrap();
}

/// A connection left open in a virtual host that was deleted and added again, with its
/// user's permissions granted again before the connection's next frame, is not let into the
/// new virtual host: it is closed at that frame.
#[tokio::test]
async fn a_connection_of_a_deleted_vhost_is_closed_even_if_the_vhost_is_added_again() {
    let server = TestServer::start().await;
    let addr = server.addr();
    let admin = Client::connect(&addr.to_string()).await.unwrap();
    add_vhost_for_guest(&admin, "phoenix", VhostLimits::default()).await;
    let old = login(&addr, "phoenix", "guest", "guest").await.unwrap();
    old.declare_queue("q").await.unwrap();
    admin.delete_vhost("phoenix").await.unwrap();
    let limits = VhostLimits {
        max_connections: Some(1),
        max_queues: None,
    };
    add_vhost_for_guest(&admin, "phoenix", limits).await;
    let err = old.declare_queue("q").await.unwrap_err();
    assert!(
        matches!(&err, ClientError::ServerClosed { code: ErrorCode::ConnectionForced, reason }
            if reason.contains("vhost 'phoenix' was deleted")),
        "{err:?}"
    );
    // The new virtual host's one connection slot was never taken by the old connection.
    let new = login(&addr, "phoenix", "guest", "guest").await.unwrap();
    let err = new.queue_stats("q").await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound), "{err:?}");
}
