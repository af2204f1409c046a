//! Permissions end to end (issue #18), row by row of RabbitMQ's table (docs/security.md):
//! each operation allowed and refused over the native protocol. A refused request is a typed
//! `AccessRefused` error and the connection goes on; a refused publish is refused in its
//! confirm. A user without permissions on the virtual host cannot connect, and a change
//! applies to open connections from their next operation.

mod common;

use common::TestServer;
use wharf_client::{
    Client, ClientError, ClientOptions, ConsumeOptions, Credentials, ExchangeKind, Message,
};
use wharf_protocol::ErrorCode;
use wharf_server::auth::{DEFAULT_VHOST, Permission, TopicPermission};

/// Alice may configure `alice-*` and server-named queues, write to the default exchange,
/// `alice-*` and `shared-in`, and read `alice-*` and `shared-out`.
fn alice_permission() -> Permission {
    Permission {
        configure: r"^(alice-.*|wharf\.gen-.*)$".to_owned(),
        write: r"^(amq\.default|alice-.*|shared-in)$".to_owned(),
        read: r"^(alice-.*|shared-out)$".to_owned(),
    }
}

/// A server with `guest` (everything) and `alice` (`alice_permission`), the shared resources
/// declared by guest, and a client for each.
async fn setup() -> (TestServer, Client, Client) {
    let server = TestServer::start().await;
    server
        .server
        .users
        .add("alice", "pw", &[])
        .expect("add alice");
    server
        .server
        .users
        .set_permissions("alice", DEFAULT_VHOST, alice_permission())
        .expect("alice's permissions");
    let guest = Client::connect(&server.addr().to_string())
        .await
        .expect("guest");
    for queue in ["shared-in", "shared-out", "other-q"] {
        guest.declare_queue(queue).await.unwrap();
    }
    guest
        .declare_exchange("other-x", ExchangeKind::Direct)
        .await
        .unwrap();
    let alice = login(&server, "alice", "pw").await.expect("alice");
    (server, guest, alice)
}

async fn login(server: &TestServer, user: &str, password: &str) -> Result<Client, ClientError> {
    let options = ClientOptions {
        credentials: Credentials::plain(user, password),
        ..ClientOptions::default()
    };
    Client::connect_with(&server.addr().to_string(), options).await
}

/// The result is `AccessRefused` naming the right and the resource.
#[track_caller]
fn refused<T: std::fmt::Debug>(result: Result<T, ClientError>, right: &str, resource: &str) {
    let err = result.expect_err("refused");
    assert_eq!(err.code(), Some(ErrorCode::AccessRefused), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains(&format!("{right} access to {resource}")),
        "{text}"
    );
}

#[tokio::test]
async fn configure_governs_declare_and_delete_of_queues_and_exchanges() {
    let (_server, guest, alice) = setup().await;
    alice.declare_queue("alice-q").await.expect("own queue");
    refused(
        alice.declare_queue("bob-q").await,
        "configure",
        "queue 'bob-q'",
    );
    // A server-named queue is checked under the name it would get.
    let named = alice
        .declare_queue("")
        .exclusive(true)
        .await
        .expect("server-named");
    assert!(named.name.starts_with("wharf.gen-"), "{named:?}");
    // A passive declare only looks: no permission needed, as in RabbitMQ.
    alice
        .declare_queue("other-q")
        .passive(true)
        .await
        .expect("passive declare");
    alice
        .declare_exchange("alice-x", ExchangeKind::Direct)
        .await
        .expect("own exchange");
    refused(
        alice.declare_exchange("bob-x", ExchangeKind::Fanout).await,
        "configure",
        "exchange 'bob-x'",
    );
    alice
        .declare_exchange("other-x", ExchangeKind::Direct)
        .passive(true)
        .await
        .expect("passive exchange declare");
    refused(
        alice.delete_queue("other-q").await,
        "configure",
        "queue 'other-q'",
    );
    refused(
        alice.delete_exchange("other-x").await,
        "configure",
        "exchange 'other-x'",
    );
    alice
        .delete_queue("alice-q")
        .await
        .expect("delete own queue");
    alice
        .delete_exchange("alice-x")
        .await
        .expect("delete own exchange");
    // Nothing was changed by the refusals, and the connection served throughout.
    guest.declare_queue("other-q").passive(true).await.unwrap();
    guest
        .declare_exchange("other-x", ExchangeKind::Direct)
        .passive(true)
        .await
        .unwrap();
    assert!(!alice.is_closed());
}

