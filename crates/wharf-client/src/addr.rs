//! Server addresses: `wharf://[user:password@]host[:port][/vhost]`, `wharfs://...` (TLS) or
//! plain `host[:port][/vhost]`.
//!
//! The path names the virtual host as in RabbitMQ's URI spec: none or a bare `/` is the default
//! virtual host `/`; `/NAME` is `NAME` percent-decoded (`%2F` for a `/` in the name, so
//! `/%2Fstaging` is the virtual host `/staging`); a second unescaped `/` is refused.

use crate::error::ClientError;
use std::fmt;
use std::str::FromStr;
use wharf_protocol::DEFAULT_VHOST;
use wharf_protocol::limits::NAME_BYTES_MAX;

/// The port a Wharf server listens on when an address names none.
pub const DEFAULT_PORT: u16 = 5800;

/// The port a Wharf server's TLS listener listens on when a `wharfs://` address names none.
pub const DEFAULT_TLS_PORT: u16 = 5801;

/// URL scheme of Wharf addresses.
pub const SCHEME: &str = "wharf://";

/// URL scheme of Wharf addresses reached over TLS.
pub const TLS_SCHEME: &str = "wharfs://";

/// A parsed server address.
///
/// ```
/// use wharf_client::ServerAddr;
///
/// let addr: ServerAddr = "wharf://app:secret@broker.internal:5801".parse().unwrap();
/// assert_eq!((addr.host(), addr.port()), ("broker.internal", 5801));
/// assert_eq!(addr.user(), Some(("app", "secret")));
/// assert_eq!(addr.vhost(), "/");
/// let plain: ServerAddr = "127.0.0.1".parse().unwrap();
/// assert_eq!(plain.to_string(), "127.0.0.1:5800");
/// let staging: ServerAddr = "wharf://app:secret@broker.internal/staging".parse().unwrap();
/// assert_eq!(staging.vhost(), "staging");
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct ServerAddr {
    host: String,
    port: u16,
    user: Option<(String, String)>,
    tls: bool,
    vhost: String,
}

impl ServerAddr {
    /// Host name or IP address (IPv6 without brackets).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Whether the address is reached over TLS (`wharfs://`).
    pub fn tls(&self) -> bool {
        self.tls
    }

    /// User name and password from the URL's user-info part, if any (used as `PLAIN`
    /// credentials unless the options give others).
    pub fn user(&self) -> Option<(&str, &str)> {
        self.user
            .as_ref()
            .map(|(user, password)| (user.as_str(), password.as_str()))
    }

    /// The virtual host named by the URL's path (percent-decoded), `/` if it names none.
    /// [`ClientOptions::vhost`](crate::ClientOptions::vhost) overrides it.
    pub fn vhost(&self) -> &str {
        &self.vhost
    }
}

/// Why `vhost` cannot name a virtual host, if it cannot: the protocol's rules (non-empty, at
/// most `NAME_BYTES_MAX` bytes, no control characters), checked before anything is sent.
pub(crate) fn vhost_error(vhost: &str) -> Option<&'static str> {
    if vhost.is_empty() {
        Some("the virtual host name is empty")
    } else if vhost.len() > NAME_BYTES_MAX {
        Some("the virtual host name is longer than 255 bytes")
    } else if vhost.chars().any(char::is_control) {
        Some("the virtual host name has a control character")
    } else {
        None
    }
}

/// The virtual host named by an address's path (from its first `/`, query and fragment
/// already refused).
fn vhost_of_path(path: &str) -> Result<String, &'static str> {
    let Some(name) = path.strip_prefix('/') else {
        return Ok(DEFAULT_VHOST.to_owned());
    };
    if name.is_empty() {
        return Ok(DEFAULT_VHOST.to_owned());
    }
    if name.contains('/') {
        return Err("the path names one virtual host: write a '/' inside its name as %2F");
    }
    let vhost = percent_decode(name)?;
    match vhost_error(&vhost) {
        Some(reason) => Err(reason),
        None => Ok(vhost),
    }
}

