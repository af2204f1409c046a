//! Virtual hosts: named namespaces of exchanges (each with its own built-in ones), queues and
//! bindings. A connection works in one; names resolve in it, and nothing routes across two.
//!
//! Queues and exchanges keep their plain names; what the server logs and spools them under is
//! their *resource key* ([`resource_key`]), which is the plain name in the default virtual host
//! (so logs written before virtual hosts existed read as they were) and `vhost` + U+001F + name
//! elsewhere. Names and virtual host names cannot contain control characters, so a key splits
//! back unambiguously ([`split_resource_key`]).

use super::*;
pub use crate::name::{DEFAULT_VHOST, resource_key, split_resource_key};

/// A virtual host's own limits (RabbitMQ's `max-connections` and `max-queues`); `None`: none
/// beyond the broker's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VhostLimits {
    /// Most connections open in it at once.
    pub max_connections: Option<u32>,
    /// Most queues it may hold.
    pub max_queues: Option<u32>,
}

/// A virtual host's summary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VhostInfo {
    /// Its name.
    pub name: String,
    /// Its limits.
    pub limits: VhostLimits,
    /// Connections open in it.
    pub connections: u32,
    /// Queues it holds.
    pub queues: u32,
}

/// One virtual host's names.
#[derive(Debug, Clone)]
pub(crate) struct Namespace {
    pub(crate) exchanges: HashMap<Arc<str>, Exchange, FixedState>,
    pub(crate) queue_names: HashMap<Arc<str>, QueueId, FixedState>,
    pub(crate) limits: VhostLimits,
    pub(crate) connections: u32,
    /// Tells a virtual host from an earlier one of the same name (connections remember it).
    pub(crate) epoch: u64,
}

impl Namespace {
    /// A virtual host with the built-in exchanges and nothing else.
    pub(crate) fn new(limits: VhostLimits, epoch: u64) -> Namespace {
        let mut exchanges = HashMap::default();
        for (name, kind) in BUILTIN_EXCHANGES {
            let options = ExchangeOptions {
                durable: true,
                ..ExchangeOptions::default()
            };
            exchanges.insert(name.into(), Exchange::new(name.into(), kind, options, true));
        }
        Namespace {
            exchanges,
            queue_names: HashMap::default(),
            limits,
            connections: 0,
            epoch,
        }
    }
}

impl Broker {
    /// The namespace of `vhost`.
    pub(crate) fn ns(&self, vhost: &str) -> Result<&Namespace, CoreError> {
        self.vhosts
            .get(vhost)
            .ok_or_else(|| CoreError::not_found(EntityKind::Vhost, vhost))
    }

    /// The namespace of `vhost`, to change.
    pub(crate) fn ns_mut(&mut self, vhost: &str) -> Result<&mut Namespace, CoreError> {
        self.vhosts
            .get_mut(vhost)
            .ok_or_else(|| CoreError::not_found(EntityKind::Vhost, vhost))
    }

    /// The interned name of `vhost`.
    pub(crate) fn vhost_name(&self, vhost: &str) -> Result<Arc<str>, CoreError> {
        self.vhosts
            .get_key_value(vhost)
            .map(|(name, _)| name.clone())
            .ok_or_else(|| CoreError::not_found(EntityKind::Vhost, vhost))
    }

    pub(super) fn add_vhost(
        &mut self,
        name: String,
        limits: VhostLimits,
    ) -> Result<Reply, CoreError> {
        validate_name(&name)?;
        if let Some(existing) = self.vhosts.get_mut(name.as_str()) {
            // Adding an existing virtual host sets its limits (an idempotent declare).
            existing.limits = limits;
            return Ok(Reply::Done);
        }
        if self.vhosts.len() >= self.limits.vhosts_max {
            return Err(CoreError::LimitExceeded {
                what: "virtual hosts",
                limit: self.limits.vhosts_max,
            });
        }
        self.next_vhost_epoch += 1;
        let ns = Namespace::new(limits, self.next_vhost_epoch);
        self.vhosts.insert(name.as_str().into(), ns);
        Ok(Reply::Done)
    }

    pub(super) fn set_vhost_limits(
        &mut self,
        name: &str,
        limits: VhostLimits,
    ) -> Result<Reply, CoreError> {
        self.ns_mut(name)?.limits = limits;
        Ok(Reply::Done)
    }

    /// Deletes a virtual host and everything in it (queues with their messages, exchanges,
    /// bindings). Connections open in it stay registered (their consumers are cancelled with
    /// the queues) until the server closes them; their commands find no virtual host, and a
    /// virtual host added again under the same name is a new one ([`Namespace::epoch`]).
    pub(super) fn delete_vhost(
        &mut self,
        name: &str,
        effects: &mut Vec<Effect>,
    ) -> Result<Reply, CoreError> {
        let ns = self.ns(name)?;
        if name == DEFAULT_VHOST {
            return Err(CoreError::AccessRefused {
                reason: "the default virtual host '/' cannot be deleted".to_owned(),
            });
        }
        let mut queues: Vec<(Arc<str>, QueueId)> = ns
            .queue_names
            .iter()
            .map(|(queue, qid)| (queue.clone(), *qid))
            .collect();
        queues.sort();
        for (_, qid) in queues {
            if self.queues.contains_key(&qid) {
                self.remove_queue(qid, effects);
            }
        }
        let vhost = self.vhost_name(name)?;
        let mut exchanges: Vec<Arc<str>> = self.ns(name)?.exchanges.keys().cloned().collect();
        exchanges.sort();
        for exchange in exchanges {
            let builtin = self.ns(name)?.exchanges.get(&exchange).map(|ex| ex.builtin);
            if builtin == Some(false) {
                self.remove_exchange(&vhost, &exchange, effects);
            }
        }
        self.vhosts.remove(name);
        self.dispatch_touched(effects);
        Ok(Reply::Done)
    }

    /// Every virtual host, sorted by name.
    pub fn list_vhosts(&self) -> Vec<VhostInfo> {
        let mut all: Vec<VhostInfo> = self
            .vhosts
            .iter()
            .map(|(name, ns)| VhostInfo {
                name: name.to_string(),
                limits: ns.limits,
                connections: ns.connections,
                queues: ns.queue_names.len() as u32,
            })
            .collect();
        all.sort_by(|left, right| left.name.cmp(&right.name));
        all
    }

    /// Whether `connection` is open in a virtual host that still exists (not deleted, nor
    /// deleted and added again since it connected).
    pub fn connection_vhost_is_live(&self, connection: ConnectionId) -> bool {
        self.connections.get(&connection).is_some_and(|conn| {
            self.vhosts
                .get(&conn.vhost)
                .is_some_and(|ns| ns.epoch == conn.vhost_epoch)
        })
    }

    /// Whether `vhost` exists.
    pub fn has_vhost(&self, vhost: &str) -> bool {
        self.vhosts.contains_key(vhost)
    }

    /// The limits of `vhost`, if it exists.
    pub fn vhost_limits(&self, vhost: &str) -> Option<VhostLimits> {
        self.vhosts.get(vhost).map(|ns| ns.limits)
    }
}
