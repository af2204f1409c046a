//! A self-made certificate authority for development and tests (`wharf tls gen`, the TLS
//! tests): a CA certificate, server certificates for given names, client certificates whose
//! common name is a user (for SASL `EXTERNAL`), as PEM. Made with rcgen. Production brokers
//! use certificates from the organisation's CA (docs/security.md).

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};
use std::path::Path;

/// A certificate and its private key, PEM-encoded.
#[derive(Debug, Clone)]
pub struct Pem {
    /// The certificate.
    pub cert: String,
    /// Its private key (PKCS#8).
    pub key: String,
}

impl Pem {
    /// Writes `NAME.pem` and `NAME.key` in `dir` (the key readable by its owner only).
    pub fn write(&self, dir: &Path, name: &str) -> std::io::Result<()> {
        std::fs::write(dir.join(format!("{name}.pem")), &self.cert)?;
        let key = dir.join(format!("{name}.key"));
        std::fs::write(&key, &self.key)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))
    }
}

/// A certificate authority that signs server and client certificates.
#[derive(Debug)]
pub struct DevCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
    key: String,
}

/// What can go wrong making certificates.
#[derive(Debug, thiserror::Error)]
#[error("cannot make the certificate: {0}")]
pub struct CaError(#[from] rcgen::Error);

fn name(common_name: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, common_name);
    name
}

/// Validity: from `days_before` days ago to `days_after` days from now (negative: the past).
fn validity(params: &mut CertificateParams, days_before: i64, days_after: i64) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs() as i64);
    let day = 86_400;
    let at = |secs: i64| {
        // Whole days since the epoch to a calendar date (the civil-from-days algorithm).
        let days = secs.div_euclid(day);
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let d = doy - (153 * mp + 2) / 5 + 1;
        let m = if mp < 10 { mp + 3 } else { mp - 9 };
        let y = yoe + era * 400 + i64::from(m <= 2);
        rcgen::date_time_ymd(y as i32, m as u8, d as u8)
    };
    params.not_before = at(now - days_before * day);
    params.not_after = at(now + days_after * day);
}

impl DevCa {
    /// A new CA named `common_name`, valid for ten years.
    pub fn new(common_name: &str) -> Result<DevCa, CaError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = name(common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        validity(&mut params, 1, 3650);
        let key = KeyPair::generate()?;
        let key_pem = key.serialize_pem();
        let issuer = CertifiedIssuer::self_signed(params, key)?;
        Ok(DevCa {
            issuer,
            key: key_pem,
        })
    }

    /// The CA's certificate and key.
    pub fn pem(&self) -> Pem {
        Pem {
            cert: self.issuer.pem(),
            key: self.key.clone(),
        }
    }

    /// A server certificate for `names` (DNS names or IP addresses), valid from a day ago for
    /// `days` days (negative: it expired that many days ago).
    pub fn server(&self, names: &[&str], days: i64) -> Result<Pem, CaError> {
        let mut params = CertificateParams::new(
            names
                .iter()
                .map(|name| (*name).to_owned())
                .collect::<Vec<_>>(),
        )?;
        params.distinguished_name = name(names.first().copied().unwrap_or("wharf"));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        if days < 0 {
            validity(&mut params, 30, days);
        } else {
            validity(&mut params, 1, days);
        }
        self.sign(params)
    }

    /// A client certificate whose common name is `user`, valid for `days` days.
    pub fn client(&self, user: &str, days: i64) -> Result<Pem, CaError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = name(user);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        validity(&mut params, 1, days);
        self.sign(params)
    }

    fn sign(&self, params: CertificateParams) -> Result<Pem, CaError> {
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Pem {
            cert: cert.pem(),
            key: key.serialize_pem(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::pem::PemObject;

    #[test]
    fn certificates_name_their_subject_and_chain_to_the_ca() {
        let ca = DevCa::new("test CA").unwrap();
        let server = ca.server(&["localhost", "127.0.0.1"], 30).unwrap();
        let client = ca.client("alice", 30).unwrap();
        for pem in [&server, &client, &ca.pem()] {
            assert!(pem.cert.starts_with("-----BEGIN CERTIFICATE-----"));
            assert!(pem.key.contains("PRIVATE KEY"));
        }
        let der =
            rustls::pki_types::CertificateDer::from_pem_slice(client.cert.as_bytes()).unwrap();
        let (_, parsed) = x509_parser::parse_x509_certificate(&der).unwrap();
        let cn = parsed.subject().iter_common_name().next().unwrap();
        assert_eq!(cn.as_str().unwrap(), "alice");
        assert_eq!(
            parsed
                .issuer()
                .iter_common_name()
                .next()
                .unwrap()
                .as_str()
                .unwrap(),
            "test CA"
        );
        let expired = ca.server(&["localhost"], -1).unwrap();
        let der =
            rustls::pki_types::CertificateDer::from_pem_slice(expired.cert.as_bytes()).unwrap();
        let (_, parsed) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert!(!parsed.validity().is_valid(), "expired");
    }
}
