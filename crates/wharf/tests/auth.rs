//! Users of the real `wharf serve` process (issue #18): `guest` refused from a non-loopback
//! address (a private network namespace made by `unshare -rn`, where an address of our own
//! can be put on an interface), and users added with `wharf user` that survive restarts and
//! `kill -9`. Logins themselves are tested in `crates/wharf-server/tests/auth.rs`.

mod common;

use common::DEADLINE;
use common::process;
use std::ffi::OsStr;
use std::path::Path;
use std::process::{Command, Output};
use wharf_client::{Client, ClientError, ErrorCode};

fn wharf(args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_wharf"))
        .args(args)
        .arg("--data-dir")
        .arg(dir)
        .output()
        .expect("run wharf")
}

async fn login(
    addr: std::net::SocketAddr,
    user: &str,
    password: &str,
) -> Result<Client, ClientError> {
    Client::connect(&format!("wharf://{user}:{password}@{addr}")).await
}

fn assert_refused(result: Result<Client, ClientError>) {
    match result {
        Err(ClientError::ServerClosed {
            code: ErrorCode::AccessRefused,
            ..
        }) => {}
        Err(other) => panic!("expected AccessRefused, got {other:?}"),
        Ok(_) => panic!("expected AccessRefused, the login was accepted"),
    }
}

/// In a network namespace of its own (so a fixed port and an address of our own are fine),
/// the broker listens on every address; `guest` logs in through 127.0.0.1 and is refused
/// through 10.77.0.1, which is not a loopback address, while another user is accepted there.
#[test]
fn guest_is_refused_from_a_non_loopback_address() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let added = wharf(&["user", "add", "alice", "--password", "s3cret"], &data);
    assert!(added.status.success(), "{added:?}");
    // alice alone would leave no guest: add it as a first start would.
    let added = wharf(&["user", "add", "guest", "--password", "guest"], &data);
    assert!(added.status.success(), "{added:?}");
    for user in ["alice", "guest"] {
        let set = wharf(&["permissions", "set", user, ".*", ".*", ".*"], &data);
        assert!(set.status.success(), "{set:?}");
    }
    let script = r#"
        set -u
        ip link set lo up && ip addr add 10.77.0.1/32 dev lo || exit 90
        "$WHARF" serve --bind 0.0.0.0:5800 --data-dir "$DATA" >/dev/null 2>"$DATA/../broker.log" &
        broker=$!
        trap 'kill $broker 2>/dev/null' EXIT
        up=0
        for _ in $(seq 200); do
          if (exec 3<>/dev/tcp/127.0.0.1/5800) 2>/dev/null; then up=1; break; fi
          kill -0 $broker || break
          sleep 0.05
        done
        [ $up = 1 ] || { cat "$DATA/../broker.log"; exit 91; }
        "$WHARF" queues --server wharf://guest:guest@127.0.0.1:5800 >/dev/null; echo "guest-loopback=$?"
        "$WHARF" queues --server wharf://guest:guest@10.77.0.1:5800 >/dev/null 2>"$DATA/../remote.err"; echo "guest-remote=$?"
        "$WHARF" queues --server wharf://alice:s3cret@10.77.0.1:5800 >/dev/null; echo "alice-remote=$?"
        cat "$DATA/../remote.err"
        kill $broker; wait $broker
        grep -c "login refused" "$DATA/../broker.log" | sed 's/^/refusals-logged=/'
    "#;
    // Bounded: whatever goes wrong inside, the namespace and its broker are gone in 60 s.
    let output = Command::new("timeout")
        .args(["60", "unshare", "-rn", "bash", "-c", script])
        .env("WHARF", env!("CARGO_BIN_EXE_wharf"))
        .env("DATA", &data)
        .output()
        .expect("run unshare");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("guest-loopback=0"), "{stdout}\n{stderr}");
    // EXIT_CONNECT: the broker is there, this login is not accepted.
    assert!(stdout.contains("guest-remote=3"), "{stdout}\n{stderr}");
    assert!(stdout.contains("login refused"), "{stdout}");
    assert!(stdout.contains("alice-remote=0"), "{stdout}\n{stderr}");
    assert!(stdout.contains("refusals-logged=1"), "{stdout}");
}

