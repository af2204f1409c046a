//! The harness the core's behaviour tests share (`broker.rs`, `timers.rs`,
//! `queue_features.rs`): a broker, its clock and the effects of the commands applied. Each test
//! file adds the helpers it needs in its own `impl Harness` block. (`paging.rs` simulates the
//! server's spools and `model/` checks a model, so they keep harnesses of their own.)
#![allow(dead_code)]

use wharf_core::{Broker, Command, ConnectionId, CoreError, Effect, Limits, Reply};

/// How the harness's clock moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Clock {
    /// One millisecond per command, so that every command happens at a distinct time.
    PerCommand,
    /// Only when a test sets `now` (time-driven features set the clock explicitly).
    Manual,
}

pub struct Harness {
    pub broker: Broker,
    /// The time (ms) the next command is applied at.
    pub now: u64,
    /// Effects of the commands applied so far, not yet taken by the test.
    pub effects: Vec<Effect>,
    clock: Clock,
}

impl Harness {
    /// A broker with `limits`, its clock at `start_ms`, and `connections` open.
    pub fn open(limits: Limits, start_ms: u64, clock: Clock, connections: &[ConnectionId]) -> Self {
        let mut harness = Harness {
            broker: Broker::new(limits),
            now: start_ms,
            effects: Vec::new(),
            clock,
        };
        for connection in connections {
            harness.ok(Command::OpenConnection {
                vhost: wharf_core::DEFAULT_VHOST.into(),
                connection: *connection,
            });
        }
        harness
    }

    pub fn apply(&mut self, command: Command) -> Result<Reply, CoreError> {
        if self.clock == Clock::PerCommand {
            self.now += 1;
        }
        self.broker.apply(self.now, command, &mut self.effects)
    }

    /// Applies a command that must succeed.
    #[track_caller]
    pub fn ok(&mut self, command: Command) -> Reply {
        let debug = format!("{command:?}");
        self.apply(command)
            .unwrap_or_else(|err| panic!("{debug} failed: {err}"))
    }
}