#[tokio::test]
async fn a_dead_letter_exchange_needs_write_on_it_and_read_on_the_queue() {
    let (_server, guest, alice) = setup().await;
    guest
        .declare_exchange("alice-dlx", ExchangeKind::Fanout)
        .await
        .unwrap();
    alice
        .declare_queue("alice-work")
        .dead_letter_exchange("alice-dlx")
        .await
        .expect("writable dead-letter exchange");
    refused(
        alice
            .declare_queue("alice-work2")
            .dead_letter_exchange("other-x")
            .await,
        "write",
        "exchange 'other-x'",
    );
}

#[tokio::test]
async fn write_governs_publish_and_the_default_exchange_is_amq_default() {
    let (_server, guest, alice) = setup().await;
    alice
        .publish("", "shared-out", Message::new("via amq.default"))
        .await
        .expect("publish to the default exchange");
    guest.bind_queue("shared-in", "other-x", "k").await.unwrap();
    let refusal = alice.publish("other-x", "k", Message::new("no")).await;
    let err = refusal.expect_err("refused");
    assert!(
        matches!(
            &err,
            ClientError::PublishRefused {
                code: ErrorCode::AccessRefused,
                reason
            } if reason.contains("write access to exchange 'other-x'")
        ),
        "{err:?}"
    );
    // In a pipelined run, only the refused publishes are refused.
    let publisher = alice.publisher();
    let mut confirms = Vec::new();
    for n in 0..10 {
        let exchange = if n % 2 == 0 { "" } else { "other-x" };
        let routing_key = if n % 2 == 0 { "shared-out" } else { "k" };
        confirms.push(
            publisher
                .publish(exchange, routing_key, Message::new(format!("{n}")))
                .await
                .unwrap(),
        );
    }
    for (n, confirm) in confirms.into_iter().enumerate() {
        let outcome = confirm.await;
        if n % 2 == 0 {
            outcome.expect("allowed publish");
        } else {
            assert_eq!(outcome.unwrap_err().code(), Some(ErrorCode::AccessRefused));
        }
    }
    let stats = guest.queue_stats("shared-out").await.unwrap();
    assert_eq!(stats.ready, 6);
    let stats = guest.queue_stats("shared-in").await.unwrap();
    assert_eq!(stats.ready, 0, "no refused publish was routed");
}

#[tokio::test]
async fn read_governs_consume_purge_and_redrive() {
    let (_server, guest, alice) = setup().await;
    guest
        .publish("", "shared-out", Message::new("m"))
        .await
        .unwrap();
    let mut consumer = alice
        .consume("shared-out", ConsumeOptions::default())
        .await
        .expect("consume a readable queue");
    let delivery = consumer.next().await.expect("a delivery").expect("ok");
    assert_eq!(&delivery.body()[..], b"m");
    refused(
        alice
            .consume("shared-in", ConsumeOptions::default())
            .await
            .map(|_| ()),
        "read",
        "queue 'shared-in'",
    );
    refused(
        alice.purge_queue("shared-in").await,
        "read",
        "queue 'shared-in'",
    );
    alice.declare_queue("alice-q").await.unwrap();
    assert_eq!(alice.purge_queue("alice-q").await.expect("purge own"), 0);
    // Redrive takes from the queue (read) and is an operator's act on it (configure).
    assert_eq!(alice.redrive("alice-q", 0).await.expect("redrive own"), 0);
    refused(
        alice.redrive("shared-out", 0).await,
        "configure",
        "queue 'shared-out'",
    );
}

