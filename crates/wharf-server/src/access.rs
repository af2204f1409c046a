//! Permission checks of one connection (issue #18), with RabbitMQ's model and table
//! (docs/security.md): configure / write / read patterns over resource names per user per
//! virtual host, and topic permissions over routing keys on topic exchanges.
//!
//! A connection compiles its user's patterns once and remembers every answer by resource, so
//! a publisher pays one hash lookup per message, not a regular expression. A change of any
//! user or permission bumps the users' generation; the next check sees it and starts afresh,
//! so a permission revoked applies to the connections already open from their next operation.

use crate::auth::{CompiledGrants, Users};
use crate::limits::ACCESS_CACHE_ENTRIES_MAX;
use rustc_hash::FxHashMap;
use std::sync::Arc;
use wharf_core::CoreError;

/// The name the default exchange (`""`) is checked under, as in RabbitMQ.
pub const DEFAULT_EXCHANGE_RESOURCE: &str = "amq.default";

/// What kind of resource a permission is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    /// A queue.
    Queue,
    /// An exchange.
    Exchange,
}

/// Which of the three rights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Right {
    /// Declare, delete.
    Configure,
    /// Publish to; be a binding's destination.
    Write,
    /// Consume, purge; be a binding's source.
    Read,
}

impl Right {
    fn bit(self) -> u8 {
        match self {
            Right::Configure => 1,
            Right::Write => 2,
            Right::Read => 4,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Right::Configure => "configure",
            Right::Write => "write",
            Right::Read => "read",
        }
    }
}

/// Which rights were asked about a resource (`known`) and which of those were granted.
#[derive(Debug, Clone, Copy, Default)]
struct Answers {
    known: u8,
    allowed: u8,
}

/// One connection's view of its user's permissions in its virtual host.
#[derive(Debug)]
pub struct Access {
    users: Arc<Users>,
    user: Arc<str>,
    vhost: Arc<str>,
    generation: u64,
    /// `None`: the user has no permissions in the virtual host (or no longer exists). Shared
    /// by every connection of the user (`Users::compiled_grants`).
    compiled: Option<Arc<CompiledGrants>>,
    queues: FxHashMap<Box<str>, Answers>,
    exchanges: FxHashMap<Box<str>, Answers>,
    /// (exchange, right, routing key) → allowed.
    topics: FxHashMap<(Box<str>, bool, Box<str>), bool>,
    /// The exchange of the last publish found allowed without topic checks, as interned for
    /// the connection's publishes: the next publish to it costs a pointer comparison.
    last_publish: Option<Arc<str>>,
}

impl Access {
    /// The virtual host the connection works in.
    pub fn vhost(&self) -> &Arc<str> {
        &self.vhost
    }

    /// The permissions of `user` in `vhost`, as of now.
    pub fn new(users: Arc<Users>, user: &str, vhost: &str) -> Access {
        let mut access = Access {
            users,
            user: user.into(),
            vhost: vhost.into(),
            generation: u64::MAX,
            compiled: None,
            queues: FxHashMap::default(),
            exchanges: FxHashMap::default(),
            topics: FxHashMap::default(),
            last_publish: None,
        };
        access.refresh();
        access
    }

    /// The user the checks are for.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// The user's name, shared (what its queues remember as their declarer).
    pub fn user_arc(&self) -> &Arc<str> {
        &self.user
    }

    /// The user's own limits, as of now.
    pub fn user_limits(&self) -> crate::auth::UserLimits {
        self.users.limits_of(&self.user).unwrap_or_default()
    }

    /// Whether the user may use the virtual host at all (it has permissions there).
    pub fn may_connect(&mut self) -> bool {
        self.refresh();
        self.compiled.is_some()
    }

    /// Starts afresh if any user or permission changed since the answers were given (a
    /// reader calls it before taking the broker lock, so that the patterns are recompiled
    /// outside it).
    pub fn refresh(&mut self) {
        if self.users.generation() == self.generation {
            return;
        }
        let (generation, compiled) = self.users.compiled_grants(&self.user, &self.vhost);
        self.generation = generation;
        self.compiled = compiled;
        self.queues.clear();
        self.exchanges.clear();
        self.topics.clear();
        self.last_publish = None;
    }

    /// Whether a publish to `exchange` (interned by the connection) is known allowed: the same
    /// `Arc` as the last publish found allowed, with no change since. The hot path of
    /// publishing: one atomic load and a pointer comparison.
    pub fn publish_known_allowed(&self, exchange: &Arc<str>) -> bool {
        self.users.generation() == self.generation
            && self
                .last_publish
                .as_ref()
                .is_some_and(|last| Arc::ptr_eq(last, exchange))
    }

