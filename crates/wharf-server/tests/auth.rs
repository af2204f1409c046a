//! Authentication end to end (issue #18): SASL `PLAIN` against the broker's users, refusals
//! with `AccessRefused` after the constant delay that do not tell an unknown user from a wrong
//! password, unknown mechanisms, `ANONYMOUS` only when enabled. The loopback rule for `guest`
//! from another address and the users' durability across restarts and `kill -9` are in
//! `crates/wharf/tests/auth.rs` (they need a process of their own).

mod common;

use common::{Raw, TestServer, server_still_serves};
use std::time::{Duration, Instant};
use wharf_client::{Client, ClientError, ClientOptions, Credentials};
use wharf_protocol::{ErrorCode, Frame, Hello, Preamble};
use wharf_server::auth::{DEFAULT_VHOST, Permission, Tag, Users};

const DELAY: Duration = Duration::from_millis(300);

/// A server whose data directory holds `guest` (created by the server) and `alice`.
async fn server(tweak: impl FnOnce(&mut wharf_server::ServerConfig)) -> TestServer {
    TestServer::start_with(|config| {
        let users = Users::open(&config.data_dir, "guest", "guest").expect("users");
        users
            .add("alice", "s3cret", &[Tag::Monitoring])
            .expect("add alice");
        users
            .set_permissions("alice", DEFAULT_VHOST, Permission::full())
            .expect("alice's permissions");
        config.auth_failure_delay = DELAY;
        tweak(config);
    })
    .await
}

async fn login(server: &TestServer, credentials: Credentials) -> Result<Client, ClientError> {
    let options = ClientOptions {
        credentials,
        ..ClientOptions::default()
    };
    Client::connect_with(&server.addr().to_string(), options).await
}

/// The `Close` a refused login gets, and how long after the `Hello` it came.
async fn refused(server: &TestServer, mechanism: &str, data: &'static [u8]) -> (String, Duration) {
    let mut raw = Raw::connect(server.addr()).await;
    raw.send_bytes(&Preamble::CURRENT.encode()).await;
    let mut hello = Raw::hello();
    if let Frame::Hello(Hello { credentials, .. }) = &mut hello {
        credentials.mechanism = mechanism.into();
        credentials.data = bytes::Bytes::from_static(data);
    }
    let sent = Instant::now();
    raw.send(&hello).await;
    raw.read_preamble().await.expect("preamble");
    let close = raw.expect_close().await;
    assert_eq!(close.code, ErrorCode::AccessRefused, "{close:?}");
    (close.reason, sent.elapsed())
}

#[tokio::test]
async fn a_user_logs_in_with_its_password_and_the_default_client_is_guest() {
    let server = server(|_| {}).await;
    let alice = login(&server, Credentials::plain("alice", "s3cret"))
        .await
        .expect("alice logs in");
    alice.declare_queue("q").await.unwrap();
    // A URL's user-info is used as PLAIN credentials.
    let url = format!("wharf://alice:s3cret@{}", server.addr());
    Client::connect(&url).await.expect("alice from the URL");
    // No credentials at all: the client sends guest/guest, which loopback accepts.
    Client::connect(&server.addr().to_string())
        .await
        .expect("guest from loopback");
}

#[tokio::test]
async fn a_wrong_password_and_an_unknown_user_are_refused_alike_after_the_delay() {
    let server = server(|_| {}).await;
    let wrong = login(&server, Credentials::plain("alice", "wrong"))
        .await
        .expect_err("refused");
    let unknown = login(&server, Credentials::plain("mallory", "s3cret"))
        .await
        .expect_err("refused");
    let (
        ClientError::ServerClosed { code, reason },
        ClientError::ServerClosed { reason: other, .. },
    ) = (&wrong, &unknown)
    else {
        panic!("expected ServerClosed: {wrong:?} / {unknown:?}");
    };
    assert_eq!(*code, ErrorCode::AccessRefused);
    assert_eq!(
        reason, other,
        "nothing tells an unknown user from a wrong password"
    );
    let (_, took) = refused(&server, "PLAIN", b"\0alice\0wrong").await;
    assert!(took >= DELAY, "answered after {took:?}");
    let (_, took) = refused(&server, "PLAIN", b"\0mallory\0wrong").await;
    assert!(took >= DELAY, "answered after {took:?}");
    server_still_serves(server.addr(), "after-refusals").await;
}

#[tokio::test]
async fn unknown_mechanisms_malformed_plain_and_anonymous_are_refused() {
    let server = server(|_| {}).await;
    let (reason, _) = refused(&server, "SCRAM-SHA-256", b"").await;
    assert!(reason.contains("SCRAM-SHA-256"), "{reason}");
    let (reason, _) = refused(&server, "PLAIN", b"no separators").await;
    assert!(reason.contains("malformed"), "{reason}");
    let (reason, _) = refused(&server, "ANONYMOUS", b"").await;
    assert!(reason.contains("anonymous"), "{reason}");
    let anonymous = login(&server, Credentials::Anonymous)
        .await
        .expect_err("refused");
    assert!(
        matches!(
            anonymous,
            ClientError::ServerClosed {
                code: ErrorCode::AccessRefused,
                ..
            }
        ),
        "{anonymous:?}"
    );
    server_still_serves(server.addr(), "after-mechanisms").await;
}

#[tokio::test]
async fn anonymous_logins_are_accepted_when_enabled() {
    let server = server(|config| config.allow_anonymous = true).await;
    let client = login(&server, Credentials::Anonymous)
        .await
        .expect("anonymous enabled");
    client.declare_queue("anon").await.unwrap();
}

/// `connections_per_user_max`: a user's next connection over it gets `ResourceLimit`, other
/// users are not affected, and a closed connection gives its place back.
#[tokio::test]
async fn a_user_holds_at_most_its_connections_quota() {
    let server = server(|config| config.connections_per_user_max = 2).await;
    let first = login(&server, Credentials::plain("alice", "s3cret"))
        .await
        .unwrap();
    let _second = login(&server, Credentials::plain("alice", "s3cret"))
        .await
        .unwrap();
    let third = login(&server, Credentials::plain("alice", "s3cret"))
        .await
        .expect_err("over the quota");
    assert!(
        matches!(
            &third,
            ClientError::ServerClosed {
                code: ErrorCode::ResourceLimit,
                reason,
            } if reason.contains("alice")
        ),
        "{third:?}"
    );
    let _guest = Client::connect(&server.addr().to_string())
        .await
        .expect("another user is not affected");
    first.close().await.unwrap();
    let deadline = Instant::now() + common::DEADLINE;
    while login(&server, Credentials::plain("alice", "s3cret"))
        .await
        .is_err()
    {
        assert!(
            Instant::now() < deadline,
            "the closed connection's place never returned"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