#[tokio::test]
async fn bindings_need_write_on_the_destination_and_read_on_the_source() {
    let (_server, guest, alice) = setup().await;
    alice.declare_queue("alice-q").await.unwrap();
    alice
        .declare_exchange("alice-x", ExchangeKind::Direct)
        .await
        .unwrap();
    alice
        .declare_exchange("alice-x2", ExchangeKind::Direct)
        .await
        .unwrap();
    alice
        .bind_queue("alice-q", "alice-x", "k")
        .await
        .expect("queue binding");
    refused(
        alice.bind_queue("shared-out", "alice-x", "k").await,
        "write",
        "queue 'shared-out'",
    );
    refused(
        alice.bind_queue("alice-q", "other-x", "k").await,
        "read",
        "exchange 'other-x'",
    );
    alice
        .bind_exchange("alice-x2", "alice-x", "k")
        .await
        .expect("exchange binding");
    refused(
        alice.bind_exchange("other-x", "alice-x", "k").await,
        "write",
        "exchange 'other-x'",
    );
    // Unbinding has the same rows.
    guest
        .bind_queue("shared-out", "alice-x", "g")
        .await
        .unwrap();
    refused(
        alice.unbind_queue("shared-out", "alice-x", "g").await,
        "write",
        "queue 'shared-out'",
    );
    guest.bind_queue("alice-q", "other-x", "g").await.unwrap();
    refused(
        alice.unbind_queue("alice-q", "other-x", "g").await,
        "read",
        "exchange 'other-x'",
    );
    alice
        .unbind_queue("alice-q", "alice-x", "k")
        .await
        .expect("unbind own");
    alice
        .unbind_exchange("alice-x2", "alice-x", "k")
        .await
        .expect("unbind own exchanges");
}

#[tokio::test]
async fn topic_permissions_govern_routing_keys_on_topic_exchanges() {
    let (server, _guest, alice) = setup().await;
    alice
        .declare_exchange("alice-events", ExchangeKind::Topic)
        .await
        .unwrap();
    alice.declare_queue("alice-q").await.unwrap();
    // Without topic permissions every key goes.
    alice
        .bind_queue("alice-q", "alice-events", "#")
        .await
        .expect("any key");
    server
        .server
        .users
        .set_topic_permissions(
            "alice",
            DEFAULT_VHOST,
            "alice-events",
            TopicPermission {
                write: r"^{username}\.".to_owned(),
                read: r"^{username}\.".to_owned(),
            },
        )
        .unwrap();
    alice
        .publish("alice-events", "alice.created", Message::new("ok"))
        .await
        .expect("own routing key");
    let err = alice
        .publish("alice-events", "bob.created", Message::new("no"))
        .await
        .expect_err("refused");
    assert_eq!(err.code(), Some(ErrorCode::AccessRefused), "{err:?}");
    assert!(
        err.to_string()
            .contains("write access to topic 'bob.created' in exchange 'alice-events'"),
        "{err}"
    );
    alice
        .bind_queue("alice-q", "alice-events", "alice.#")
        .await
        .expect("own binding key");
    refused(
        alice.bind_queue("alice-q", "alice-events", "bob.#").await,
        "read",
        "topic 'bob.#'",
    );
    // Only topic exchanges have topic permissions checked.
    alice
        .declare_exchange("alice-direct", ExchangeKind::Direct)
        .await
        .unwrap();
    server
        .server
        .users
        .set_topic_permissions(
            "alice",
            DEFAULT_VHOST,
            "alice-direct",
            TopicPermission {
                write: String::new(),
                read: String::new(),
            },
        )
        .unwrap();
    alice
        .bind_queue("alice-q", "alice-direct", "anything")
        .await
        .expect("a direct exchange's keys are not checked");
}