    /// Remembers that publishing to `exchange` needs no further check (it is allowed and has
    /// no topic permissions to check routing keys against).
    pub fn remember_publish_allowed(&mut self, exchange: &Arc<str>) {
        self.last_publish = Some(exchange.clone());
    }

    fn refused(&self, right: Right, resource: Resource, name: &str) -> CoreError {
        let kind = match resource {
            Resource::Queue => "queue",
            Resource::Exchange => "exchange",
        };
        CoreError::AccessRefused {
            reason: format!(
                "{} access to {kind} '{name}' in vhost '{}' refused for user '{}'",
                right.name(),
                self.vhost,
                self.user
            ),
        }
    }

    /// Checks one right on one resource (exchange `""` is checked as `amq.default`).
    pub fn check(&mut self, resource: Resource, right: Right, name: &str) -> Result<(), CoreError> {
        self.refresh();
        let name = match (resource, name) {
            (Resource::Exchange, "") => DEFAULT_EXCHANGE_RESOURCE,
            _ => name,
        };
        let answers = match resource {
            Resource::Queue => &mut self.queues,
            Resource::Exchange => &mut self.exchanges,
        };
        let bit = right.bit();
        if let Some(answer) = answers.get(name)
            && answer.known & bit != 0
        {
            return if answer.allowed & bit != 0 {
                Ok(())
            } else {
                Err(self.refused(right, resource, name))
            };
        }
        let allowed = self.compiled.as_ref().is_some_and(|compiled| match right {
            Right::Configure => compiled.configure.is_match(name),
            Right::Write => compiled.write.is_match(name),
            Right::Read => compiled.read.is_match(name),
        });
        if answers.len() >= ACCESS_CACHE_ENTRIES_MAX {
            answers.clear();
        }
        let answer = answers.entry(name.into()).or_default();
        answer.known |= bit;
        if allowed {
            answer.allowed |= bit;
            Ok(())
        } else {
            Err(self.refused(right, resource, name))
        }
    }

    /// Whether the user has topic permissions on `exchange` (then its routing keys are
    /// checked, if it is a topic exchange).
    pub fn has_topic_permissions(&mut self, exchange: &str) -> bool {
        self.refresh();
        self.compiled
            .as_ref()
            .is_some_and(|compiled| compiled.topics.contains_key(exchange))
    }

