//! TLS with the real binaries (issue #18): `wharf tls gen` makes a CA and certificates, `wharf
//! serve --tls-cert --tls-key --no-plaintext` serves TLS only, and the CLI publishes and
//! consumes over `wharfs://` with `--ca`, logs in with its client certificate (`--cert --key
//! --external`), and exits 3 with a clear message for an untrusted broker or a plaintext
//! address. The protocol-level TLS cases are in `crates/wharf-server/tests/tls.rs`.

mod common;

use common::DEADLINE;
use common::process;
use std::ffi::OsStr;
use std::path::Path;
use std::process::{Command, Output};

fn wharf(args: &[&str]) -> Output {
    Command::new("timeout")
        .arg("30")
        .arg(env!("CARGO_BIN_EXE_wharf"))
        .args(args)
        .output()
        .expect("run wharf")
}

fn text(output: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn path(dir: &Path, name: &str) -> String {
    dir.join(name).to_str().expect("utf-8 path").to_owned()
}

#[test]
fn the_cli_publishes_and_consumes_over_tls_with_a_generated_ca() {
    let dir = tempfile::tempdir().expect("temp dir");
    let certs = dir.path().join("certs");
    let made = wharf(&[
        "tls",
        "gen",
        "--dir",
        certs.to_str().unwrap(),
        "--client",
        "svc",
    ]);
    assert!(made.status.success(), "{}", text(&made));
    for file in [
        "ca.pem",
        "ca.key",
        "server.pem",
        "server.key",
        "svc.pem",
        "svc.key",
    ] {
        assert!(certs.join(file).exists(), "{file}");
    }
    let again = wharf(&["tls", "gen", "--dir", certs.to_str().unwrap()]);
    assert!(
        !again.status.success(),
        "never overwrites: {}",
        text(&again)
    );
    let data = dir.path().join("data");
    // The client certificate's user, with permissions, before the first start.
    for args in [
        &["user", "add", "svc", "--password", "unused"][..],
        &["permissions", "set", "svc", ".*", ".*", ".*"][..],
    ] {
        let mut args = args.to_vec();
        args.extend(["--data-dir", data.to_str().unwrap()]);
        let done = wharf(&args);
        assert!(done.status.success(), "{}", text(&done));
    }
    // guest too (the users file now exists, so no default user is made).
    for args in [
        &["user", "add", "guest", "--password", "guest"][..],
        &["permissions", "set", "guest", ".*", ".*", ".*"][..],
    ] {
        let mut args = args.to_vec();
        args.extend(["--data-dir", data.to_str().unwrap()]);
        assert!(wharf(&args).status.success());
    }
    let (cert, key, ca) = (
        path(&certs, "server.pem"),
        path(&certs, "server.key"),
        path(&certs, "ca.pem"),
    );
    let broker = process::spawn_with(
        &data,
        &[
            OsStr::new("--tls-cert"),
            OsStr::new(&cert),
            OsStr::new("--tls-key"),
            OsStr::new(&key),
            OsStr::new("--tls-bind"),
            OsStr::new("127.0.0.1:0"),
            OsStr::new("--no-plaintext"),
            OsStr::new("--tls-client-ca"),
            OsStr::new(&ca),
        ],
        DEADLINE,
    );
    let url = format!("wharfs://127.0.0.1:{}", broker.addr.port());
    let declared = wharf(&["declare", "queue", "tls-q", "--server", &url, "--ca", &ca]);
    assert!(declared.status.success(), "{}", text(&declared));
    let published = wharf(&[
        "publish",
        "--routing-key",
        "tls-q",
        "--body",
        "over TLS",
        "--server",
        &url,
        "--ca",
        &ca,
    ]);
    assert!(published.status.success(), "{}", text(&published));
    // Logged in as the certificate's subject.
    let (svc_cert, svc_key) = (path(&certs, "svc.pem"), path(&certs, "svc.key"));
    let consumed = wharf(&[
        "consume",
        "tls-q",
        "--count",
        "1",
        "--ack",
        "--server",
        &url,
        "--ca",
        &ca,
        "--cert",
        &svc_cert,
        "--key",
        &svc_key,
        "--external",
    ]);
    assert!(consumed.status.success(), "{}", text(&consumed));
    assert_eq!(String::from_utf8_lossy(&consumed.stdout), "over TLS\n");
    // Not trusted without the CA (the system's roots do not know it): exit 3, and why.
    let untrusted = wharf(&["queues", "--server", &url]);
    assert_eq!(untrusted.status.code(), Some(3), "{}", text(&untrusted));
    assert!(
        String::from_utf8_lossy(&untrusted.stderr).contains("invalid peer certificate"),
        "{}",
        text(&untrusted)
    );
    // A plaintext address for the TLS port: told to use wharfs://.
    let plain = wharf(&[
        "queues",
        "--server",
        &format!("127.0.0.1:{}", broker.addr.port()),
    ]);
    assert_eq!(plain.status.code(), Some(3), "{}", text(&plain));
    assert!(
        String::from_utf8_lossy(&plain.stderr).contains("wharfs://"),
        "{}",
        text(&plain)
    );
    broker.terminate(DEADLINE);
}
