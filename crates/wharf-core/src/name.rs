//! Validation of queue and exchange names and routing keys.

use crate::error::CoreError;
use crate::limits::{NAME_BYTES_MAX, ROUTING_KEY_BYTES_MAX};

/// Names beginning with this prefix belong to the broker (built-in exchanges, generated queues).
pub const RESERVED_PREFIX: &str = "wharf.";
/// RabbitMQ's reserved prefix (its built-in exchanges, server-named queues): refused to
/// clients' declares by the protocol front ends, and not by the core, so that logs written
/// before the refusal (which may hold such names) still replay.
pub const AMQ_PREFIX: &str = "amq.";

fn shown(name: &str) -> String {
    let mut end = name.len().min(300);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    name[..end].to_owned()
}

/// Checks a queue or exchange name: 1..=255 bytes of UTF-8 without control characters.
pub fn validate_name(name: &str) -> Result<(), CoreError> {
    if name.is_empty() {
        return Err(CoreError::InvalidName {
            name: String::new(),
            reason: "empty",
        });
    }
    if name.len() > NAME_BYTES_MAX {
        return Err(CoreError::InvalidName {
            name: shown(name),
            reason: "longer than 255 bytes",
        });
    }
    if name.chars().any(char::is_control) {
        return Err(CoreError::InvalidName {
            name: shown(name),
            reason: "contains a control character",
        });
    }
    Ok(())
}

/// Checks a name the user wants to create: valid and not in the reserved `wharf.` namespace.
pub fn validate_user_name(name: &str) -> Result<(), CoreError> {
    validate_name(name)?;
    if name.starts_with(RESERVED_PREFIX) {
        return Err(CoreError::ReservedName {
            name: name.to_owned(),
            prefix: RESERVED_PREFIX,
        });
    }
    Ok(())
}

/// Checks a routing key: at most 255 bytes (it may be empty).
pub fn validate_routing_key(key: &str) -> Result<(), CoreError> {
    if key.len() > ROUTING_KEY_BYTES_MAX {
        return Err(CoreError::InvalidArgument {
            reason: format!(
                "routing key is {} bytes, the limit is {ROUTING_KEY_BYTES_MAX}",
                key.len()
            ),
        });
    }
    Ok(())
}

/// The virtual host every broker has, and that a client gets unless it names another.
pub const DEFAULT_VHOST: &str = "/";

/// Separates a virtual host from a name in a resource key (a control character: never part of
/// a valid name).
const KEY_SEPARATOR: char = '\u{1f}';

/// The key the server logs and spools a queue or exchange under: its name in the default
/// virtual host, `vhost` U+001F `name` elsewhere.
pub fn resource_key(vhost: &str, name: &str) -> String {
    if vhost == DEFAULT_VHOST {
        name.to_owned()
    } else {
        format!("{vhost}{KEY_SEPARATOR}{name}")
    }
}

/// The virtual host and name of a [`resource_key`].
pub fn split_resource_key(key: &str) -> (&str, &str) {
    match key.split_once(KEY_SEPARATOR) {
        Some((vhost, name)) => (vhost, name),
        None => (DEFAULT_VHOST, key),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_keys_split_back_and_the_default_vhost_keeps_plain_names() {
        assert_eq!(resource_key(DEFAULT_VHOST, "orders"), "orders");
        assert_eq!(split_resource_key("orders"), (DEFAULT_VHOST, "orders"));
        let key = resource_key("staging", "orders");
        assert_ne!(key, "orders");
        assert_eq!(split_resource_key(&key), ("staging", "orders"));
        // A vhost name may itself contain '/', never the separator.
        let key = resource_key("/team/a", "q.1");
        assert_eq!(split_resource_key(&key), ("/team/a", "q.1"));
    }

    #[test]
    fn names_are_checked_for_length_control_characters_and_prefix() {
        assert!(validate_name("orders").is_ok());
        assert!(validate_name(&"x".repeat(255)).is_ok());
        assert!(matches!(
            validate_name(""),
            Err(CoreError::InvalidName {
                reason: "empty",
                ..
            })
        ));
        assert!(matches!(
            validate_name(&"x".repeat(256)),
            Err(CoreError::InvalidName { .. })
        ));
        assert!(matches!(
            validate_name("a\nb"),
            Err(CoreError::InvalidName { .. })
        ));
        assert!(matches!(
            validate_user_name("wharf.mine"),
            Err(CoreError::ReservedName { .. })
        ));
        assert!(validate_user_name("wharfy").is_ok());
        assert!(validate_routing_key(&"k".repeat(255)).is_ok());
        assert!(matches!(
            validate_routing_key(&"k".repeat(256)),
            Err(CoreError::InvalidArgument { .. })
        ));
    }

    #[test]
    fn long_multibyte_names_are_truncated_on_a_char_boundary_in_errors() {
        let name = "é".repeat(200);
        let Err(CoreError::InvalidName { name: shown, .. }) = validate_name(&name) else {
            panic!()
        };
        assert!(shown.len() <= 300);
    }
}
