//! Virtual hosts: isolated namespaces with their own built-in exchanges, their limits, and
//! deleting one with everything in it.

mod common;

use common::{Clock, Harness};
use std::sync::Arc;
use wharf_core::{
    BindTarget, Command, ConnectionId, CoreError, DEFAULT_VHOST, Effect, EntityKind, Headers,
    Limits, Message, QueueOptions, Reply, VhostLimits, resource_key,
};

const C1: ConnectionId = ConnectionId(1);
const C2: ConnectionId = ConnectionId(2);

fn vhost(name: &str) -> Arc<str> {
    name.into()
}

impl Harness {
    fn add_vhost(&mut self, name: &str, limits: VhostLimits) {
        self.ok(Command::AddVhost {
            name: name.to_owned(),
            limits,
        });
    }

    fn open_in(&mut self, connection: ConnectionId, name: &str) -> Result<Reply, CoreError> {
        self.apply(Command::OpenConnection {
            connection,
            vhost: vhost(name),
        })
    }

    fn declare_in(
        &mut self,
        name: &str,
        connection: ConnectionId,
        queue: &str,
        durable: bool,
    ) -> Result<Reply, CoreError> {
        self.apply(Command::DeclareQueue {
            vhost: vhost(name),
            connection,
            name: queue.to_owned(),
            options: QueueOptions {
                durable,
                ..QueueOptions::default()
            },
            passive: false,
            declarer: None,
        })
    }

    fn publish_in(&mut self, name: &str, exchange: &str, key: &str, body: &str) -> Reply {
        let message = Message {
            exchange: exchange.into(),
            ..Message::new(key, body.to_owned())
        };
        self.ok(Command::Publish {
            vhost: vhost(name),
            message: Arc::new(message),
        })
    }
}

fn harness() -> Harness {
    let mut h = Harness::open(Limits::default(), 1_000, Clock::PerCommand, &[]);
    h.add_vhost("staging", VhostLimits::default());
    h.open_in(C1, DEFAULT_VHOST).unwrap();
    h.open_in(C2, "staging").unwrap();
    h
}

#[test]
fn the_same_queue_name_in_two_vhosts_is_two_queues() {
    let mut h = harness();
    h.declare_in(DEFAULT_VHOST, C1, "orders", false).unwrap();
    h.declare_in("staging", C2, "orders", false).unwrap();
    h.publish_in(DEFAULT_VHOST, "", "orders", "for /");
    h.publish_in("staging", "", "orders", "for staging");
    h.publish_in("staging", "", "orders", "for staging again");
    let ready = |h: &Harness, name: &str| h.broker.queue_stats(name, "orders").unwrap().ready;
    assert_eq!((ready(&h, DEFAULT_VHOST), ready(&h, "staging")), (1, 2));
    // Listings are per virtual host.
    assert_eq!(h.broker.list_queues("staging").len(), 1);
    assert_eq!(h.broker.list_queues(DEFAULT_VHOST).len(), 1);
}