#[tokio::test]
async fn no_permissions_no_connection_and_changes_apply_to_open_connections() {
    let (server, _guest, alice) = setup().await;
    server.server.users.add("bob", "pw", &[]).unwrap();
    let err = login(&server, "bob", "pw")
        .await
        .expect_err("no vhost access");
    assert!(
        matches!(
            &err,
            ClientError::ServerClosed {
                code: ErrorCode::AccessRefused,
                reason
            } if reason == "access to vhost '/' refused for user 'bob'"
        ),
        "{err:?}"
    );
    // Granted: bob connects; but a pattern without server-named queues refuses them.
    server
        .server
        .users
        .set_permissions(
            "bob",
            DEFAULT_VHOST,
            Permission {
                configure: "^bob-".to_owned(),
                write: String::new(),
                read: String::new(),
            },
        )
        .unwrap();
    let bob = login(&server, "bob", "pw").await.expect("bob");
    refused(
        bob.declare_queue("").exclusive(true).await,
        "configure",
        "queue 'wharf.gen-",
    );
    refused(
        bob.publish("", "bob-q", Message::new("x")).await,
        "write",
        "exchange 'amq.default'",
    );
    // Alice's rights widen and narrow while she stays connected.
    refused(alice.declare_queue("zed").await, "configure", "queue 'zed'");
    server
        .server
        .users
        .set_permissions("alice", DEFAULT_VHOST, Permission::full())
        .unwrap();
    alice.declare_queue("zed").await.expect("granted meanwhile");
    // Twice to the same exchange: the second is the remembered answer of the first.
    for _ in 0..2 {
        alice
            .publish("", "zed", Message::new("allowed"))
            .await
            .expect("a publish to amq.default");
    }
    // Narrowed: refused from the next operation, the connection open.
    server
        .server
        .users
        .set_permissions(
            "alice",
            DEFAULT_VHOST,
            Permission {
                configure: "^alice-".to_owned(),
                write: String::new(),
                read: String::new(),
            },
        )
        .unwrap();
    refused(
        alice.declare_queue("zed2").await,
        "configure",
        "queue 'zed2'",
    );
    refused(
        alice.publish("", "zed", Message::new("x")).await,
        "write",
        "exchange 'amq.default'",
    );
    assert!(!alice.is_closed(), "refusals leave the connection open");
    // No permissions left on the vhost: the connection is closed at its next frame, as
    // RabbitMQ closes a deleted user's connections.
    server
        .server
        .users
        .clear_permissions("alice", DEFAULT_VHOST)
        .unwrap();
    let err = alice.declare_queue("alice-q").await.expect_err("closed");
    assert!(
        matches!(
            &err,
            ClientError::ServerClosed { code: ErrorCode::ConnectionForced, reason }
                if reason.contains("user 'alice' was deleted or lost its permissions")
        ),
        "{err:?}"
    );
    // A deleted user's connection is closed the same way.
    server.server.users.delete("bob").unwrap();
    let err = bob.declare_queue("bob-q").await.expect_err("closed");
    assert_eq!(err.code(), Some(ErrorCode::ConnectionForced), "{err:?}");
}

/// A consumer that sends nothing is disconnected at its client's next heartbeat once its user
/// is deleted: it receives nothing more.
#[tokio::test]
async fn a_deleted_users_idle_consumer_is_closed_at_its_next_heartbeat() {
    let server = TestServer::start_with(|config| {
        config.heartbeat = std::time::Duration::from_millis(200);
    })
    .await;
    let users = &server.server.users;
    users.add("carol", "pw", &[]).unwrap();
    users
        .set_permissions("carol", DEFAULT_VHOST, Permission::full())
        .unwrap();
    let carol = login(&server, "carol", "pw").await.expect("carol");
    carol.declare_queue("carol-q").await.unwrap();
    let mut consumer = carol
        .consume(
            "carol-q",
            ConsumeOptions {
                auto_ack: true,
                ..ConsumeOptions::default()
            },
        )
        .await
        .unwrap();
    users.delete("carol").unwrap();
    let ended = tokio::time::timeout(common::DEADLINE, consumer.next())
        .await
        .expect("the consumer ends within the deadline");
    assert!(
        matches!(ended, None | Some(Err(_))),
        "no delivery after the deletion: {ended:?}"
    );
    assert!(carol.is_closed());
}

