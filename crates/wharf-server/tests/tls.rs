//! TLS end to end (issue #18): certificates made in the test (rcgen, through
//! `wharf_server::dev_ca`), a publish and consume over TLS from the Rust client, a plaintext
//! client on the TLS port told so, untrusted and expired server certificates refused, mutual
//! TLS with SASL `EXTERNAL`, and the plaintext listener turned off. The Python client and
//! the CLI over TLS are tested in `bindings/python/tests/test_tls.py` and
//! `crates/wharf/tests/tls.rs`.

mod common;

use common::{TestServer, server_still_serves};
use std::path::{Path, PathBuf};
use wharf_client::{
    Client, ClientError, ClientOptions, ConsumeOptions, Credentials, Message, TlsOptions,
};
use wharf_protocol::ErrorCode;
use wharf_server::auth::{DEFAULT_VHOST, Permission};
use wharf_server::dev_ca::DevCa;

/// A CA and, in `dir`: `ca.pem`, `server.pem`/`.key` (localhost, 127.0.0.1), `alice.pem`/
/// `.key` (a client certificate for alice), `expired.pem`/`.key`, and `other-ca.pem` (a CA
/// that signed nothing here).
fn certificates(dir: &Path) {
    let ca = DevCa::new("wharf test CA").unwrap();
    ca.pem().write(dir, "ca").unwrap();
    ca.server(&["localhost", "127.0.0.1"], 30)
        .unwrap()
        .write(dir, "server")
        .unwrap();
    ca.server(&["localhost", "127.0.0.1"], -1)
        .unwrap()
        .write(dir, "expired")
        .unwrap();
    ca.client("alice", 30).unwrap().write(dir, "alice").unwrap();
    ca.client("mallory", 30)
        .unwrap()
        .write(dir, "mallory")
        .unwrap();
    DevCa::new("another CA")
        .unwrap()
        .pem()
        .write(dir, "other-ca")
        .unwrap();
}

struct TlsServer {
    server: TestServer,
    certs: tempfile::TempDir,
}

impl TlsServer {
    async fn start(tweak: impl FnOnce(&mut wharf_server::ServerConfig, &Path)) -> TlsServer {
        let certs = tempfile::tempdir().unwrap();
        certificates(certs.path());
        let dir = certs.path().to_owned();
        let server = TestServer::start_with(|config| {
            config.tls_cert = Some(dir.join("server.pem"));
            config.tls_key = Some(dir.join("server.key"));
            tweak(config, &dir);
        })
        .await;
        TlsServer { server, certs }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.certs.path().join(name)
    }

    fn url(&self) -> String {
        format!(
            "wharfs://127.0.0.1:{}",
            self.server.server.tls_addr.expect("a TLS listener").port()
        )
    }

    async fn connect(
        &self,
        tls: TlsOptions,
        credentials: Credentials,
    ) -> Result<Client, ClientError> {
        let options = ClientOptions {
            tls: Some(tls),
            credentials,
            ..ClientOptions::default()
        };
        Client::connect_with(&self.url(), options).await
    }

    fn trusting(&self) -> TlsOptions {
        TlsOptions {
            ca_file: Some(self.path("ca.pem")),
            ..TlsOptions::default()
        }
    }
}

#[tokio::test]
async fn publish_and_consume_over_tls_beside_the_plaintext_listener() {
    let tls = TlsServer::start(|_, _| {}).await;
    let client = tls
        .connect(tls.trusting(), Credentials::Default)
        .await
        .expect("TLS connection");
    client.declare_queue("q").await.unwrap();
    // Enough to span many TLS records, in both directions.
    let body = vec![7u8; 256 * 1024];
    let publisher = client.publisher();
    let mut tickets = Vec::new();
    for _ in 0..40 {
        tickets.push(
            publisher
                .publish("", "q", Message::new(body.clone()))
                .await
                .unwrap(),
        );
    }
    for ticket in tickets {
        ticket.await.expect("confirmed over TLS");
    }
    let mut consumer = client
        .consume("q", ConsumeOptions::default())
        .await
        .unwrap();
    for _ in 0..40 {
        let delivery = consumer.next().await.unwrap().unwrap();
        assert_eq!(delivery.body().len(), body.len());
        delivery.ack().await.unwrap();
    }
    // The plaintext listener serves on as before.
    let plain = Client::connect(&tls.server.addr().to_string())
        .await
        .unwrap();
    let stats = plain.queue_stats("q").await.unwrap();
    assert_eq!((stats.ready, stats.unacked), (0, 0));
    // The server name may be given apart from the address.
    let named = TlsOptions {
        server_name: Some("localhost".to_owned()),
        ..tls.trusting()
    };
    tls.connect(named, Credentials::Default)
        .await
        .expect("verified as localhost");
}

