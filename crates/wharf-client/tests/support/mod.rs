//! A scripted peer that speaks the server side of the protocol with `wharf-protocol`'s codec:
//! it drives the client's state machine (handshake, correlation, confirms, deliveries,
//! heartbeats, close) without a real broker. End-to-end tests against `wharf-server` live
//! elsewhere.

#![allow(dead_code)]

use bytes::BytesMut;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use wharf_protocol::limits::FRAME_BYTES_MAX;
use wharf_protocol::{Frame, Hello, HelloOk, Preamble, Request, Response, ServerLimits};

/// Every wait in these tests is bounded by this deadline.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// Awaits `future` or panics after [`DEADLINE`].
pub async fn within<T>(future: impl Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, future)
        .await
        .expect("deadline elapsed")
}

/// A listening fake server.
pub struct Peer {
    listener: TcpListener,
}

impl Peer {
    pub async fn bind() -> Peer {
        Peer {
            listener: TcpListener::bind("127.0.0.1:0").await.unwrap(),
        }
    }

    pub fn url(&self) -> String {
        format!("wharf://{}", self.listener.local_addr().unwrap())
    }

    /// Accepts a connection and exchanges preambles (answering with `preamble`).
    pub async fn accept_with_preamble(&self, preamble: Preamble) -> PeerConn {
        let (mut stream, _) = within(self.listener.accept()).await.unwrap();
        let mut received = [0u8; Preamble::BYTES];
        within(stream.read_exact(&mut received)).await.unwrap();
        assert_eq!(
            Preamble::decode(&received).unwrap(),
            Some(Preamble::CURRENT)
        );
        stream.write_all(&preamble.encode()).await.unwrap();
        PeerConn {
            stream,
            buf: BytesMut::new(),
        }
    }

    /// Accepts a connection and completes the handshake with `limits` as a protocol 1.0
    /// server; returns the `Hello`.
    pub async fn accept(&self, limits: ServerLimits) -> (PeerConn, Hello) {
        self.accept_minor(limits, 0).await
    }

    /// Accepts a connection and completes the handshake with `limits` as a server speaking
    /// protocol `1.minor`; returns the `Hello`.
    pub async fn accept_minor(&self, limits: ServerLimits, minor: u16) -> (PeerConn, Hello) {
        let mut conn = self
            .accept_with_preamble(Preamble { major: 1, minor })
            .await;
        let hello = match conn.recv().await {
            Frame::Hello(hello) => hello,
            other => panic!("expected Hello, got {other:?}"),
        };
        conn.send(&Frame::HelloOk(HelloOk {
            server_version: "peer/0".into(),
            protocol_minor: minor,
            limits,
        }))
        .await;
        (conn, hello)
    }
}

/// Limits with heartbeats off, so tests are not disturbed by them.
pub fn quiet_limits() -> ServerLimits {
    ServerLimits {
        heartbeat_ms: 0,
        ..ServerLimits::default()
    }
}

/// One accepted connection.
pub struct PeerConn {
    stream: TcpStream,
    buf: BytesMut,
}

impl PeerConn {
    /// The next frame, or `None` at end of stream.
    pub async fn recv_or_eof(&mut self) -> Option<Frame> {
        within(async {
            loop {
                if let Some(frame) = wharf_protocol::decode(&mut self.buf, FRAME_BYTES_MAX).unwrap()
                {
                    return Some(frame);
                }
                if self.stream.read_buf(&mut self.buf).await.unwrap_or(0) == 0 {
                    return None;
                }
            }
        })
        .await
    }

    /// The next frame, skipping heartbeats.
    pub async fn recv(&mut self) -> Frame {
        loop {
            match self
                .recv_or_eof()
                .await
                .expect("the client closed the connection")
            {
                Frame::Heartbeat => continue,
                frame => return frame,
            }
        }
    }

    /// The next frame must be a request.
    pub async fn recv_request(&mut self) -> (u64, Request) {
        match self.recv().await {
            Frame::Request {
                correlation_id,
                request,
            } => (correlation_id, request),
            other => panic!("expected a request, got {other:?}"),
        }
    }

    pub async fn send(&mut self, frame: &Frame) {
        let mut out = BytesMut::new();
        wharf_protocol::encode(frame, FRAME_BYTES_MAX, &mut out).unwrap();
        self.stream.write_all(&out).await.unwrap();
    }

    pub async fn respond(&mut self, correlation_id: u64, response: Response) {
        self.send(&Frame::Response {
            correlation_id,
            response,
        })
        .await;
    }

    /// Reads until the client closes its side; panics on any non-heartbeat frame.
    pub async fn expect_eof(&mut self) {
        while let Some(frame) = self.recv_or_eof().await {
            assert_eq!(frame, Frame::Heartbeat, "expected end of stream");
        }
    }
}