/// Redrive puts each message into the queue its `x-death` header names, and a publisher can
/// write that header: a message naming a queue the user may not write to stays where it is.
#[tokio::test]
async fn redrive_moves_messages_only_into_queues_the_user_may_write_to() {
    let (_server, guest, alice) = setup().await;
    alice.declare_queue("alice-dlq").await.unwrap();
    alice.declare_queue("alice-work").await.unwrap();
    let forged = |queue: &str| {
        let record = wharf_client::Value::Map(vec![
            ("queue".into(), wharf_client::Value::Str(queue.into())),
            ("exchange".into(), wharf_client::Value::Str(String::new())),
            (
                "routing-keys".into(),
                wharf_client::Value::List(vec![wharf_client::Value::Str(queue.into())]),
            ),
            ("reason".into(), wharf_client::Value::Str("rejected".into())),
            ("count".into(), wharf_client::Value::I64(1)),
        ]);
        Message::new(format!("into {queue}"))
            .header("x-death", wharf_client::Value::List(vec![record]))
    };
    // other-q: guest's, alice may not write to it; alice-work: hers.
    alice
        .publish("", "alice-dlq", forged("other-q"))
        .await
        .unwrap();
    alice
        .publish("", "alice-dlq", forged("alice-work"))
        .await
        .unwrap();
    assert_eq!(alice.redrive("alice-dlq", 0).await.unwrap(), 1);
    assert_eq!(guest.queue_stats("other-q").await.unwrap().ready, 0);
    assert_eq!(guest.queue_stats("alice-work").await.unwrap().ready, 1);
    assert_eq!(
        guest.queue_stats("alice-dlq").await.unwrap().ready,
        1,
        "the message naming other-q stays"
    );
    // guest (every right) moves it; a queue exclusive to another connection is never a
    // target.
    let exclusive_owner = Client::connect(&_server.addr().to_string()).await.unwrap();
    exclusive_owner
        .declare_queue("alice-private")
        .exclusive(true)
        .await
        .unwrap();
    guest
        .publish("", "alice-dlq", forged("alice-private"))
        .await
        .unwrap();
    assert_eq!(guest.redrive("alice-dlq", 0).await.unwrap(), 1);
    assert_eq!(guest.queue_stats("other-q").await.unwrap().ready, 1);
    assert_eq!(guest.queue_stats("alice-dlq").await.unwrap().ready, 1);
}

#[tokio::test]
async fn anonymous_logins_act_as_the_anonymous_login_user() {
    let server = TestServer::start_with(|config| {
        config.allow_anonymous = true;
        config.anonymous_login_user = "visitor".to_owned();
    })
    .await;
    let anonymous = |server: &TestServer| {
        let options = ClientOptions {
            credentials: Credentials::Anonymous,
            ..ClientOptions::default()
        };
        let addr = server.addr().to_string();
        async move { Client::connect_with(&addr, options).await }
    };
    let err = anonymous(&server).await.expect_err("no such user yet");
    assert_eq!(err.code(), Some(ErrorCode::AccessRefused), "{err:?}");
    server.server.users.add("visitor", "pw", &[]).unwrap();
    server
        .server
        .users
        .set_permissions(
            "visitor",
            DEFAULT_VHOST,
            Permission {
                configure: "^visitor-".to_owned(),
                write: String::new(),
                read: String::new(),
            },
        )
        .unwrap();
    let client = anonymous(&server).await.expect("anonymous as visitor");
    client.declare_queue("visitor-q").await.expect("visitor's");
    refused(client.declare_queue("q").await, "configure", "queue 'q'");
}