#[test]
fn each_vhost_has_its_own_built_in_exchanges_and_nothing_routes_across() {
    let mut h = harness();
    h.declare_in(DEFAULT_VHOST, C1, "q", false).unwrap();
    h.declare_in("staging", C2, "q", false).unwrap();
    h.ok(Command::Bind {
        vhost: vhost("staging"),
        source: "wharf.topic".into(),
        target: BindTarget::Queue("q".into()),
        routing_key: "#".into(),
        arguments: Headers::new(),
    });
    assert_eq!(
        h.broker
            .exchange_info("staging", "wharf.topic")
            .unwrap()
            .bindings,
        1
    );
    assert_eq!(
        h.broker
            .exchange_info(DEFAULT_VHOST, "wharf.topic")
            .unwrap()
            .bindings,
        0
    );
    let reply = h.publish_in(DEFAULT_VHOST, "wharf.topic", "a.b", "x");
    assert!(
        matches!(reply, Reply::Published { routed: 0, .. }),
        "{reply:?}"
    );
    let reply = h.publish_in("staging", "wharf.topic", "a.b", "x");
    assert!(
        matches!(reply, Reply::Published { routed: 1, .. }),
        "{reply:?}"
    );
    // An exchange declared in one is not found in the other.
    h.ok(Command::DeclareExchange {
        vhost: vhost("staging"),
        name: "events".into(),
        kind: wharf_core::ExchangeKind::Fanout,
        options: Default::default(),
        passive: false,
    });
    let err = h
        .apply(Command::DeclareExchange {
            vhost: vhost(DEFAULT_VHOST),
            name: "events".into(),
            kind: wharf_core::ExchangeKind::Fanout,
            options: Default::default(),
            passive: true,
        })
        .unwrap_err();
    assert!(
        matches!(
            err,
            CoreError::NotFound {
                kind: EntityKind::Exchange,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn an_unknown_vhost_is_not_found_for_connections_and_commands() {
    let mut h = harness();
    let err = h.open_in(ConnectionId(9), "nope").unwrap_err();
    assert!(
        matches!(err, CoreError::NotFound { kind: EntityKind::Vhost, ref name } if name == "nope"),
        "{err}"
    );
    let err = h.declare_in("nope", C1, "q", false).unwrap_err();
    assert!(
        matches!(
            err,
            CoreError::NotFound {
                kind: EntityKind::Vhost,
                ..
            }
        ),
        "{err}"
    );
    let err = h
        .apply(Command::Publish {
            vhost: vhost("nope"),
            message: Arc::new(Message::new("q", "x")),
        })
        .unwrap_err();
    assert!(
        matches!(
            err,
            CoreError::NotFound {
                kind: EntityKind::Vhost,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn max_queues_and_max_connections_are_enforced_per_vhost() {
    let mut h = harness();
    h.add_vhost(
        "small",
        VhostLimits {
            max_connections: Some(1),
            max_queues: Some(2),
        },
    );
    h.open_in(ConnectionId(3), "small").unwrap();
    let err = h.open_in(ConnectionId(4), "small").unwrap_err();
    assert!(
        matches!(err, CoreError::LimitExceeded { limit: 1, .. }),
        "{err}"
    );
    h.declare_in("small", ConnectionId(3), "a", false).unwrap();
    h.declare_in("small", ConnectionId(3), "b", false).unwrap();
    let err = h
        .declare_in("small", ConnectionId(3), "c", false)
        .unwrap_err();
    assert!(
        matches!(err, CoreError::LimitExceeded { what, limit: 2 } if what.contains("virtual host")),
        "{err}"
    );
    // Redeclaring an existing queue is not a new queue; other vhosts are not limited.
    h.declare_in("small", ConnectionId(3), "a", false).unwrap();
    h.declare_in("staging", C2, "c", false).unwrap();
    // A connection closing frees its slot; raising the limit lets more in.
    h.ok(Command::CloseConnection {
        connection: ConnectionId(3),
    });
    h.open_in(ConnectionId(4), "small").unwrap();
    h.ok(Command::SetVhostLimits {
        name: "small".into(),
        limits: VhostLimits {
            max_connections: Some(2),
            max_queues: None,
        },
    });
    h.open_in(ConnectionId(5), "small").unwrap();
    h.declare_in("small", ConnectionId(5), "c", false).unwrap();
    let info = h.broker.list_vhosts();
    let small = info.iter().find(|info| info.name == "small").unwrap();
    assert_eq!((small.connections, small.queues), (2, 3));
}

#[test]
fn the_number_of_vhosts_is_limited() {
    let limits = Limits {
        vhosts_max: 2,
        ..Limits::default()
    };
    let mut h = Harness::open(limits, 1_000, Clock::PerCommand, &[]);
    h.add_vhost("a", VhostLimits::default());
    let err = h
        .apply(Command::AddVhost {
            name: "b".into(),
            limits: VhostLimits::default(),
        })
        .unwrap_err();
    assert!(
        matches!(err, CoreError::LimitExceeded { limit: 2, .. }),
        "{err}"
    );
    // Adding an existing one again only sets its limits.
    h.add_vhost(
        "a",
        VhostLimits {
            max_queues: Some(7),
            ..VhostLimits::default()
        },
    );
    assert_eq!(h.broker.vhost_limits("a").unwrap().max_queues, Some(7));
    let err = h
        .apply(Command::AddVhost {
            name: "bad\nname".into(),
            limits: VhostLimits::default(),
        })
        .unwrap_err();
    assert!(matches!(err, CoreError::InvalidName { .. }), "{err}");
}

#[test]
fn the_default_vhost_limit_is_crossed_at_its_full_size() {
    let vhosts_max = Limits::default().vhosts_max;
    assert_eq!(vhosts_max, 1_024);
    let mut h = Harness::open(Limits::default(), 1_000, Clock::PerCommand, &[]);
    // "/" is one of them.
    for idx in 1..vhosts_max {
        h.add_vhost(&format!("tenant-{idx}"), VhostLimits::default());
    }
    assert_eq!(h.broker.list_vhosts().len(), vhosts_max);
    let err = h
        .apply(Command::AddVhost {
            name: "one-too-many".into(),
            limits: VhostLimits::default(),
        })
        .unwrap_err();
    assert!(
        matches!(err, CoreError::LimitExceeded { limit: 1_024, .. }),
        "{err}"
    );
    // Deleting one makes room again.
    h.ok(Command::DeleteVhost {
        name: "tenant-7".into(),
    });
    h.add_vhost("one-too-many", VhostLimits::default());
}

#[test]
fn deleting_a_vhost_deletes_its_queues_and_exchanges_under_their_resource_keys() {
    let mut h = harness();
    h.declare_in("staging", C2, "durable", true).unwrap();
    h.declare_in(DEFAULT_VHOST, C1, "durable", true).unwrap();
    h.ok(Command::DeclareExchange {
        vhost: vhost("staging"),
        name: "events".into(),
        kind: wharf_core::ExchangeKind::Fanout,
        options: wharf_core::ExchangeOptions {
            durable: true,
            ..Default::default()
        },
        passive: false,
    });
    h.ok(Command::Subscribe {
        vhost: vhost("staging"),
        connection: C2,
        queue: "durable".into(),
        consumer_tag: wharf_core::ConsumerTag(1),
        options: Default::default(),
    });
    h.effects.clear();
    h.ok(Command::DeleteVhost {
        name: "staging".into(),
    });
    let key = resource_key("staging", "durable");
    assert!(
        h.effects.iter().any(|effect| matches!(effect,
            Effect::QueueDeleted { name, durable: true } if **name == *key)),
        "{:?}",
        h.effects
    );
    let exchange_key = resource_key("staging", "events");
    assert!(
        h.effects.iter().any(|effect| matches!(effect,
            Effect::ExchangeDeleted { name, durable: true } if **name == *exchange_key)),
        "{:?}",
        h.effects
    );
    assert!(h.effects.iter().any(|effect| matches!(
        effect,
        Effect::ConsumerCancelled { connection, .. } if *connection == C2
    )));
    assert!(!h.broker.has_vhost("staging"));
    // The queue of the same name in "/" is untouched.
    assert!(h.broker.queue_stats(DEFAULT_VHOST, "durable").is_ok());
    // The connection still open in the deleted vhost finds nothing, and leaving is fine.
    let err = h.declare_in("staging", C2, "x", false).unwrap_err();
    assert!(
        matches!(
            err,
            CoreError::NotFound {
                kind: EntityKind::Vhost,
                ..
            }
        ),
        "{err}"
    );
    // A vhost added again under the same name is a new, empty one, and the old connection's
    // close does not count against it.
    h.add_vhost("staging", VhostLimits::default());
    assert!(h.broker.list_queues("staging").is_empty());
    h.ok(Command::CloseConnection { connection: C2 });
    let staging = h.broker.list_vhosts();
    let staging = staging.iter().find(|info| info.name == "staging").unwrap();
    assert_eq!(staging.connections, 0);
}

#[test]
fn the_default_vhost_cannot_be_deleted() {
    let mut h = harness();
    let err = h
        .apply(Command::DeleteVhost {
            name: DEFAULT_VHOST.into(),
        })
        .unwrap_err();
    assert!(matches!(err, CoreError::AccessRefused { .. }), "{err}");
    let err = h
        .apply(Command::DeleteVhost {
            name: "missing".into(),
        })
        .unwrap_err();
    assert!(
        matches!(
            err,
            CoreError::NotFound {
                kind: EntityKind::Vhost,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn dead_letters_go_to_the_dead_letter_exchange_of_their_own_vhost() {
    let mut h = harness();
    for name in [DEFAULT_VHOST, "staging"] {
        let connection = if name == DEFAULT_VHOST { C1 } else { C2 };
        h.declare_in(name, connection, "dlq", false).unwrap();
        h.ok(Command::Bind {
            vhost: vhost(name),
            source: "wharf.fanout".into(),
            target: BindTarget::Queue("dlq".into()),
            routing_key: String::new(),
            arguments: Headers::new(),
        });
    }
    h.ok(Command::DeclareQueue {
        vhost: vhost("staging"),
        connection: C2,
        name: "work".into(),
        options: QueueOptions {
            arguments: Headers::new()
                .with("x-dead-letter-exchange", "wharf.fanout")
                .with("x-max-length", 1i64),
            ..QueueOptions::default()
        },
        passive: false,
        declarer: None,
    });
    h.publish_in("staging", "", "work", "first");
    h.publish_in("staging", "", "work", "second");
    assert_eq!(h.broker.queue_stats("staging", "dlq").unwrap().ready, 1);
    assert_eq!(h.broker.queue_stats(DEFAULT_VHOST, "dlq").unwrap().ready, 0);
}

fn declare_by(
    h: &mut Harness,
    vhost_name: &str,
    connection: ConnectionId,
    queue: &str,
    user: &str,
    max_queues: Option<u32>,
    exclusive: bool,
) -> Result<Reply, CoreError> {
    h.apply(Command::DeclareQueue {
        vhost: vhost(vhost_name),
        connection,
        name: queue.to_owned(),
        options: QueueOptions {
            exclusive,
            ..QueueOptions::default()
        },
        passive: false,
        declarer: Some(wharf_core::Declarer {
            name: user.into(),
            max_queues,
        }),
    })
}

#[test]
fn a_declarers_queue_limit_counts_its_live_queues_in_every_vhost() {
    let mut h = harness();
    declare_by(&mut h, DEFAULT_VHOST, C1, "a", "alice", Some(3), false).unwrap();
    declare_by(&mut h, "staging", C2, "b", "alice", Some(3), false).unwrap();
    // Exclusive queues count too, while they live.
    declare_by(&mut h, DEFAULT_VHOST, C1, "c", "alice", Some(3), true).unwrap();
    let err = declare_by(&mut h, "staging", C2, "d", "alice", Some(3), false).unwrap_err();
    assert!(
        matches!(err, CoreError::LimitExceeded { what, limit: 3 } if what.contains("user")),
        "{err}"
    );
    // Redeclaring one it has is no new queue; another declarer is not limited by alice's.
    declare_by(&mut h, DEFAULT_VHOST, C1, "a", "alice", Some(3), false).unwrap();
    declare_by(&mut h, "staging", C2, "d", "bob", Some(1), false).unwrap();
    assert_eq!(h.broker.queues_declared_by("alice"), 3);
    // Its exclusive queue goes with its connection, a deleted queue frees its place too.
    h.ok(Command::CloseConnection { connection: C1 });
    assert_eq!(h.broker.queues_declared_by("alice"), 2);
    h.ok(Command::DeleteQueue {
        vhost: vhost("staging"),
        connection: C2,
        name: "b".into(),
        if_unused: false,
        if_empty: false,
    });
    assert_eq!(h.broker.queues_declared_by("alice"), 1);
    declare_by(&mut h, "staging", C2, "e", "alice", Some(2), false).unwrap();
    declare_by(&mut h, "staging", C2, "f", "alice", None, false).unwrap();
    assert_eq!(h.broker.queues_declared_by("alice"), 3);
    assert_eq!(
        h.broker
            .queue_declarer(DEFAULT_VHOST, "a")
            .map(|name| name.to_string()),
        Some("alice".to_owned())
    );
    // Deleting a vhost frees the places of what it held.
    h.ok(Command::DeleteVhost {
        name: "staging".into(),
    });
    assert_eq!(h.broker.queues_declared_by("alice"), 1);
    assert_eq!(h.broker.queues_declared_by("bob"), 0);
}

#[test]
fn the_exchange_cap_counts_declared_exchanges_not_each_vhosts_built_in_ones() {
    let limits = Limits {
        exchanges_max: 1,
        ..Limits::default()
    };
    let mut h = Harness::open(limits, 1_000, Clock::PerCommand, &[]);
    // Virtual hosts bring their built-in exchanges without using up the cap.
    for name in ["a", "b", "c"] {
        h.add_vhost(name, VhostLimits::default());
    }
    let declare = |name: &str, vhost_name: &str| Command::DeclareExchange {
        vhost: vhost(vhost_name),
        name: name.into(),
        kind: wharf_core::ExchangeKind::Fanout,
        options: Default::default(),
        passive: false,
    };
    h.ok(declare("events", "b"));
    let err = h.apply(declare("more", "c")).unwrap_err();
    assert!(
        matches!(err, CoreError::LimitExceeded { limit: 1, .. }),
        "{err}"
    );
    // Redeclaring the one it has is fine.
    h.ok(declare("events", "b"));
}
