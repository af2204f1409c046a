//! The byte streams a connection runs over: plain TCP, or TLS over TCP (rustls through
//! tokio-rustls), and the TLS settings of the TLS listener (issue #18, docs/security.md).
//!
//! A connection is split into a reading half (its reader task) and a writing half (its
//! sink). Over TCP the halves are the socket's own; over TLS they share the TLS session
//! through `tokio::io::split`. A reader's inline writes (`try_write`) need a socket that can
//! be written without waiting: over TLS there is none (the session encrypts into its own
//! buffer, which only a flush empties), so a TLS half reports `WouldBlock` and the writer
//! task writes instead.

use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use rustls::server::WebPkiClientVerifier;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio_rustls::server::TlsStream;

/// An accepted connection's stream.
#[derive(Debug)]
pub(crate) enum Stream {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS over TCP, the TLS handshake done.
    Tls(Box<TlsStream<TcpStream>>),
}

/// The reading half of a [`Stream`].
#[derive(Debug)]
pub(crate) enum ReadHalf {
    /// Plain TCP.
    Plain(OwnedReadHalf),
    /// TLS.
    Tls(tokio::io::ReadHalf<Box<TlsStream<TcpStream>>>),
}

/// The writing half of a [`Stream`].
#[derive(Debug)]
pub(crate) enum WriteHalf {
    /// Plain TCP.
    Plain(OwnedWriteHalf),
    /// TLS.
    Tls(tokio::io::WriteHalf<Box<TlsStream<TcpStream>>>),
}

impl Stream {
    /// Splits the stream into its reading and writing halves.
    pub(crate) fn split(self) -> (ReadHalf, WriteHalf) {
        match self {
            Stream::Plain(socket) => {
                let (read, write) = socket.into_split();
                (ReadHalf::Plain(read), WriteHalf::Plain(write))
            }
            Stream::Tls(stream) => {
                let (read, write) = tokio::io::split(stream);
                (ReadHalf::Tls(read), WriteHalf::Tls(write))
            }
        }
    }

    /// The common name of the client certificate the TLS handshake verified, if any (the
    /// user of SASL `EXTERNAL`).
    pub(crate) fn peer_common_name(&self) -> Option<String> {
        let Stream::Tls(stream) = self else {
            return None;
        };
        let certificate = stream.get_ref().1.peer_certificates()?.first()?;
        common_name(certificate)
    }

    /// Sets `TCP_NODELAY` on the socket underneath.
    pub(crate) fn set_nodelay(&self) -> io::Result<()> {
        match self {
            Stream::Plain(socket) => socket.set_nodelay(true),
            Stream::Tls(stream) => stream.get_ref().0.set_nodelay(true),
        }
    }
}

/// The subject's common name of a DER certificate.
fn common_name(certificate: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(certificate.as_ref()).ok()?;
    let name = parsed
        .subject()
        .iter_common_name()
        .next()?
        .as_str()
        .ok()?
        .to_owned();
    Some(name)
}

impl WriteHalf {
    /// Writes what the socket takes now, without waiting (`WouldBlock` if nothing, and
    /// always over TLS: see the module's comment).
    pub(crate) fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        match self {
            WriteHalf::Plain(socket) => socket.try_write(buf),
            WriteHalf::Tls(_) => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    /// [`WriteHalf::try_write`] of several buffers.
    pub(crate) fn try_write_vectored(&self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            WriteHalf::Plain(socket) => socket.try_write_vectored(bufs),
            WriteHalf::Tls(_) => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

impl AsyncRead for ReadHalf {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ReadHalf::Plain(socket) => Pin::new(socket).poll_read(cx, buf),
            ReadHalf::Tls(stream) => Pin::new(stream).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for WriteHalf {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            WriteHalf::Plain(socket) => Pin::new(socket).poll_write(cx, buf),
            WriteHalf::Tls(stream) => Pin::new(stream).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            WriteHalf::Plain(socket) => Pin::new(socket).poll_write_vectored(cx, bufs),
            WriteHalf::Tls(stream) => Pin::new(stream).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            WriteHalf::Plain(socket) => socket.is_write_vectored(),
            WriteHalf::Tls(stream) => stream.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            WriteHalf::Plain(socket) => Pin::new(socket).poll_flush(cx),
            WriteHalf::Tls(stream) => Pin::new(stream).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            WriteHalf::Plain(socket) => Pin::new(socket).poll_shutdown(cx),
            WriteHalf::Tls(stream) => Pin::new(stream).poll_shutdown(cx),
        }
    }
}

/// Why the TLS settings cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A PEM file that cannot be read or holds nothing usable.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        reason: String,
    },
    /// rustls refused the certificate, key or CA.
    #[error("TLS settings: {0}")]
    Rustls(String),
}

fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let file_error = |reason: String| TlsError::File {
        path: path.to_owned(),
        reason,
    };
    let certificates = CertificateDer::pem_file_iter(path)
        .map_err(|err| file_error(err.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| file_error(err.to_string()))?;
    if certificates.is_empty() {
        return Err(file_error("no PEM certificate in the file".to_owned()));
    }
    Ok(certificates)
}

/// rustls's `ring` provider: it builds with a C compiler alone (aws-lc-rs, rustls's default,
/// needs more of the build machine), at the price of no post-quantum key exchange, which is
/// why rustls marks it deprecated (docs/security.md, "Not protected yet").
#[allow(deprecated)]
pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The TLS listener's settings as rustls wants them: the server's certificate chain and key
/// (PEM files), and, with `client_ca`, verification of client certificates against it
/// (required, or only checked when presented).
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
    require_client_cert: bool,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = crypto_provider();
    let chain = read_certificates(cert)?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|err| TlsError::File {
        path: key.to_owned(),
        reason: err.to_string(),
    })?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|err| TlsError::Rustls(err.to_string()))?;
    let builder = match client_ca {
        None if require_client_cert => {
            return Err(TlsError::Rustls(
                "tls_require_client_cert needs tls_client_ca (the CA to verify them with)"
                    .to_owned(),
            ));
        }
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for certificate in read_certificates(ca)? {
                roots
                    .add(certificate)
                    .map_err(|err| TlsError::Rustls(format!("{}: {err}", ca.display())))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = if require_client_cert {
                verifier
            } else {
                verifier.allow_unauthenticated()
            };
            builder.with_client_cert_verifier(
                verifier
                    .build()
                    .map_err(|err| TlsError::Rustls(err.to_string()))?,
            )
        }
    };
    let config = builder
        .with_single_cert(chain, key)
        .map_err(|err| TlsError::Rustls(err.to_string()))?;
    Ok(Arc::new(config))
}
