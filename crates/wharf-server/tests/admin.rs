//! Online administration over the protocol (1.2, issue #18): users and permissions changed by
//! an administrator's client apply at once, survive a restart, and are refused to anyone
//! without the `administrator` tag; bad requests get typed errors; a connection's requests
//! are applied in the order sent; too many waiting ones are refused. The CLI's online mode
//! and `kill -9` are in `crates/wharf/tests/auth.rs`.

mod common;

use common::TestServer;
use wharf_client::{Client, ClientError, ClientOptions, Credentials, PermissionInfo};
use wharf_client::{TopicPermissionInfo, UserInfo};
use wharf_protocol::ErrorCode;

async fn login(addr: &str, user: &str, password: &str) -> Result<Client, ClientError> {
    let options = ClientOptions {
        credentials: Credentials::plain(user, password),
        ..ClientOptions::default()
    };
    Client::connect_with(addr, options).await
}

fn full(user: &str) -> PermissionInfo {
    PermissionInfo {
        user: user.to_owned(),
        vhost: "/".to_owned(),
        configure: ".*".to_owned(),
        write: ".*".to_owned(),
        read: ".*".to_owned(),
    }
}

#[track_caller]
fn code(result: Result<(), ClientError>) -> ErrorCode {
    result.expect_err("refused").code().expect("a server error")
}

#[tokio::test]
async fn an_administrator_manages_users_and_permissions_online() {
    let server = TestServer::start().await;
    let addr = server.addr().to_string();
    let admin = Client::connect(&addr)
        .await
        .expect("guest, an administrator");
    admin
        .add_user("alice", "s3cret", &["monitoring"])
        .await
        .unwrap();
    // No permissions yet: alice cannot connect.
    let err = login(&addr, "alice", "s3cret")
        .await
        .expect_err("no vhost access");
    assert_eq!(err.code(), Some(ErrorCode::AccessRefused));
    admin.set_permissions(full("alice")).await.unwrap();
    let alice = login(&addr, "alice", "s3cret").await.expect("alice");
    alice.declare_queue("alice-q").await.unwrap();
    assert_eq!(
        admin.list_users().await.unwrap(),
        vec![
            UserInfo {
                name: "alice".into(),
                tags: vec!["monitoring".into()]
            },
            UserInfo {
                name: "guest".into(),
                tags: vec!["administrator".into()]
            },
        ]
    );
    assert_eq!(
        admin.list_permissions("/").await.unwrap(),
        vec![full("alice"), full("guest")]
    );
    // Not an administrator: every administration request is refused, the connection lives.
    assert_eq!(
        code(alice.add_user("mallory", "pw", &[]).await),
        ErrorCode::AccessRefused
    );
    assert_eq!(
        alice.list_users().await.unwrap_err().code(),
        Some(ErrorCode::AccessRefused)
    );
    assert_eq!(
        code(alice.set_permissions(full("alice")).await),
        ErrorCode::AccessRefused
    );
    alice
        .declare_queue("alice-q2")
        .await
        .expect("still connected");
    // Promoted, alice may administer from her next request.
    admin
        .set_user_tags("alice", &["administrator"])
        .await
        .unwrap();
    alice
        .add_user("bob", "pw", &[])
        .await
        .expect("now an administrator");
    // A changed password: the old one no longer logs in.
    admin.change_password("alice", "n3w").await.unwrap();
    assert!(login(&addr, "alice", "s3cret").await.is_err());
    login(&addr, "alice", "n3w")
        .await
        .expect("the new password");
    // Topic permissions.
    let topic = TopicPermissionInfo {
        user: "bob".into(),
        vhost: "/".into(),
        exchange: "events".into(),
        write: "^bob\\.".into(),
        read: ".*".into(),
    };
    admin.set_topic_permissions(topic.clone()).await.unwrap();
    assert_eq!(
        admin.list_topic_permissions("/").await.unwrap(),
        vec![topic]
    );
    admin
        .clear_topic_permissions("bob", "/", Some("events"))
        .await
        .unwrap();
    assert!(admin.list_topic_permissions("/").await.unwrap().is_empty());
    // Typed errors.
    assert_eq!(
        code(admin.add_user("bob", "pw", &[]).await),
        ErrorCode::PreconditionFailed
    );
    assert_eq!(code(admin.delete_user("nobody").await), ErrorCode::NotFound);
    assert_eq!(
        code(admin.add_user("carol", "pw", &["wizard"]).await),
        ErrorCode::InvalidArgument
    );
    assert_eq!(
        code(admin.add_user("carol", "", &[]).await),
        ErrorCode::InvalidArgument
    );
    let mut bad = full("bob");
    bad.read = "(".into();
    assert_eq!(
        code(admin.set_permissions(bad).await),
        ErrorCode::InvalidArgument
    );
    let mut elsewhere = full("bob");
    elsewhere.vhost = "/other".into();
    assert_eq!(
        code(admin.set_permissions(elsewhere).await),
        ErrorCode::NotFound
    );
    assert_eq!(
        code(admin.clear_permissions("nobody", "/").await),
        ErrorCode::NotFound
    );
    // Without permissions its connection is closed at its next frame; deleted, it cannot log
    // in again.
    admin.clear_permissions("alice", "/").await.unwrap();
    let closed = alice.declare_queue("alice-q3").await.unwrap_err();
    assert_eq!(closed.code(), Some(ErrorCode::ConnectionForced));
    admin.delete_user("alice").await.unwrap();
    assert!(login(&addr, "alice", "n3w").await.is_err());
    // Everything above is in the users file: a restarted broker has it.
    let dir = server.dir;
    server.server.stop().await.unwrap();
    let mut config = wharf_server::ServerConfig::ephemeral(dir.path());
    config.auth_failure_delay = std::time::Duration::from_millis(10);
    let restarted = wharf_server::RunningServer::start(config).await.unwrap();
    let addr = restarted.addr.to_string();
    let admin = Client::connect(&addr).await.unwrap();
    let names: Vec<String> = admin
        .list_users()
        .await
        .unwrap()
        .into_iter()
        .map(|user| user.name)
        .collect();
    assert_eq!(names, ["bob", "guest"]);
    assert!(login(&addr, "alice", "n3w").await.is_err());
}

