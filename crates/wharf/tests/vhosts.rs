//! Virtual hosts through the real `wharf serve` process and the `wharf` CLI (protocol 1.3):
//! `wharf vhost add|delete|list|limits` over the protocol as an administrator, the address's
//! path choosing the virtual host of the other commands, queues of different virtual hosts
//! apart, and each virtual host's limits crossed.

mod common;

use common::DEADLINE;
use common::process;
use common::{assert_exit, assert_success, online, stdout};
use wharf_client::{Client, ClientError, ErrorCode};

/// The row of `wharf vhost list` for `name`, split on whitespace (no name here has any).
fn vhost_row(server: &str, name: &str) -> Option<Vec<String>> {
    let listed = online(&["vhost", "list"], server);
    assert_success(&listed);
    let text = stdout(&listed);
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().expect("a header").split_whitespace().collect();
    assert_eq!(
        header,
        [
            "NAME",
            "MAX",
            "CONNECTIONS",
            "MAX",
            "QUEUES",
            "CONNECTIONS",
            "QUEUES"
        ]
    );
    lines
        .map(|line| {
            line.split_whitespace()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .find(|row| row[0] == name)
}

/// The ready messages of `queue` in `wharf queues` (columns: name, durable, ready, ...).
fn ready(server: &str, queue: &str) -> Option<u64> {
    let listed = online(&["queues"], server);
    assert_success(&listed);
    stdout(&listed).lines().skip(1).find_map(|line| {
        let row: Vec<&str> = line.split_whitespace().collect();
        (row[0] == queue).then(|| row[2].parse().expect("a count"))
    })
}

/// `wharf vhost add|list|limits|delete` administer a running broker's virtual hosts; the
/// address's path chooses the virtual host of the other commands, whose queues are apart from
/// those of `/`; and a virtual host's queue limit is enforced.
#[test]
fn vhosts_are_administered_online_and_keep_their_queues_apart() {
    let dir = tempfile::tempdir().expect("temp dir");
    let broker = process::spawn(&dir.path().join("data"));
    let admin = format!("wharf://guest:guest@{}", broker.addr);
    let staging = format!("{admin}/staging");

    let added = online(&["vhost", "add", "staging", "--max-queues", "2"], &admin);
    assert_success(&added);
    assert_eq!(stdout(&added), "added vhost staging\n");
    assert_eq!(
        vhost_row(&admin, "staging").expect("listed"),
        ["staging", "-", "2", "0", "0"]
    );
    assert!(vhost_row(&admin, "/").is_some(), "/ is listed too");
    assert_exit(&online(&["vhost", "add", "staging"], &admin), 5, "staging");

    // guest may not use it before it has permissions there.
    assert_exit(&online(&["queues"], &staging), 3, "staging");
    assert_success(&online(
        &[
            "permissions",
            "set",
            "-p",
            "staging",
            "guest",
            ".*",
            ".*",
            ".*",
        ],
        &admin,
    ));
    let listed = online(&["permissions", "list", "--vhost", "staging"], &admin);
    assert_success(&listed);
    assert_eq!(
        stdout(&listed),
        "user\tconfigure\twrite\tread\nguest\t.*\t.*\t.*\n"
    );

    // The same queue name in two virtual hosts: two queues.
    assert_success(&online(&["declare", "queue", "jobs"], &staging));
    assert_success(&online(&["declare", "queue", "jobs"], &admin));
    assert_success(&online(
        &["publish", "--routing-key", "jobs", "--body", "staged"],
        &staging,
    ));
    assert_eq!(ready(&staging, "jobs"), Some(1));
    assert_eq!(ready(&admin, "jobs"), Some(0));
    let consumed = online(&["consume", "jobs", "--count", "1", "--ack"], &staging);
    assert_success(&consumed);
    assert!(stdout(&consumed).contains("staged"), "{consumed:?}");
    assert_eq!(ready(&staging, "jobs"), Some(0));

    // Its queue limit: 2.
    assert_success(&online(&["declare", "queue", "second"], &staging));
    assert_exit(&online(&["declare", "queue", "third"], &staging), 5, "");
    assert_eq!(
        vhost_row(&admin, "staging").expect("listed"),
        ["staging", "-", "2", "0", "2"]
    );
    // Limits are replaced: none left out is kept.
    let limited = online(
        &["vhost", "limits", "staging", "--max-connections", "5"],
        &admin,
    );
    assert_success(&limited);
    assert_eq!(stdout(&limited), "set the limits of vhost staging\n");
    assert_eq!(
        vhost_row(&admin, "staging").expect("listed"),
        ["staging", "5", "-", "0", "2"]
    );
    assert_success(&online(&["declare", "queue", "third"], &staging));

    assert_eq!(
        stdout(&online(&["vhost", "delete", "staging"], &admin)),
        "deleted vhost staging\n"
    );
    assert!(vhost_row(&admin, "staging").is_none());
    assert_exit(
        &online(&["vhost", "delete", "staging"], &admin),
        4,
        "staging",
    );
    assert_exit(
        &online(&["vhost", "limits", "staging"], &admin),
        4,
        "staging",
    );
    // The queue of the same name in / is untouched.
    assert_eq!(ready(&admin, "jobs"), Some(0));
    broker.terminate(DEADLINE);
}

/// An unknown virtual host, a virtual host at its connection limit and a user who is not an
/// administrator are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_vhosts_full_vhosts_and_non_administrators_are_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let broker = process::spawn(&dir.path().join("data"));
    let admin = format!("wharf://guest:guest@{}", broker.addr);

    // An unknown virtual host: refused at login.
    assert_exit(
        &online(&["queues"], &format!("{admin}/nowhere")),
        3,
        "vhost 'nowhere' not found",
    );
    match Client::connect(&format!("{admin}/nowhere")).await {
        Err(ClientError::ServerClosed {
            code: ErrorCode::AccessRefused,
            reason,
        }) => assert!(reason.contains("vhost 'nowhere' not found"), "{reason}"),
        other => panic!("expected AccessRefused, got {other:?}"),
    }

    // A virtual host at its connection limit: the next login is refused, others go on.
    assert_success(&online(
        &["vhost", "add", "small", "--max-connections", "1"],
        &admin,
    ));
    assert_success(&online(
        &[
            "permissions",
            "set",
            "-p",
            "small",
            "guest",
            ".*",
            ".*",
            ".*",
        ],
        &admin,
    ));
    let held = Client::connect(&format!("{admin}/small"))
        .await
        .expect("the first connection fits");
    match Client::connect(&format!("{admin}/small")).await {
        Err(err) => assert_eq!(err.code(), Some(ErrorCode::ResourceLimit), "{err:?}"),
        Ok(_) => panic!("a second connection to a vhost limited to 1 was accepted"),
    }
    assert_exit(&online(&["queues"], &format!("{admin}/small")), 3, "");
    assert_success(&online(&["queues"], &admin));
    assert_eq!(
        vhost_row(&admin, "small").expect("listed"),
        ["small", "1", "-", "1", "0"]
    );
    held.close().await.expect("close");
    // The slot is free again once the server has seen the close.
    let deadline = std::time::Instant::now() + DEADLINE;
    while !online(&["queues"], &format!("{admin}/small"))
        .status
        .success()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the slot was never freed"
        );
        tokio::task::yield_now().await;
    }

    // bob is no administrator.
    assert_success(&online(&["user", "add", "bob", "--password", "pw"], &admin));
    assert_success(&online(
        &["permissions", "set", "bob", ".*", ".*", ".*"],
        &admin,
    ));
    let bob = format!("wharf://bob:pw@{}", broker.addr);
    for args in [
        &["vhost", "add", "mine"][..],
        &["vhost", "list"][..],
        &["vhost", "limits", "small"][..],
        &["vhost", "delete", "small"][..],
    ] {
        assert_exit(&online(args, &bob), 5, "administrator tag");
    }
    broker.terminate(DEADLINE);
}