    /// Checks a routing key (`Write`: publish) or binding key (`Read`: bind) against the
    /// user's topic permissions on `exchange`, a topic exchange. No topic permissions on it:
    /// every key is allowed, as in RabbitMQ.
    pub fn check_topic(
        &mut self,
        exchange: &str,
        right: Right,
        routing_key: &str,
    ) -> Result<(), CoreError> {
        self.refresh();
        let write = match right {
            Right::Write => true,
            Right::Read => false,
            Right::Configure => unreachable!("topic permissions are write and read"),
        };
        let key = (Box::from(exchange), write, Box::from(routing_key));
        let allowed = match self.topics.get(&key) {
            Some(&allowed) => allowed,
            None => {
                let allowed = match self
                    .compiled
                    .as_ref()
                    .and_then(|compiled| compiled.topics.get(exchange))
                {
                    Some((write_pattern, read_pattern)) => {
                        if write { write_pattern } else { read_pattern }.is_match(routing_key)
                    }
                    None => true,
                };
                if self.topics.len() >= ACCESS_CACHE_ENTRIES_MAX {
                    self.topics.clear();
                }
                self.topics.insert(key, allowed);
                allowed
            }
        };
        if allowed {
            Ok(())
        } else {
            Err(CoreError::AccessRefused {
                reason: format!(
                    "{} access to topic '{routing_key}' in exchange '{exchange}' in vhost '{}' refused for user '{}'",
                    right.name(),
                    self.vhost,
                    self.user
                ),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{DEFAULT_VHOST, Permission, TopicPermission};

    fn users() -> (tempfile::TempDir, Arc<Users>) {
        let dir = tempfile::tempdir().unwrap();
        let users = Arc::new(Users::open(dir.path(), "guest", "guest").unwrap());
        users.add("alice", "pw", &[]).unwrap();
        (dir, users)
    }

    #[test]
    fn patterns_grant_by_right_and_the_empty_pattern_grants_nothing() {
        let (_dir, users) = users();
        let mut access = Access::new(users.clone(), "alice", DEFAULT_VHOST);
        assert!(!access.may_connect(), "a new user has no permissions");
        assert!(access.check(Resource::Queue, Right::Read, "q").is_err());
        users
            .set_permissions(
                "alice",
                DEFAULT_VHOST,
                Permission {
                    configure: "^alice-".to_owned(),
                    write: "^(amq\\.default|alice-.*)$".to_owned(),
                    read: String::new(),
                },
            )
            .unwrap();
        // The change shows at the next check, with no reconnect.
        assert!(access.may_connect());
        assert!(
            access
                .check(Resource::Queue, Right::Configure, "alice-q")
                .is_ok()
        );
        assert!(
            access
                .check(Resource::Queue, Right::Configure, "bob-q")
                .is_err()
        );
        assert!(
            access.check(Resource::Exchange, Right::Write, "").is_ok(),
            "as amq.default"
        );
        assert!(
            access
                .check(Resource::Exchange, Right::Write, "alice-x")
                .is_ok()
        );
        assert!(access.check(Resource::Exchange, Right::Write, "x").is_err());
        let err = access
            .check(Resource::Queue, Right::Read, "alice-q")
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "access refused: read access to queue 'alice-q' in vhost '/' refused for user 'alice'"
        );
        // Remembered answers are dropped when permissions change.
        users.clear_permissions("alice", DEFAULT_VHOST).unwrap();
        assert!(
            access
                .check(Resource::Queue, Right::Configure, "alice-q")
                .is_err()
        );
        assert!(!access.may_connect());
    }

    #[test]
    fn connections_of_one_user_share_one_compiled_copy_until_a_change() {
        let (_dir, users) = users();
        users
            .set_permissions("alice", DEFAULT_VHOST, Permission::full())
            .unwrap();
        let mut first = Access::new(users.clone(), "alice", DEFAULT_VHOST);
        let mut second = Access::new(users.clone(), "alice", DEFAULT_VHOST);
        assert!(first.may_connect() && second.may_connect());
        let (a, b) = (
            first.compiled.clone().unwrap(),
            second.compiled.clone().unwrap(),
        );
        assert!(Arc::ptr_eq(&a, &b), "one compiled copy per user");
        users.add("bob", "pw", &[]).unwrap();
        assert!(first.may_connect());
        let after = first.compiled.clone().unwrap();
        assert!(!Arc::ptr_eq(&a, &after), "compiled again after a change");
        assert!(second.may_connect());
        assert!(Arc::ptr_eq(&after, second.compiled.as_ref().unwrap()));
    }

    #[test]
    fn the_answer_cache_is_bounded() {
        let (_dir, users) = users();
        users
            .set_permissions("alice", DEFAULT_VHOST, Permission::full())
            .unwrap();
        let mut access = Access::new(users, "alice", DEFAULT_VHOST);
        for n in 0..ACCESS_CACHE_ENTRIES_MAX * 2 + 1 {
            access
                .check(Resource::Queue, Right::Read, &format!("q{n}"))
                .unwrap();
            access
                .check_topic("t", Right::Write, &format!("k{n}"))
                .unwrap();
        }
        assert!(access.queues.len() <= ACCESS_CACHE_ENTRIES_MAX);
        assert!(access.topics.len() <= ACCESS_CACHE_ENTRIES_MAX);
    }

    #[test]
    fn topic_permissions_check_routing_keys_with_the_user_name_expanded() {
        let (_dir, users) = users();
        users
            .set_permissions("alice", DEFAULT_VHOST, Permission::full())
            .unwrap();
        users
            .set_topic_permissions(
                "alice",
                DEFAULT_VHOST,
                "events",
                TopicPermission {
                    write: "^{username}\\.".to_owned(),
                    read: "^(public|{username})\\.".to_owned(),
                },
            )
            .unwrap();
        let mut access = Access::new(users.clone(), "alice", DEFAULT_VHOST);
        assert!(access.has_topic_permissions("events"));
        assert!(!access.has_topic_permissions("other"));
        assert!(
            access
                .check_topic("events", Right::Write, "alice.x")
                .is_ok()
        );
        assert!(access.check_topic("events", Right::Write, "bob.x").is_err());
        assert!(
            access
                .check_topic("events", Right::Read, "public.#")
                .is_ok()
        );
        assert!(access.check_topic("events", Right::Read, "bob.#").is_err());
        assert!(access.check_topic("other", Right::Write, "bob.x").is_ok());
        // A user name is matched literally, not as a pattern.
        users.add("a.c", "pw", &[]).unwrap();
        users
            .set_permissions("a.c", DEFAULT_VHOST, Permission::full())
            .unwrap();
        users
            .set_topic_permissions(
                "a.c",
                DEFAULT_VHOST,
                "events",
                TopicPermission {
                    write: "^{username}$".to_owned(),
                    read: String::new(),
                },
            )
            .unwrap();
        let mut dotted = Access::new(users, "a.c", DEFAULT_VHOST);
        assert!(dotted.check_topic("events", Right::Write, "a.c").is_ok());
        assert!(dotted.check_topic("events", Right::Write, "abc").is_err());
        assert!(dotted.check_topic("events", Right::Read, "a.c").is_err());
    }
}