#[tokio::test]
async fn a_connections_requests_apply_in_order_and_a_flood_is_bounded() {
    let server = TestServer::start().await;
    let admin = Client::connect(&server.addr().to_string()).await.unwrap();
    // Sent together: the permissions are set after the user exists.
    let (added, permitted) = tokio::join!(
        admin.add_user("dave", "pw", &[]),
        admin.set_permissions(full("dave"))
    );
    added.unwrap();
    permitted.unwrap();
    login(&server.addr().to_string(), "dave", "pw")
        .await
        .expect("dave, with permissions");
    // Hundreds at once: those beyond the connection's queue are refused at once, the rest done.
    let mut requests = tokio::task::JoinSet::new();
    for _ in 0..300 {
        let admin = admin.clone();
        requests.spawn(async move { admin.set_permissions(full("dave")).await });
    }
    let results: Vec<Result<(), ClientError>> = requests.join_all().await;
    let refused = results
        .iter()
        .filter(|result| matches!(result, Err(err) if err.code() == Some(ErrorCode::ResourceLimit)))
        .count();
    let done = results.iter().filter(|result| result.is_ok()).count();
    assert_eq!(refused + done, 300, "{results:?}");
    eprintln!("flood: refused {refused}, done {done}");
    assert!(refused > 0 && done >= 64, "refused {refused}, done {done}");
    admin.list_users().await.expect("the connection serves on");
}

/// An `ANONYMOUS` login acts with its user's permissions, but never administers, even when
/// that user is an administrator (guest, by default).
#[tokio::test]
async fn an_anonymous_login_never_administers() {
    let server = TestServer::start_with(|config| config.allow_anonymous = true).await;
    let options = ClientOptions {
        credentials: Credentials::Anonymous,
        ..ClientOptions::default()
    };
    let anonymous = Client::connect_with(&server.addr().to_string(), options)
        .await
        .expect("anonymous, as guest");
    anonymous
        .declare_queue("q")
        .await
        .expect("guest's permissions");
    let err = anonymous
        .add_user("eve", "pw", &["administrator"])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::AccessRefused), "{err:?}");
    assert!(err.to_string().contains("ANONYMOUS"), "{err}");
    assert!(anonymous.list_users().await.is_err());
}

/// The users file holds at most `USERS_MAX` (10,000) users: one more added over the
/// protocol is refused with `ResourceLimit`, and the broker goes on. (The file is filled
/// directly, with copies of guest's hash: 10,000 KDF runs would take minutes.)
#[tokio::test]
async fn a_user_past_the_users_limit_is_refused_with_resource_limit() {
    let server = TestServer::start().await;
    let dir = server.dir;
    server.server.stop().await.unwrap();
    let path = dir.path().join("users.json");
    let mut file: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let users = file["users"].as_object_mut().unwrap();
    let hash = users["guest"]["password_hash"].clone();
    for idx in 1..wharf_server::limits::USERS_MAX {
        users.insert(
            format!("user-{idx}"),
            serde_json::json!({ "password_hash": hash }),
        );
    }
    assert_eq!(users.len(), wharf_server::limits::USERS_MAX);
    std::fs::write(&path, serde_json::to_vec(&file).unwrap()).unwrap();
    let config = wharf_server::ServerConfig::ephemeral(dir.path());
    let restarted = wharf_server::RunningServer::start(config).await.unwrap();
    let admin = Client::connect(&restarted.addr.to_string()).await.unwrap();
    let err = admin.add_user("one-more", "pw", &[]).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::ResourceLimit), "{err:?}");
    assert!(err.to_string().contains("maximum of 10000 users"), "{err}");
    // Deleting one makes room again.
    admin.delete_user("user-1").await.unwrap();
    admin.add_user("one-more", "pw", &[]).await.unwrap();
}