/// Decodes `%XX` escapes (RFC 3986); the result must be UTF-8.
fn percent_decode(text: &str) -> Result<String, &'static str> {
    const BAD_ESCAPE: &str = "a '%' in the path must start an escape of two hex digits";
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut idx = 0;
    while idx < bytes.len() {
        if bytes[idx] == b'%' {
            let hex = bytes.get(idx + 1..idx + 3).ok_or(BAD_ESCAPE)?;
            // Two hex digits exactly (`from_str_radix` alone would take a sign: "%+1").
            if !hex.iter().all(u8::is_ascii_hexdigit) {
                return Err(BAD_ESCAPE);
            }
            let hex = std::str::from_utf8(hex).map_err(|_| BAD_ESCAPE)?;
            decoded.push(u8::from_str_radix(hex, 16).map_err(|_| BAD_ESCAPE)?);
            idx += 3;
        } else {
            decoded.push(bytes[idx]);
            idx += 1;
        }
    }
    String::from_utf8(decoded).map_err(|_| "the decoded virtual host name is not UTF-8")
}

/// Shows `host:port` (IPv6 in brackets), never the password.
impl fmt::Display for ServerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Never shows the password.
impl fmt::Debug for ServerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let user = self.user.as_ref().map(|(user, _)| user.as_str());
        f.debug_struct("ServerAddr")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &user)
            .field("tls", &self.tls)
            .field("vhost", &self.vhost)
            .finish()
    }
}

impl FromStr for ServerAddr {
    type Err = ClientError;

