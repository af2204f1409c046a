//! The handshake: TCP connect, TLS for `wharfs://`, preambles, `Hello` / `HelloOk`.

use super::BUFFER_BYTES;
use crate::addr::ServerAddr;
use crate::error::ClientError;
use crate::options::ClientOptions;
use bytes::{Buf, BytesMut};
use std::io;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// The byte stream a connection runs over.
pub(crate) enum Transport {
    /// Plain TCP (`wharf://`).
    Plain(TcpStream),
    /// TLS over TCP (`wharfs://`), its handshake done.
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// The reading half of a [`Transport`].
pub(crate) type ReadHalf = Box<dyn AsyncRead + Send + Unpin>;
/// The writing half of a [`Transport`].
pub(crate) type WriteHalf = Box<dyn AsyncWrite + Send + Unpin>;

impl Transport {
    /// Its halves: a plain socket's own (no lock between them), or the TLS session's shared.
    pub(crate) fn split(self) -> (ReadHalf, WriteHalf) {
        match self {
            Transport::Plain(socket) => {
                let (read, write) = socket.into_split();
                (Box::new(read), Box::new(write))
            }
            Transport::Tls(stream) => {
                let (read, write) = tokio::io::split(stream);
                (Box::new(read), Box::new(write))
            }
        }
    }
}
use wharf_protocol::limits::FRAME_BYTES_MAX_FLOOR;
use wharf_protocol::{DEFAULT_VHOST, ErrorCode, Frame, Hello, HelloOk, MINOR_VHOSTS, Preamble};

pub(super) async fn handshake(
    addr: &ServerAddr,
    options: &ClientOptions,
) -> Result<(Transport, BytesMut, HelloOk), ClientError> {
    let connect_error = |source: io::Error| ClientError::Connect {
        addr: addr.to_string(),
        source: Arc::new(source),
    };
    // The virtual host is checked before anything is sent.
    let vhost = vhost_to_open(addr, options)?;
    if !addr.tls() && options.tls.is_some() {
        return Err(ClientError::Tls {
            reason: format!("TLS options were given for {addr}, a wharf:// address: use wharfs://"),
        });
    }
    // The TLS settings are checked before anything is sent.
    let tls = match addr.tls() {
        true => {
            let tls = options.tls.clone().unwrap_or_default();
            Some((tls.client_config()?, tls.server_name(addr.host())?))
        }
        false => None,
    };
    let socket = TcpStream::connect((addr.host(), addr.port()))
        .await
        .map_err(connect_error)?;
    // Small frames (acks, credits, requests) must not wait for Nagle; the writer coalesces.
    socket.set_nodelay(true).map_err(connect_error)?;
    match tls {
        None => {
            let mut socket = socket;
            let (buf, hello_ok) = exchange(&mut socket, addr, options, vhost).await?;
            Ok((Transport::Plain(socket), buf, hello_ok))
        }
        Some((config, server_name)) => {
            let mut stream = tokio_rustls::TlsConnector::from(config)
                .connect(server_name, socket)
                .await
                .map_err(|err| ClientError::Tls {
                    reason: format!("handshake with {addr} failed: {err}"),
                })?;
            let (buf, hello_ok) = exchange(&mut stream, addr, options, vhost).await?;
            Ok((Transport::Tls(Box::new(stream)), buf, hello_ok))
        }
    }
}

/// The virtual host to name in `Hello`: the options', else the address's (`/` if it names
/// none), refused here if the protocol would refuse it.
fn vhost_to_open<'a>(
    addr: &'a ServerAddr,
    options: &'a ClientOptions,
) -> Result<&'a str, ClientError> {
    let vhost = options.vhost.as_deref().unwrap_or(addr.vhost());
    match crate::addr::vhost_error(vhost) {
        Some(reason) => Err(ClientError::InvalidArgument {
            what: "vhost",
            detail: format!("{vhost:?}: {reason}"),
        }),
        None => Ok(vhost),
    }
}

/// `Err(NotSupported)` if `vhost` cannot be named to a server whose preamble announced
/// `server_minor`: before 1.3 a `Hello` has no virtual host (the server would refuse its
/// trailing bytes as a protocol violation), and its only virtual host is `/`.
fn check_vhost_supported(vhost: &str, server_minor: u16) -> Result<(), ClientError> {
    if vhost != DEFAULT_VHOST && server_minor < MINOR_VHOSTS {
        return Err(ClientError::NotSupported {
            feature: "a virtual host other than /",
            minor_required: MINOR_VHOSTS,
            server_minor,
        });
    }
    Ok(())
}

