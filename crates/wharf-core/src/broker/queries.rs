//! Read-only views of the state: statistics, listings, flow control.

use super::*;

pub(super) fn exchange_info(exchange: &Exchange) -> ExchangeInfo {
    ExchangeInfo {
        name: exchange.name.to_string(),
        kind: exchange.kind,
        options: exchange.options.clone(),
        builtin: exchange.builtin,
        bindings: exchange.n_bindings(),
    }
}

impl Broker {
    /// Moves the queues that publishes were routed to since the last call into `into`
    /// (cleared first; distinct, the first [`ROUTED_TRACKED_MAX`] of them). Observation only:
    /// no state the commands depend on.
    pub fn take_routed(&mut self, into: &mut Vec<QueueId>) {
        into.clear();
        std::mem::swap(&mut self.routed, into);
    }

    /// What publisher flow control needs to know of a queue, as seen by the publishing
    /// `connection`, or `None` if the queue is gone.
    pub fn queue_flow(&self, qid: QueueId, connection: ConnectionId) -> Option<QueueFlow> {
        let queue = self.queues.get(&qid)?;
        Some(QueueFlow {
            ready: queue.ready_total(),
            ready_bytes: queue.ready.bytes() + queue.paged.bytes,
            consumers: queue.consumers.len() as u32,
            own_consumers: queue
                .consumers
                .iter()
                .filter(|consumer| consumer.connection == connection)
                .count() as u32,
            delivered: queue.stats.delivered,
            unacked_bytes: queue.unacked_bytes,
        })
    }

    /// Statistics of one queue of `vhost`.
    pub fn queue_stats(&self, vhost: &str, name: &str) -> Result<QueueStats, CoreError> {
        let qid = self
            .ns(vhost)?
            .queue_names
            .get(name)
            .ok_or_else(|| CoreError::not_found(EntityKind::Queue, name))?;
        Ok(self.queues[qid].stats())
    }

    /// Statistics of every queue of `vhost`, sorted by name.
    pub fn list_queues(&self, vhost: &str) -> Vec<QueueStats> {
        let mut all: Vec<QueueStats> = self
            .queues
            .values()
            .filter(|queue| *queue.vhost == *vhost)
            .map(Queue::stats)
            .collect();
        all.sort_by(|left, right| left.name.cmp(&right.name));
        all
    }

    /// Every exchange of `vhost`, sorted by name.
    pub fn list_exchanges(&self, vhost: &str) -> Vec<ExchangeInfo> {
        let Some(ns) = self.vhosts.get(vhost) else {
            return Vec::new();
        };
        let mut all: Vec<ExchangeInfo> = ns.exchanges.values().map(exchange_info).collect();
        all.sort_by(|left, right| left.name.cmp(&right.name));
        all
    }

    /// Every binding of `vhost`, sorted by source, then destination.
    pub fn list_bindings(&self, vhost: &str) -> Vec<BindingInfo> {
        let Some(ns) = self.vhosts.get(vhost) else {
            return Vec::new();
        };
        let mut names: Vec<&Arc<str>> = ns.exchanges.keys().collect();
        names.sort();
        let mut all = Vec::new();
        for name in names {
            for key in ns.exchanges[name].bindings() {
                let target = match &key.destination {
                    Destination::Queue(qid) => BindTarget::Queue(self.queues[qid].name.to_string()),
                    Destination::Exchange(exchange) => BindTarget::Exchange(exchange.to_string()),
                };
                all.push(BindingInfo {
                    source: name.to_string(),
                    target,
                    routing_key: key.routing_key.to_string(),
                    arguments: key.arguments,
                });
            }
        }
        all
    }

    /// The name the next declare of a queue with an empty name in `vhost` gets
    /// (`wharf.gen-N`), for the server's permission check, which must see the name before the
    /// queue exists.
    pub fn next_generated_queue_name(&self, vhost: &str) -> String {
        self.generated_queue_name(vhost).0
    }

    /// The name a declare with an empty name in `vhost` would give its queue now, and the
    /// counter after it.
    pub(crate) fn generated_queue_name(&self, vhost: &str) -> (String, u64) {
        let mut next = self.next_generated_name;
        let names = self.vhosts.get(vhost).map(|ns| &ns.queue_names);
        loop {
            let candidate = format!("wharf.gen-{next}");
            next += 1;
            if !names.is_some_and(|names| names.contains_key(candidate.as_str())) {
                return (candidate, next);
            }
        }
    }

    /// One exchange's summary.
    pub fn exchange_info(&self, vhost: &str, name: &str) -> Option<ExchangeInfo> {
        self.vhosts
            .get(vhost)?
            .exchanges
            .get(name)
            .map(exchange_info)
    }

    /// Options of a queue (for persisting durable topology).
    pub fn queue_options(&self, vhost: &str, name: &str) -> Option<&QueueOptions> {
        self.vhosts
            .get(vhost)?
            .queue_names
            .get(name)
            .map(|qid| &self.queues[qid].options)
    }

    /// Who declared a queue ([`Declarer`]), if the server said.
    pub fn queue_declarer(&self, vhost: &str, name: &str) -> Option<&Arc<str>> {
        let qid = self.vhosts.get(vhost)?.queue_names.get(name)?;
        self.queues[qid].declared_by.as_ref()
    }

    /// Queues existing that `declarer` declared.
    pub fn queues_declared_by(&self, declarer: &str) -> u32 {
        self.queues_by_declarer.get(declarer).copied().unwrap_or(0)
    }

    /// Every queue of every virtual host, as (virtual host, statistics), sorted (for the
    /// checkpoint and for operators).
    pub fn list_all_queues(&self) -> Vec<(Arc<str>, QueueStats)> {
        let mut all: Vec<(Arc<str>, QueueStats)> = self
            .queues
            .values()
            .map(|queue| (queue.vhost.clone(), queue.stats()))
            .collect();
        all.sort_by(|left, right| (&left.0, &left.1.name).cmp(&(&right.0, &right.1.name)));
        all
    }

    /// Deliveries outstanding (unacked) on a connection.
    pub fn unacked_count(&self, connection: ConnectionId) -> usize {
        self.connections
            .get(&connection)
            .map_or(0, |conn| conn.unacked.len())
    }
}
