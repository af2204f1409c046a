//! Shared helpers for the server's end-to-end tests: an in-process server on an ephemeral
//! port with its own temp data dir, and a raw protocol peer for bad-input tests. The `wharf`
//! binary's tests (`crates/wharf/tests`) compile this file into their own `common` module.
#![allow(dead_code)]

use bytes::BytesMut;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wharf_protocol::{
    Credentials, Frame, Hello, HelloOk, Preamble, Request, Response, decode, encode,
    limits::FRAME_BYTES_MAX,
};
use wharf_server::{RunningServer, ServerConfig};

/// Every wait in the tests is bounded by this.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// Polls `queue`'s counters until `done` holds for them and returns them; panics after
/// [`DEADLINE`] with the last counters seen. The one wait-for-a-condition helper of the
/// end-to-end tests (settles are fire-and-forget, so their effect is observed this way).
pub async fn wait_for_stats(
    client: &wharf_client::Client,
    queue: &str,
    done: impl Fn(&wharf_protocol::QueueInfoV2) -> bool,
) -> wharf_protocol::QueueInfoV2 {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let stats = client.queue_stats_v2(queue).await.expect("queue stats");
        if done(&stats) {
            return stats;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{queue}: condition not reached, still {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

pub struct TestServer {
    pub server: RunningServer,
    pub dir: tempfile::TempDir,
}

impl TestServer {
    pub async fn start() -> TestServer {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut ServerConfig)) -> TestServer {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = ServerConfig::ephemeral(dir.path());
        tweak(&mut config);
        let server = RunningServer::start(config).await.expect("server starts");
        TestServer { server, dir }
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr
    }
}

/// A client that speaks raw frames, for testing what the server does with bad input.
pub struct Raw {
    pub stream: TcpStream,
    pub buf: BytesMut,
    next_correlation: u64,
}

impl Raw {
    pub async fn connect(addr: SocketAddr) -> Raw {
        let stream = TcpStream::connect(addr).await.expect("connect");
        Raw {
            stream,
            buf: BytesMut::new(),
            next_correlation: 1,
        }
    }

    /// Connects and completes the handshake.
    pub async fn open(addr: SocketAddr) -> Raw {
        let mut raw = Raw::connect(addr).await;
        raw.handshake().await;
        raw
    }

    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
    }

    pub async fn send(&mut self, frame: &Frame) {
        let mut out = BytesMut::new();
        encode(frame, FRAME_BYTES_MAX, &mut out).expect("encode");
        self.send_bytes(&out).await;
    }

    pub fn hello() -> Frame {
        Frame::Hello(Hello {
            client_name: "raw-test".into(),
            credentials: Credentials {
                mechanism: "PLAIN".into(),
                data: bytes::Bytes::from_static(b"\0guest\0guest"),
            },
            frame_bytes_max: FRAME_BYTES_MAX,
            heartbeat_ms: 0,
            // The default virtual host: exactly the bytes of a 1.2 `Hello`.
            vhost: "/".into(),
        })
    }

    pub async fn handshake(&mut self) -> HelloOk {
        self.send_bytes(&Preamble::CURRENT.encode()).await;
        self.send(&Raw::hello()).await;
        self.read_preamble().await.expect("server preamble");
        match self.recv().await {
            Some(Frame::HelloOk(hello_ok)) => hello_ok,
            other => panic!("expected HelloOk, got {other:?}"),
        }
    }

    async fn fill(&mut self) -> bool {
        match tokio::time::timeout(DEADLINE, self.stream.read_buf(&mut self.buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => false,
            Ok(Ok(_)) => true,
            Err(_) => panic!("no answer from the server within {DEADLINE:?}"),
        }
    }

    pub async fn read_preamble(&mut self) -> Option<Preamble> {
        loop {
            if let Some(preamble) =
                Preamble::decode(&self.buf).expect("server sends a valid preamble")
            {
                let _ = self.buf.split_to(Preamble::BYTES);
                return Some(preamble);
            }
            if !self.fill().await {
                return None;
            }
        }
    }

    /// The next frame, or None when the server closed the socket.
    pub async fn recv(&mut self) -> Option<Frame> {
        loop {
            if let Some(frame) =
                decode(&mut self.buf, FRAME_BYTES_MAX).expect("server sends valid frames")
            {
                return Some(frame);
            }
            if !self.fill().await {
                return None;
            }
        }
    }

    /// The next frame that is not a heartbeat.
    pub async fn recv_significant(&mut self) -> Option<Frame> {
        loop {
            match self.recv().await {
                Some(Frame::Heartbeat) => continue,
                other => return other,
            }
        }
    }

    pub async fn request(&mut self, request: Request) -> Response {
        let correlation_id = self.next_correlation;
        self.next_correlation += 1;
        self.send(&Frame::Request {
            correlation_id,
            request,
        })
        .await;
        loop {
            match self.recv_significant().await {
                Some(Frame::Response {
                    correlation_id: id,
                    response,
                }) if id == correlation_id => return response,
                Some(_) => continue,
                None => panic!("connection closed while waiting for a response"),
            }
        }
    }

    /// The request subscribing consumer tag 1 to `queue` with manual acks.
    pub fn subscribe_request(queue: &str, prefetch: u32) -> Request {
        Request::Subscribe {
            queue: queue.into(),
            consumer_tag: 1,
            prefetch,
            auto_ack: false,
            exclusive: false,
            priority: 0,
            initial_credit: None,
            arguments: Default::default(),
        }
    }

    /// Subscribes consumer tag 1 to `queue` with manual acks and checks the answer.
    pub async fn subscribe(&mut self, queue: &str, prefetch: u32) {
        let response = self.request(Raw::subscribe_request(queue, prefetch)).await;
        assert!(
            matches!(response, Response::Subscribed { .. }),
            "{response:?}"
        );
    }

    /// Expects a Close frame (after any other frames) and then EOF; returns the Close.
    pub async fn expect_close(&mut self) -> wharf_protocol::Close {
        loop {
            match self.recv().await {
                Some(Frame::Close(close)) => {
                    // The server shuts the socket after its Close.
                    let mut rest = Vec::new();
                    let _ = tokio::time::timeout(DEADLINE, self.stream.read_to_end(&mut rest))
                        .await
                        .expect("socket closed");
                    return close;
                }
                Some(_) => continue,
                None => panic!("socket closed without a Close frame"),
            }
        }
    }
}

/// Declares a queue over a raw connection and checks it worked: proof the server still serves.
pub async fn server_still_serves(addr: SocketAddr, queue: &str) {
    let mut raw = Raw::open(addr).await;
    let response = raw
        .request(Request::DeclareQueue {
            name: queue.into(),
            durable: false,
            exclusive: false,
            auto_delete: false,
            passive: false,
            arguments: Default::default(),
        })
        .await;
    assert!(
        matches!(response, Response::QueueDeclared { .. }),
        "{response:?}"
    );
}