#[tokio::test]
async fn plaintext_on_the_tls_port_and_tls_on_the_plaintext_port_are_refused_cleanly() {
    let tls = TlsServer::start(|_, _| {}).await;
    let tls_port = tls.server.server.tls_addr.unwrap().port();
    let err = Client::connect(&format!("wharf://127.0.0.1:{tls_port}"))
        .await
        .expect_err("plaintext to the TLS port");
    assert!(
        matches!(
            &err,
            ClientError::ServerClosed { code: ErrorCode::ProtocolViolation, reason }
                if reason.contains("wharfs://")
        ),
        "{err:?}"
    );
    let plain_port = tls.server.addr().port();
    let options = ClientOptions {
        tls: Some(tls.trusting()),
        ..ClientOptions::default()
    };
    let err = Client::connect_with(&format!("wharfs://127.0.0.1:{plain_port}"), options.clone())
        .await
        .expect_err("TLS to the plaintext port");
    assert!(matches!(err, ClientError::Tls { .. }), "{err:?}");
    // TLS options for a wharf:// address: refused before anything is sent.
    let err = Client::connect_with(&format!("wharf://127.0.0.1:{plain_port}"), options)
        .await
        .expect_err("TLS options without wharfs://");
    assert!(
        matches!(&err, ClientError::Tls { reason } if reason.contains("use wharfs://")),
        "{err:?}"
    );
    server_still_serves(tls.server.addr(), "after-bad-clients").await;
}