/// Preambles, `Hello` and `HelloOk` over `stream`.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    addr: &ServerAddr,
    options: &ClientOptions,
    vhost: &str,
) -> Result<(BytesMut, HelloOk), ClientError> {
    let connect_error = |source: io::Error| ClientError::Connect {
        addr: addr.to_string(),
        source: Arc::new(source),
    };
    stream
        .write_all(&Preamble::CURRENT.encode())
        .await
        .map_err(connect_error)?;
    // Over TLS, written means encrypted into the session's buffer: flush sends it.
    stream.flush().await.map_err(connect_error)?;

    let mut buf = BytesMut::with_capacity(BUFFER_BYTES);
    let preamble = loop {
        match Preamble::decode(&buf) {
            Ok(Some(preamble)) => break preamble,
            Ok(None) => {}
            Err(err) => {
                return Err(ClientError::Handshake {
                    detail: err.to_string(),
                });
            }
        }
        if stream.read_buf(&mut buf).await.map_err(connect_error)? == 0 {
            return Err(ClientError::Handshake {
                detail: "the server closed the connection before its preamble".into(),
            });
        }
    };
    buf.advance(Preamble::BYTES);
    if let Err(err) = preamble.check_supported() {
        // The server explains with a `Close` (its layout is the same in every version).
        return Err(
            match read_frame(stream, &mut buf, options.frame_bytes_max).await {
                Ok(Some(Frame::Close(close))) => ClientError::ServerClosed {
                    code: close.code,
                    reason: close.reason,
                },
                _ => ClientError::ServerClosed {
                    code: ErrorCode::UnsupportedVersion,
                    reason: err.to_string(),
                },
            },
        );
    }

    // The server's minor is known from its preamble, before `Hello` is sent.
    check_vhost_supported(vhost, preamble.minor)?;
    let credentials = options.credentials.resolve(addr);
    let hello = Frame::Hello(Hello {
        client_name: options.client_name.clone(),
        credentials: credentials.to_wire(),
        frame_bytes_max: options.frame_bytes_max.max(FRAME_BYTES_MAX_FLOOR),
        heartbeat_ms: options.heartbeat_ms,
        vhost: vhost.to_owned(),
    });
    let mut out = BytesMut::new();
    wharf_protocol::encode(&hello, FRAME_BYTES_MAX_FLOOR, &mut out).map_err(ClientError::encode)?;
    stream.write_all(&out).await.map_err(connect_error)?;
    stream.flush().await.map_err(connect_error)?;

    match read_frame(
        stream,
        &mut buf,
        options.frame_bytes_max.max(FRAME_BYTES_MAX_FLOOR),
    )
    .await?
    {
        Some(Frame::HelloOk(hello_ok)) => {
            let limits = hello_ok.limits;
            if limits.frame_bytes_max < FRAME_BYTES_MAX_FLOOR
                || limits.publishes_in_flight_max == 0
                || limits.batch_messages_max == 0
            {
                return Err(ClientError::Handshake {
                    detail: format!("the server announced unusable limits {limits:?}"),
                });
            }
            Ok((buf, hello_ok))
        }
        Some(Frame::Close(close)) => {
            out.clear();
            if wharf_protocol::encode(&Frame::CloseOk, FRAME_BYTES_MAX_FLOOR, &mut out).is_ok() {
                let _ = stream.write_all(&out).await;
            }
            Err(ClientError::ServerClosed {
                code: close.code,
                reason: close.reason,
            })
        }
        Some(other) => Err(ClientError::Handshake {
            detail: format!("expected HelloOk, got frame kind {}", other.kind()),
        }),
        None => Err(ClientError::Handshake {
            detail: "the server closed the connection during the handshake".into(),
        }),
    }
}

/// Reads one frame; `Ok(None)` at a clean end of stream.
async fn read_frame<R: AsyncRead + Unpin>(
    read: &mut R,
    buf: &mut BytesMut,
    frame_bytes_max: u32,
) -> Result<Option<Frame>, ClientError> {
    loop {
        match wharf_protocol::decode(buf, frame_bytes_max) {
            Ok(Some(frame)) => return Ok(Some(frame)),
            Ok(None) => {}
            Err(err) => return Err(ClientError::Protocol(Arc::new(err))),
        }
        let n_read = read
            .read_buf(buf)
            .await
            .map_err(|err| ClientError::ConnectionLost(Arc::new(err)))?;
        if n_read == 0 {
            if buf.is_empty() {
                return Ok(None);
            }
            return Err(ClientError::lost(
                io::ErrorKind::UnexpectedEof,
                "the server closed the connection mid-frame",
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_options_vhost_overrides_the_addresss_and_is_checked_before_connecting() {
        let addr: ServerAddr = "wharf://host/staging".parse().unwrap();
        let mut options = ClientOptions::default();
        assert_eq!(vhost_to_open(&addr, &options).unwrap(), "staging");
        options.vhost = Some("/".into());
        assert_eq!(vhost_to_open(&addr, &options).unwrap(), "/");
        let plain: ServerAddr = "host:5800".parse().unwrap();
        options.vhost = None;
        assert_eq!(vhost_to_open(&plain, &options).unwrap(), "/");
        for bad in ["", "a\nb", &"v".repeat(256)] {
            options.vhost = Some(bad.to_owned());
            assert!(matches!(
                vhost_to_open(&plain, &options),
                Err(ClientError::InvalidArgument { what: "vhost", .. })
            ));
        }
    }

    #[test]
    fn only_the_default_vhost_is_named_to_a_server_older_than_1_3() {
        assert!(check_vhost_supported("/", 0).is_ok());
        assert!(check_vhost_supported("/", MINOR_VHOSTS - 1).is_ok());
        assert!(check_vhost_supported("staging", MINOR_VHOSTS).is_ok());
        assert!(matches!(
            check_vhost_supported("staging", MINOR_VHOSTS - 1),
            Err(ClientError::NotSupported {
                minor_required: MINOR_VHOSTS,
                server_minor: 2,
                ..
            })
        ));
    }

    #[tokio::test]
    async fn read_frame_reports_clean_eof_and_mid_frame_eof_differently() {
        let mut buf = BytesMut::new();
        let mut empty: &[u8] = &[];
        assert!(
            read_frame(&mut empty, &mut buf, FRAME_BYTES_MAX_FLOOR)
                .await
                .unwrap()
                .is_none()
        );
        let mut encoded = BytesMut::new();
        wharf_protocol::encode(&Frame::Heartbeat, FRAME_BYTES_MAX_FLOOR, &mut encoded).unwrap();
        let mut partial: &[u8] = &encoded[..encoded.len() - 1];
        let err = read_frame(&mut partial, &mut buf, FRAME_BYTES_MAX_FLOOR)
            .await
            .unwrap_err();
        assert!(
            matches!(err, ClientError::ConnectionLost(ref io) if io.kind() == io::ErrorKind::UnexpectedEof)
        );
    }
}
