//! Users' own limits through the real `wharf serve` process and the `wharf` CLI (protocol
//! 1.3): `wharf user set-limits|list-limits` over the protocol as an administrator, and each
//! limit crossed (a login beyond `max_connections`, a new queue beyond `max_queues`).

mod common;

use common::DEADLINE;
use common::process;
use common::{assert_exit, assert_success, online, stdout};
use std::process::{Command, Output};
use std::time::Instant;
use wharf_client::{Client, ClientError, ErrorCode};

/// The rows of `wharf user list-limits`, each split on whitespace (no user name here has any).
fn limit_rows(server: &str) -> Vec<Vec<String>> {
    let listed = online(&["user", "list-limits"], server);
    assert_success(&listed);
    let text = stdout(&listed);
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().expect("a header").split_whitespace().collect();
    assert_eq!(header, ["USER", "MAX", "CONNECTIONS", "MAX", "QUEUES"]);
    lines
        .map(|line| line.split_whitespace().map(str::to_owned).collect())
        .collect()
}

/// `wharf user set-limits|list-limits` administer a running broker's user limits, which it
/// enforces: a login beyond the user's `max_connections` is refused while other users log in,
/// and a new queue beyond its `max_queues` is refused while redeclaring one is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_limits_are_administered_online_and_enforced() {
    let dir = tempfile::tempdir().expect("temp dir");
    let broker = process::spawn(&dir.path().join("data"));
    let admin = format!("wharf://guest:guest@{}", broker.addr);
    let alice = format!("wharf://alice:pw@{}", broker.addr);
    assert_success(&online(
        &["user", "add", "alice", "--password", "pw"],
        &admin,
    ));
    assert_success(&online(
        &["permissions", "set", "alice", ".*", ".*", ".*"],
        &admin,
    ));

    // Every user is listed, by name, without limits of its own at first.
    assert_eq!(
        limit_rows(&admin),
        [["alice", "-", "-"], ["guest", "-", "-"]]
    );
    let set = online(
        &[
            "user",
            "set-limits",
            "alice",
            "--max-connections",
            "1",
            "--max-queues",
            "2",
        ],
        &admin,
    );
    assert_success(&set);
    assert_eq!(stdout(&set), "set the limits of alice\n");
    assert_eq!(
        limit_rows(&admin),
        [["alice", "1", "2"], ["guest", "-", "-"]]
    );

    // Its connection limit: 1. Other users' logins are not counted.
    let held = Client::connect(&alice)
        .await
        .expect("the first connection fits");
    match Client::connect(&alice).await {
        Err(ClientError::ServerClosed {
            code: ErrorCode::ResourceLimit,
            reason,
        }) => assert!(
            reason.contains("connection limit (1) of user 'alice' is reached"),
            "{reason}"
        ),
        other => panic!("expected ResourceLimit, got {other:?}"),
    }
    assert_exit(&online(&["queues"], &alice), 3, "alice");
    assert_success(&online(&["queues"], &admin));
    held.close().await.expect("close");
    // The slot is free again once the server has seen the close.
    let deadline = Instant::now() + DEADLINE;
    while !online(&["queues"], &alice).status.success() {
        assert!(Instant::now() < deadline, "the slot was never freed");
        tokio::task::yield_now().await;
    }

    // Limits are replaced: the connection limit left out is lifted.
    assert_success(&online(
        &["user", "set-limits", "alice", "--max-queues", "2"],
        &admin,
    ));
    assert_eq!(
        limit_rows(&admin),
        [["alice", "-", "2"], ["guest", "-", "-"]]
    );

    // Its queue limit: 2, counting the queues it declared that still exist.
    assert_success(&online(&["declare", "queue", "guests"], &admin));
    assert_success(&online(&["declare", "queue", "first"], &alice));
    assert_success(&online(&["declare", "queue", "second"], &alice));
    assert_success(&online(&["declare", "queue", "first"], &alice));
    assert_exit(&online(&["declare", "queue", "third"], &alice), 5, "");
    assert_success(&online(&["declare", "queue", "more"], &admin));
    assert_success(&online(&["delete", "queue", "second"], &alice));
    assert_success(&online(&["declare", "queue", "third"], &alice));
    assert_exit(&online(&["declare", "queue", "fourth"], &alice), 5, "");

    // Both lifted.
    assert_success(&online(&["user", "set-limits", "alice"], &admin));
    assert_eq!(
        limit_rows(&admin),
        [["alice", "-", "-"], ["guest", "-", "-"]]
    );
    assert_success(&online(&["declare", "queue", "fourth"], &alice));
    broker.terminate(DEADLINE);
}

/// An unknown user and a user who is not an administrator are refused.
#[test]
fn unknown_users_and_non_administrators_are_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let broker = process::spawn(&dir.path().join("data"));
    let admin = format!("wharf://guest:guest@{}", broker.addr);
    assert_exit(
        &online(
            &["user", "set-limits", "nobody", "--max-connections", "1"],
            &admin,
        ),
        1,
        "nobody",
    );
    assert_success(&online(&["user", "add", "bob", "--password", "pw"], &admin));
    assert_success(&online(
        &["permissions", "set", "bob", ".*", ".*", ".*"],
        &admin,
    ));
    let bob = format!("wharf://bob:pw@{}", broker.addr);
    for args in [
        &["user", "set-limits", "bob"][..],
        &["user", "list-limits"][..],
    ] {
        assert_exit(&online(args, &bob), 1, "administrator tag");
    }
    broker.terminate(DEADLINE);
}

/// Runs `wharf ARGS --data-dir DIR` (offline: the broker stopped).
fn offline(args: &[&str], dir: &std::path::Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_wharf"))
        .args(args)
        .arg("--data-dir")
        .arg(dir)
        .output()
        .expect("run wharf")
}

/// `wharf user set-limits|list-limits --data-dir` edit a stopped broker's users file; the
/// broker started on it enforces the limits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_limits_set_offline_are_enforced_at_the_next_start() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    for args in [
        &["user", "add", "erin", "--password", "pw"][..],
        &["permissions", "set", "erin", ".*", ".*", ".*"][..],
        &["user", "set-limits", "erin", "--max-connections", "1"][..],
    ] {
        assert_success(&offline(args, &data));
    }
    let listed = offline(&["user", "list-limits"], &data);
    assert_success(&listed);
    assert!(stdout(&listed).contains("erin"), "{listed:?}");
    assert_exit(
        &offline(
            &["user", "set-limits", "nobody", "--max-queues", "1"],
            &data,
        ),
        1,
        "no user \"nobody\"",
    );
    let broker = process::spawn(&data);
    let url = format!("wharf://erin:pw@{}", broker.addr);
    let _first = Client::connect(&url)
        .await
        .expect("erin's first connection");
    let Err(err) = Client::connect(&url).await else {
        panic!("her second connection is refused");
    };
    assert!(
        matches!(&err, ClientError::ServerClosed { code: ErrorCode::ResourceLimit, reason }
            if reason.contains("connection limit (1) of user 'erin'")),
        "{err:?}"
    );
    broker.terminate(DEADLINE);
}