/// Users added with `wharf user` while the broker is stopped are there after a restart and a
/// `kill -9`; a directory that starts with chosen users gets no `guest`; `wharf user` refuses
/// to touch the users of a running broker; a changed password and a deleted user take effect
/// at the next start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_survive_restarts_and_kill_9_and_are_changed_while_stopped() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let added = wharf(
        &[
            "user",
            "add",
            "alice",
            "--password",
            "s3cret",
            "--tags",
            "administrator",
        ],
        &data,
    );
    assert!(added.status.success(), "{added:?}");
    // A new user has no permissions: it cannot connect until it is given some.
    let broker = process::spawn(&data);
    assert_refused(login(broker.addr, "alice", "s3cret").await);
    broker.terminate(DEADLINE);
    let set = wharf(
        &[
            "permissions",
            "set",
            "alice",
            "^alice-",
            "^(amq\\.default|alice-.*)$",
            ".*",
        ],
        &data,
    );
    assert!(set.status.success(), "{set:?}");
    let bad = wharf(&["permissions", "set", "alice", "(", ".*", ".*"], &data);
    assert!(!bad.status.success(), "{bad:?}");
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("bad permission pattern"),
        "{bad:?}"
    );
    // Offline, the users file cannot know which virtual hosts the log holds: any valid name
    // is taken (online, a virtual host that does not exist is refused), an invalid one is not.
    let other_vhost = wharf(
        &[
            "permissions",
            "set",
            "-p",
            "/other",
            "alice",
            ".*",
            ".*",
            ".*",
        ],
        &data,
    );
    assert!(other_vhost.status.success(), "{other_vhost:?}");
    let invalid_vhost = wharf(
        &[
            "permissions",
            "set",
            "-p",
            "a\u{7}b",
            "alice",
            ".*",
            ".*",
            ".*",
        ],
        &data,
    );
    assert!(
        String::from_utf8_lossy(&invalid_vhost.stderr).contains("invalid virtual host name"),
        "{invalid_vhost:?}"
    );
    let topic = wharf(
        &[
            "permissions",
            "set-topic",
            "alice",
            "events",
            "^alice\\.",
            "^alice\\.",
        ],
        &data,
    );
    assert!(topic.status.success(), "{topic:?}");
    let broker = process::spawn(&data);
    let alice = login(broker.addr, "alice", "s3cret").await.expect("alice");
    alice.declare_queue("alice-q").await.expect("own queue");
    let refused = alice.declare_queue("bob-q").await.expect_err("not hers");
    assert_eq!(
        refused.code(),
        Some(ErrorCode::AccessRefused),
        "{refused:?}"
    );
    assert_refused(login(broker.addr, "guest", "guest").await);
    let busy = wharf(&["user", "add", "bob", "--password", "pw"], &data);
    assert!(!busy.status.success(), "{busy:?}");
    assert!(
        String::from_utf8_lossy(&busy.stderr).contains("must be stopped"),
        "{busy:?}"
    );
    broker.kill();
    let broker = process::spawn(&data);
    let alice = login(broker.addr, "alice", "s3cret")
        .await
        .expect("alice after kill -9");
    // Her permissions survived too: still her queues only.
    alice.declare_queue("alice-q2").await.expect("own queue");
    let refused = alice.declare_queue("bob-q").await.expect_err("not hers");
    assert_eq!(
        refused.code(),
        Some(ErrorCode::AccessRefused),
        "{refused:?}"
    );
    broker.terminate(DEADLINE);
    let listed = wharf(&["permissions", "list"], &data);
    assert_eq!(
        String::from_utf8_lossy(&listed.stdout),
        "user\tconfigure\twrite\tread\nalice\t^alice-\t^(amq\\.default|alice-.*)$\t.*\n"
    );
    let listed = wharf(&["permissions", "list-topic"], &data);
    assert_eq!(
        String::from_utf8_lossy(&listed.stdout),
        "user\texchange\twrite\tread\nalice\tevents\t^alice\\.\t^alice\\.\n"
    );
    let changed = wharf(&["user", "passwd", "alice", "--password", "n3w"], &data);
    assert!(changed.status.success(), "{changed:?}");
    let added = wharf(
        &[
            "user",
            "add",
            "bob",
            "--password",
            "pw",
            "--tags",
            "monitoring",
        ],
        &data,
    );
    assert!(added.status.success(), "{added:?}");
    let listed = wharf(&["user", "list"], &data);
    assert_eq!(
        String::from_utf8_lossy(&listed.stdout),
        "alice\t[administrator]\nbob\t[monitoring]\n"
    );
    let set = wharf(&["permissions", "set", "bob", ".*", ".*", ".*"], &data);
    assert!(set.status.success(), "{set:?}");
    let deleted = wharf(&["user", "delete", "bob"], &data);
    assert!(deleted.status.success(), "{deleted:?}");
    let broker = process::spawn_with(
        &data,
        &[OsStr::new("--default-pass"), OsStr::new("x")],
        DEADLINE,
    );
    assert_refused(login(broker.addr, "alice", "s3cret").await);
    login(broker.addr, "alice", "n3w")
        .await
        .expect("the new password");
    assert_refused(login(broker.addr, "bob", "pw").await);
    broker.terminate(DEADLINE);
}