    fn from_str(text: &str) -> Result<ServerAddr, ClientError> {
        let invalid = |reason| ClientError::InvalidAddress {
            addr: text.to_owned(),
            reason,
        };
        let (rest, tls) = match text.split_once("://") {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("wharf") => (rest, false),
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("wharfs") => (rest, true),
            Some(_) => return Err(invalid("the schemes are wharf:// and wharfs:// (TLS)")),
            None => (text, false),
        };
        if rest.contains(['?', '#']) {
            return Err(invalid("an address has no query or fragment"));
        }
        // The authority ends at the first '/'; the path after it names the virtual host.
        let (rest, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let vhost = vhost_of_path(path).map_err(invalid)?;
        let (user, host_port) = match rest.rsplit_once('@') {
            Some((user_info, host_port)) => {
                let (user, password) = user_info.split_once(':').unwrap_or((user_info, ""));
                if user.is_empty() {
                    return Err(invalid("empty user name"));
                }
                (Some((user.to_owned(), password.to_owned())), host_port)
            }
            None => (None, rest),
        };
        let (host, port) = if let Some(bracketed) = host_port.strip_prefix('[') {
            let (host, after) = bracketed
                .split_once(']')
                .ok_or_else(|| invalid("unclosed '[' in IPv6 host"))?;
            match after {
                "" => (host, None),
                _ => (
                    host,
                    Some(
                        after
                            .strip_prefix(':')
                            .ok_or_else(|| invalid("expected ':' after ']'"))?,
                    ),
                ),
            }
        } else {
            match host_port.split_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (host_port, None),
            }
        };
        if host.is_empty() {
            return Err(invalid("empty host"));
        }
        let port = match port {
            None if tls => DEFAULT_TLS_PORT,
            None => DEFAULT_PORT,
            Some(port) => port
                .parse::<u16>()
                .map_err(|_| invalid("port is not a number in 0..=65535"))?,
        };
        Ok(ServerAddr {
            host: host.to_owned(),
            port,
            user,
            tls,
            vhost,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ServerAddr, ClientError> {
        text.parse()
    }

    #[test]
    fn url_and_plain_forms_parse_to_host_and_port() {
        let addr = parse("wharf://127.0.0.1:5800").unwrap();
        assert_eq!(
            (addr.host(), addr.port(), addr.user()),
            ("127.0.0.1", 5800, None)
        );
        assert_eq!(parse("127.0.0.1:6000").unwrap().port(), 6000);
        assert_eq!(parse("localhost").unwrap().port(), DEFAULT_PORT);
        assert_eq!(parse("WHARF://localhost/").unwrap().host(), "localhost");
        let v6 = parse("wharf://[::1]:7000").unwrap();
        assert_eq!((v6.host(), v6.port()), ("::1", 7000));
        assert_eq!(v6.to_string(), "[::1]:7000");
        assert_eq!(parse("[::1]").unwrap().port(), DEFAULT_PORT);
        assert!(!parse("wharf://h").unwrap().tls());
        let tls = parse("wharfs://alice:pw@broker.internal").unwrap();
        assert!(tls.tls());
        assert_eq!(
            (tls.host(), tls.port()),
            ("broker.internal", DEFAULT_TLS_PORT)
        );
        assert_eq!(parse("WHARFS://h:7001").unwrap().port(), 7001);
    }

    #[test]
    fn user_info_becomes_credentials_and_is_not_displayed() {
        let addr = parse("wharf://alice:p%40ss:w@host").unwrap();
        assert_eq!(addr.user(), Some(("alice", "p%40ss:w")));
        assert!(!format!("{addr} {addr:?}").contains("p%40ss"));
        assert_eq!(parse("wharf://bob@host").unwrap().user(), Some(("bob", "")));
    }

    #[test]
    fn malformed_addresses_are_refused_with_a_reason() {
        for text in [
            "http://host:1",
            "wharf://",
            "host:99999",
            "host:x",
            "wharf://host/a/b",
            "wharf://host//",
            "wharf://host/a/",
            "wharf://host/%",
            "wharf://host/%2",
            "wharf://host/%zz",
            "wharf://host/%+1",
            "wharf://host/%0A",
            "wharf://host/%FF",
            "wharf://host/?x=1",
            "wharf://host#frag",
            "[::1",
            "[::1]x",
            ":5800",
            "wharf://@host",
        ] {
            assert!(
                matches!(parse(text), Err(ClientError::InvalidAddress { .. })),
                "{text} should be refused"
            );
        }
    }

    #[test]
    fn path_names_the_virtual_host_percent_decoded() {
        for (text, vhost) in [
            ("wharf://host", "/"),
            ("wharf://host/", "/"),
            ("wharf://host:5800/", "/"),
            ("host:5800", "/"),
            ("host", "/"),
            ("wharf://u:p@host:5800/staging", "staging"),
            ("wharfs://u:p@host/staging", "staging"),
            ("wharf://host/%2F", "/"),
            ("wharf://host/%2f", "/"),
            ("wharf://host/%2Fstaging", "/staging"),
            ("wharf://host/a%2Fb", "a/b"),
            ("wharf://host/caf%C3%A9", "café"),
            ("wharf://host/a%20b", "a b"),
            ("wharf://host/a@b", "a@b"),
            ("wharf://[::1]:7000/v", "v"),
            ("host:6000/staging", "staging"),
        ] {
            let addr = parse(text).unwrap_or_else(|err| panic!("{text}: {err}"));
            assert_eq!(addr.vhost(), vhost, "{text}");
        }
        let addr = parse("wharf://alice:pw@broker:5900/staging").unwrap();
        assert_eq!(
            (addr.host(), addr.port(), addr.user()),
            ("broker", 5900, Some(("alice", "pw")))
        );
        // The vhost is not part of the socket address shown in errors and logs.
        assert_eq!(addr.to_string(), "broker:5900");
        assert!(format!("{addr:?}").contains("staging"));
    }

    #[test]
    fn virtual_host_names_the_protocol_refuses_are_refused_in_the_address() {
        let too_long = format!("wharf://host/{}", "v".repeat(NAME_BYTES_MAX + 1));
        for text in [
            too_long.as_str(),
            "wharf://host/%00",
            "wharf://host/a%7Fb",
            "wharf://host/%C3",
        ] {
            assert!(
                matches!(parse(text), Err(ClientError::InvalidAddress { .. })),
                "{text} should be refused"
            );
        }
        let longest = format!("wharf://host/{}", "v".repeat(NAME_BYTES_MAX));
        assert_eq!(parse(&longest).unwrap().vhost().len(), NAME_BYTES_MAX);
        assert_eq!(vhost_error("/"), None);
        assert!(vhost_error("").is_some());
    }
}
