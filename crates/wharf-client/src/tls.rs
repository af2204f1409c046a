//! TLS to the broker (`wharfs://`): rustls through tokio-rustls, with the server verified
//! against the CA given in [`TlsOptions`] or, without one, the system's trusted roots, and an
//! optional client certificate (mutual TLS; the broker may then accept SASL `EXTERNAL`).

use crate::error::ClientError;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// TLS settings of [`ClientOptions::tls`](crate::ClientOptions::tls), used for `wharfs://`
/// addresses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsOptions {
    /// CA certificates (PEM) the server's certificate must chain to; `None`: the system's
    /// trusted roots.
    pub ca_file: Option<PathBuf>,
    /// A client certificate chain (PEM) to present, with `key_file`.
    pub cert_file: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    pub key_file: Option<PathBuf>,
    /// The name the server's certificate must carry; `None`: the address's host.
    pub server_name: Option<String>,
}

fn tls_error(reason: impl Into<String>) -> ClientError {
    ClientError::Tls {
        reason: reason.into(),
    }
}

fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, ClientError> {
    let certificates = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|err| tls_error(format!("{}: {err}", path.display())))?;
    if certificates.is_empty() {
        return Err(tls_error(format!(
            "{}: no PEM certificate in the file",
            path.display()
        )));
    }
    Ok(certificates)
}

/// rustls's `ring` provider, as the broker uses (no post-quantum key exchange; see the
/// broker's docs/security.md).
#[allow(deprecated)]
fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl TlsOptions {
    /// The rustls settings these options describe.
    pub(crate) fn client_config(&self) -> Result<Arc<rustls::ClientConfig>, ClientError> {
        let mut roots = rustls::RootCertStore::empty();
        match &self.ca_file {
            Some(ca) => {
                for certificate in read_certificates(ca)? {
                    roots
                        .add(certificate)
                        .map_err(|err| tls_error(format!("{}: {err}", ca.display())))?;
                }
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                for certificate in found.certs {
                    // A system root rustls cannot parse is skipped, as browsers do.
                    let _ = roots.add(certificate);
                }
                if roots.is_empty() {
                    return Err(tls_error(
                        "no CA given (ca_file) and no trusted roots found on this system",
                    ));
                }
            }
        }
        let builder = rustls::ClientConfig::builder_with_provider(crypto_provider())
            .with_safe_default_protocol_versions()
            .map_err(|err| tls_error(err.to_string()))?
            .with_root_certificates(roots);
        let config = match (&self.cert_file, &self.key_file) {
            (None, None) => builder.with_no_client_auth(),
            (Some(cert), Some(key)) => {
                let chain = read_certificates(cert)?;
                let key = PrivateKeyDer::from_pem_file(key)
                    .map_err(|err| tls_error(format!("{}: {err}", key.display())))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|err| tls_error(err.to_string()))?
            }
            _ => return Err(tls_error("cert_file and key_file go together")),
        };
        Ok(Arc::new(config))
    }

    /// The name to verify the server's certificate against.
    pub(crate) fn server_name(&self, host: &str) -> Result<ServerName<'static>, ClientError> {
        let name = self.server_name.as_deref().unwrap_or(host);
        ServerName::try_from(name.to_owned())
            .map_err(|err| tls_error(format!("{name:?} is not a valid server name: {err}")))
    }
}
