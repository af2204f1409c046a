//! Server addresses: `wharf://[user:password@]host[:port][/]`, `wharfs://...` (TLS) or plain
//! `host[:port]`.

use crate::error::ClientError;
use std::fmt;
use std::str::FromStr;

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
/// let plain: ServerAddr = "127.0.0.1".parse().unwrap();
/// assert_eq!(plain.to_string(), "127.0.0.1:5800");
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct ServerAddr {
    host: String,
    port: u16,
    user: Option<(String, String)>,
    tls: bool,
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
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains(['/', '?', '#']) {
            return Err(invalid("an address has no path, query or fragment"));
        }
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
            "wharf://host/vhost",
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
}