#[tokio::test]
async fn untrusted_expired_and_misnamed_server_certificates_are_refused() {
    let tls = TlsServer::start(|_, _| {}).await;
    let untrusted = TlsOptions {
        ca_file: Some(tls.path("other-ca.pem")),
        ..TlsOptions::default()
    };
    let err = tls
        .connect(untrusted, Credentials::Default)
        .await
        .expect_err("untrusted");
    assert!(
        matches!(&err, ClientError::Tls { reason } if reason.contains("UnknownIssuer")),
        "{err:?}"
    );
    let misnamed = TlsOptions {
        server_name: Some("broker.example".to_owned()),
        ..tls.trusting()
    };
    let err = tls
        .connect(misnamed, Credentials::Default)
        .await
        .expect_err("wrong name");
    assert!(
        matches!(&err, ClientError::Tls { reason } if reason.contains("not valid for name")),
        "{err:?}"
    );
    let missing = TlsOptions {
        ca_file: Some(tls.path("nonexistent.pem")),
        ..TlsOptions::default()
    };
    let err = tls
        .connect(missing, Credentials::Default)
        .await
        .expect_err("no CA file");
    assert!(
        matches!(&err, ClientError::Tls { reason } if reason.contains("nonexistent.pem")),
        "{err:?}"
    );
    let expired = TlsServer::start(|config, dir| {
        config.tls_cert = Some(dir.join("expired.pem"));
        config.tls_key = Some(dir.join("expired.key"));
    })
    .await;
    let err = expired
        .connect(expired.trusting(), Credentials::Default)
        .await
        .expect_err("expired");
    assert!(
        matches!(&err, ClientError::Tls { reason } if reason.contains("certificate expired")),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_broker_with_unusable_tls_files_does_not_start() {
    let certs = tempfile::tempdir().unwrap();
    certificates(certs.path());
    let dir = tempfile::tempdir().unwrap();
    let mut config = wharf_server::ServerConfig::ephemeral(dir.path());
    config.tls_cert = Some(certs.path().join("server.pem"));
    config.tls_key = Some(certs.path().join("alice.key"));
    let err = wharf_server::RunningServer::start(config.clone())
        .await
        .expect_err("a key that is not the certificate's");
    assert!(err.to_string().contains("TLS settings"), "{err}");
    config.tls_key = Some(certs.path().join("missing.key"));
    let err = wharf_server::RunningServer::start(config)
        .await
        .expect_err("no key file");
    assert!(err.to_string().contains("missing.key"), "{err}");
}

#[tokio::test]
async fn mutual_tls_logs_in_with_external_as_the_certificate_subject() {
    let tls = TlsServer::start(|config, dir| {
        config.tls_client_ca = Some(dir.join("ca.pem"));
        config.tls_require_client_cert = true;
        config.plaintext = false;
    })
    .await;
    // Plaintext is off: the server's one address is the TLS one.
    assert_eq!(Some(tls.server.addr()), tls.server.server.tls_addr);
    let users = &tls.server.server.users;
    users.add("alice", "unused-password", &[]).unwrap();
    users
        .set_permissions("alice", DEFAULT_VHOST, Permission::full())
        .unwrap();
    let with_certificate = |name: &str| TlsOptions {
        cert_file: Some(tls.path(&format!("{name}.pem"))),
        key_file: Some(tls.path(&format!("{name}.key"))),
        ..tls.trusting()
    };
    let alice = tls
        .connect(with_certificate("alice"), Credentials::External)
        .await
        .expect("EXTERNAL as alice");
    alice.declare_queue("alice-q").await.unwrap();
    // A certificate for a user the broker does not have.
    let err = tls
        .connect(with_certificate("mallory"), Credentials::External)
        .await
        .expect_err("no such user");
    assert_eq!(err.code(), Some(ErrorCode::AccessRefused), "{err:?}");
    // The certificate also allows a password login (as guest, from loopback).
    tls.connect(with_certificate("mallory"), Credentials::Default)
        .await
        .expect("PLAIN over mutual TLS");
    // No certificate: the TLS handshake fails (TLS 1.3 reports it at the first read).
    let err = tls
        .connect(tls.trusting(), Credentials::Default)
        .await
        .expect_err("a client certificate is required");
    assert!(
        matches!(
            err,
            ClientError::Tls { .. } | ClientError::Connect { .. } | ClientError::ConnectionLost(_)
        ),
        "{err:?}"
    );
    // A certificate from another CA: refused too.
    let other = TlsServer::start(|_, _| {}).await;
    let stranger = TlsOptions {
        cert_file: Some(other.path("alice.pem")),
        key_file: Some(other.path("alice.key")),
        ..tls.trusting()
    };
    assert!(tls.connect(stranger, Credentials::External).await.is_err());
}

#[tokio::test]
async fn external_needs_a_verified_certificate() {
    // Client certificates are optional here: a client without one may log in with a password
    // but not with EXTERNAL; a plaintext client never with EXTERNAL.
    let tls = TlsServer::start(|config, dir| {
        config.tls_client_ca = Some(dir.join("ca.pem"));
    })
    .await;
    let err = tls
        .connect(tls.trusting(), Credentials::External)
        .await
        .expect_err("no certificate");
    assert!(
        matches!(
            &err,
            ClientError::ServerClosed { code: ErrorCode::AccessRefused, reason }
                if reason.contains("EXTERNAL needs a client certificate")
        ),
        "{err:?}"
    );
    tls.connect(tls.trusting(), Credentials::Default)
        .await
        .expect("a password login without a certificate");
    let options = ClientOptions {
        credentials: Credentials::External,
        ..ClientOptions::default()
    };
    let err = Client::connect_with(&tls.server.addr().to_string(), options)
        .await
        .expect_err("EXTERNAL in plaintext");
    assert_eq!(err.code(), Some(ErrorCode::AccessRefused), "{err:?}");
}

/// A socket on the TLS port that never starts its TLS handshake, or stops half-way, is closed
/// once `handshake_timeout` has passed (one deadline for the first byte and the handshake),
/// and the broker serves on.
#[tokio::test]
async fn a_silent_or_stalled_socket_on_the_tls_port_is_closed_at_the_handshake_deadline() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tls = TlsServer::start(|config, _| {
        config.handshake_timeout = std::time::Duration::from_millis(300);
    })
    .await;
    let tls_addr = tls.server.server.tls_addr.unwrap();
    let mut silent = tokio::net::TcpStream::connect(tls_addr).await.unwrap();
    // The first bytes of a TLS record, then nothing.
    let mut stalled = tokio::net::TcpStream::connect(tls_addr).await.unwrap();
    stalled.write_all(&[0x16, 0x03, 0x01]).await.unwrap();
    for socket in [&mut silent, &mut stalled] {
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(common::DEADLINE, socket.read(&mut buf))
            .await
            .expect("closed before the test's deadline");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    }
    tls.connect(tls.trusting(), Credentials::Default)
        .await
        .expect("the broker serves on");
}