/// `wharf user` and `wharf permissions` without `--data-dir` administer a running broker over
/// the protocol, as an administrator; the changes are durable at once (they survive `kill
/// -9`), and a user without the administrator tag is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_and_permissions_are_administered_online_and_survive_kill_9() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let broker = process::spawn(&data);
    let admin = format!("wharf://guest:guest@{}", broker.addr);
    let online = |args: &[&str], server: &str| {
        Command::new(env!("CARGO_BIN_EXE_wharf"))
            .args(args)
            .args(["--server", server])
            .output()
            .expect("run wharf")
    };
    for args in [
        &[
            "user",
            "add",
            "bob",
            "--password",
            "pw",
            "--tags",
            "monitoring",
        ][..],
        &["permissions", "set", "bob", "^bob-", ".*", ".*"][..],
    ] {
        let done = online(args, &admin);
        assert!(done.status.success(), "{done:?}");
    }
    let listed = online(&["user", "list"], &admin);
    assert_eq!(
        String::from_utf8_lossy(&listed.stdout),
        "bob\t[monitoring]\nguest\t[administrator]\n"
    );
    let bob = login(broker.addr, "bob", "pw").await.expect("bob");
    bob.declare_queue("bob-q").await.expect("his queue");
    let refused = bob.declare_queue("q").await.expect_err("not his");
    assert_eq!(refused.code(), Some(ErrorCode::AccessRefused));
    // bob is no administrator.
    let denied = online(
        &["user", "add", "eve", "--password", "pw"],
        &format!("wharf://bob:pw@{}", broker.addr),
    );
    assert!(!denied.status.success(), "{denied:?}");
    assert!(
        String::from_utf8_lossy(&denied.stderr).contains("administrator tag"),
        "{denied:?}"
    );
    broker.kill();
    let broker = process::spawn(&data);
    let bob = login(broker.addr, "bob", "pw")
        .await
        .expect("bob after kill -9");
    bob.declare_queue("bob-q2")
        .await
        .expect("his permissions too");
    let admin = format!("wharf://guest:guest@{}", broker.addr);
    let listed = online(&["permissions", "list"], &admin);
    assert_eq!(
        String::from_utf8_lossy(&listed.stdout),
        "user\tconfigure\twrite\tread\nbob\t^bob-\t.*\t.*\nguest\t.*\t.*\t.*\n"
    );
    broker.terminate(DEADLINE);
}

/// Virtual hosts, what they hold, their limits and the permissions in them survive `kill -9`
/// of the real process: each change was acknowledged only once logged (the virtual hosts
/// and their queues in the broker's log, permissions in the users file).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vhosts_and_their_permissions_survive_kill_9() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let broker = process::spawn(&data);
    let admin = Client::connect(&format!("wharf://guest:guest@{}", broker.addr))
        .await
        .expect("guest");
    let limits = wharf_client::VhostLimits {
        max_connections: Some(4),
        max_queues: Some(8),
    };
    admin.add_vhost("tenant-1", limits).await.unwrap();
    admin
        .add_vhost("tenant-2", wharf_client::VhostLimits::default())
        .await
        .unwrap();
    admin.add_user("carol", "pw", &[]).await.unwrap();
    admin
        .set_permissions(wharf_client::PermissionInfo {
            user: "carol".into(),
            vhost: "tenant-1".into(),
            configure: ".*".into(),
            write: ".*".into(),
            read: "^carol-".into(),
        })
        .await
        .unwrap();
    let carol = Client::connect(&format!("wharf://carol:pw@{}/tenant-1", broker.addr))
        .await
        .expect("carol in tenant-1");
    carol
        .declare_queue("carol-jobs")
        .durable(true)
        .await
        .unwrap();
    for body in ["1", "2"] {
        carol
            .publish(
                "",
                "carol-jobs",
                wharf_client::Message::new(body).persistent(true),
            )
            .await
            .unwrap();
    }
    admin.delete_vhost("tenant-2").await.unwrap();
    broker.kill();
    let broker = process::spawn(&data);
    let admin = Client::connect(&format!("wharf://guest:guest@{}", broker.addr))
        .await
        .expect("guest after kill -9");
    let vhosts: Vec<(String, wharf_client::VhostLimits)> = admin
        .list_vhosts()
        .await
        .unwrap()
        .into_iter()
        .map(|info| (info.name, info.limits))
        .collect();
    assert_eq!(
        vhosts,
        [
            ("/".to_owned(), wharf_client::VhostLimits::default()),
            ("tenant-1".to_owned(), limits)
        ]
    );
    let carol = Client::connect(&format!("wharf://carol:pw@{}/tenant-1", broker.addr))
        .await
        .expect("carol in tenant-1 after kill -9");
    assert_eq!(carol.queue_stats("carol-jobs").await.unwrap().ready, 2);
    let Err(refused) = carol
        .consume("other", wharf_client::ConsumeOptions::default())
        .await
    else {
        panic!("her read permission lost its pattern");
    };
    assert_eq!(refused.code(), Some(ErrorCode::AccessRefused));
    assert_refused(Client::connect(&format!("wharf://carol:pw@{}/", broker.addr)).await);
    broker.terminate(DEADLINE);
}
