//! Exchanges, bindings and queues: declare, bind, unbind, delete.

use super::*;

pub(super) fn check_exclusive_access(
    queue: &Queue,
    connection: ConnectionId,
) -> Result<(), CoreError> {
    match queue.owner {
        Some(owner) if owner != connection => Err(CoreError::ResourceLocked {
            name: queue.name.to_string(),
            reason: "it is exclusive to another connection",
        }),
        _ => Ok(()),
    }
}

pub(super) fn check_header_depth(headers: &Headers) -> Result<(), CoreError> {
    if headers.depth() > HEADER_DEPTH_MAX {
        return Err(CoreError::InvalidArgument {
            reason: format!("headers nest deeper than {HEADER_DEPTH_MAX} levels"),
        });
    }
    Ok(())
}

impl Broker {
    pub(super) fn declare_exchange(
        &mut self,
        vhost: &str,
        name: String,
        kind: ExchangeKind,
        options: ExchangeOptions,
        passive: bool,
    ) -> Result<Reply, CoreError> {
        if name != DEFAULT_EXCHANGE {
            validate_name(&name)?;
        }
        if let Some(existing) = self.ns(vhost)?.exchanges.get(name.as_str()) {
            if passive {
                return Ok(Reply::Done);
            }
            if existing.kind != kind || existing.options != options {
                if existing.builtin {
                    return Err(CoreError::AccessRefused {
                        reason: format!("exchange '{name}' is built in"),
                    });
                }
                return Err(CoreError::precondition(
                    EntityKind::Exchange,
                    &name,
                    format!(
                        "declared as {} {:?}, redeclared as {} {:?}",
                        existing.kind, existing.options, kind, options
                    ),
                ));
            }
            return Ok(Reply::Done);
        }
        if passive {
            return Err(CoreError::not_found(EntityKind::Exchange, name));
        }
        if name == DEFAULT_EXCHANGE || name.starts_with(RESERVED_PREFIX) {
            validate_user_name(&name)?;
        }
        // Declared ones only: the built-in exchanges each virtual host has count against
        // nothing (adding a virtual host must not use up the cap, nor replaying one).
        let exchanges: usize = self
            .vhosts
            .values()
            .map(|ns| ns.exchanges.len() - BUILTIN_EXCHANGES.len())
            .sum();
        if exchanges >= self.limits.exchanges_max {
            return Err(CoreError::LimitExceeded {
                what: "exchanges",
                limit: self.limits.exchanges_max,
            });
        }
        check_header_depth(&options.arguments)?;
        let name: Arc<str> = name.into();
        self.ns_mut(vhost)?
            .exchanges
            .insert(name.clone(), Exchange::new(name, kind, options, false));
        Ok(Reply::Done)
    }

    pub(super) fn delete_exchange(
        &mut self,
        vhost: &str,
        name: &str,
        if_unused: bool,
        effects: &mut Vec<Effect>,
    ) -> Result<Reply, CoreError> {
        let vhost = self.vhost_name(vhost)?;
        let exchange = self
            .ns(&vhost)?
            .exchanges
            .get(name)
            .ok_or_else(|| CoreError::not_found(EntityKind::Exchange, name))?;
        if exchange.builtin {
            return Err(CoreError::AccessRefused {
                reason: format!("exchange '{name}' is built in and cannot be deleted"),
            });
        }
        if if_unused && exchange.n_bindings() > 0 {
            return Err(CoreError::precondition(
                EntityKind::Exchange,
                name,
                format!("it has {} bindings", exchange.n_bindings()),
            ));
        }
        let name = exchange.name.clone();
        self.remove_exchange(&vhost, &name, effects);
        Ok(Reply::Done)
    }

    /// Removes an exchange, every binding from it and every binding to it (which may
    /// auto-delete further exchanges).
    pub(super) fn remove_exchange(
        &mut self,
        vhost: &Arc<str>,
        name: &Arc<str>,
        effects: &mut Vec<Effect>,
    ) {
        let Some(ns) = self.vhosts.get_mut(vhost) else {
            return;
        };
        let Some(exchange) = ns.exchanges.remove(name) else {
            return;
        };
        for key in exchange.bindings() {
            if let Destination::Queue(qid) = key.destination
                && let Some(queue) = self.queues.get_mut(&qid)
                && let Some(pos) =
                    queue
                        .bound_from
                        .iter()
                        .position(|(source, routing_key, args)| {
                            source == name
                                && *routing_key == key.routing_key
                                && *args == key.arguments
                        })
            {
                queue.bound_from.swap_remove(pos);
            }
        }
        effects.push(Effect::ExchangeDeleted {
            name: if **vhost == *DEFAULT_VHOST {
                name.clone()
            } else {
                resource_key(vhost, name).into()
            },
            durable: exchange.options.durable,
        });
        let destination = Destination::Exchange(name.clone());
        let Some(ns) = self.vhosts.get(vhost) else {
            return;
        };
        let mut sources: Vec<Arc<str>> = ns
            .exchanges
            .values()
            .filter(|source| {
                source
                    .bindings()
                    .iter()
                    .any(|key| key.destination == destination)
            })
            .map(|source| source.name.clone())
            .collect();
        sources.sort();
        for source in sources {
            let keys: Vec<BindingKey> = self.vhosts[vhost].exchanges[&source]
                .bindings()
                .into_iter()
                .filter(|key| key.destination == destination)
                .collect();
            for key in keys {
                self.remove_binding(vhost, &source, &key, effects);
            }
        }
    }

    /// Removes one binding; an auto-delete source left without bindings is deleted.
    pub(super) fn remove_binding(
        &mut self,
        vhost: &Arc<str>,
        source: &Arc<str>,
        key: &BindingKey,
        effects: &mut Vec<Effect>,
    ) -> bool {
        let Some(exchange) = self
            .vhosts
            .get_mut(vhost)
            .and_then(|ns| ns.exchanges.get_mut(source))
        else {
            return false;
        };
        if !exchange.remove_binding(key) {
            return false;
        }
        let now_unused =
            exchange.options.auto_delete && exchange.n_bindings() == 0 && !exchange.builtin;
        if let Destination::Queue(qid) = &key.destination
            && let Some(queue) = self.queues.get_mut(qid)
            && let Some(pos) = queue
                .bound_from
                .iter()
                .position(|(from, routing_key, args)| {
                    from == source && *routing_key == key.routing_key && *args == key.arguments
                })
        {
            queue.bound_from.swap_remove(pos);
        }
        if now_unused {
            let source = source.clone();
            self.remove_exchange(vhost, &source, effects);
        }
        true
    }

    pub(super) fn resolve_target(
        &self,
        vhost: &str,
        target: &BindTarget,
    ) -> Result<Destination, CoreError> {
        let ns = self.ns(vhost)?;
        match target {
            BindTarget::Queue(name) => ns
                .queue_names
                .get(name.as_str())
                .map(|qid| Destination::Queue(*qid))
                .ok_or_else(|| CoreError::not_found(EntityKind::Queue, name.clone())),
            BindTarget::Exchange(name) => ns
                .exchanges
                .get_key_value(name.as_str())
                .map(|(key, _)| Destination::Exchange(key.clone()))
                .ok_or_else(|| CoreError::not_found(EntityKind::Exchange, name.clone())),
        }
    }

    pub(super) fn binding_source(&self, vhost: &str, source: &str) -> Result<Arc<str>, CoreError> {
        if source == DEFAULT_EXCHANGE {
            return Err(CoreError::AccessRefused {
                reason: "the default exchange binds every queue by name implicitly; it takes no explicit bindings".to_owned(),
            });
        }
        self.ns(vhost)?
            .exchanges
            .get_key_value(source)
            .map(|(key, _)| key.clone())
            .ok_or_else(|| CoreError::not_found(EntityKind::Exchange, source))
    }

    pub(super) fn bind(
        &mut self,
        vhost: &str,
        source: &str,
        target: BindTarget,
        routing_key: String,
        arguments: Headers,
        effects: &mut Vec<Effect>,
    ) -> Result<Reply, CoreError> {
        let _ = effects;
        validate_routing_key(&routing_key)?;
        check_header_depth(&arguments)?;
        let source = self.binding_source(vhost, source)?;
        let destination = self.resolve_target(vhost, &target)?;
        if let Destination::Exchange(dest) = &destination
            && *dest == DEFAULT_EXCHANGE.into()
        {
            return Err(CoreError::AccessRefused {
                reason: "the default exchange cannot be a binding destination".to_owned(),
            });
        }
        let exchange = &self.ns(vhost)?.exchanges[&source];
        if exchange.kind == ExchangeKind::Headers {
            HeadersMatch::parse(&arguments)?;
        }
        let key = BindingKey {
            destination: destination.clone(),
            routing_key: routing_key.into(),
            arguments,
        };
        if exchange.has_binding(&key) {
            return Ok(Reply::Done);
        }
        if exchange.n_bindings() >= self.limits.bindings_per_exchange_max {
            return Err(CoreError::LimitExceeded {
                what: "bindings per exchange",
                limit: self.limits.bindings_per_exchange_max,
            });
        }
        if let Destination::Queue(qid) = &destination {
            let queue = self.queues.get_mut(qid).expect("resolved above");
            queue.bound_from.push((
                source.clone(),
                key.routing_key.clone(),
                key.arguments.clone(),
            ));
        }
        self.ns_mut(vhost)?
            .exchanges
            .get_mut(&source)
            .expect("resolved above")
            .add_binding(key)?;
        Ok(Reply::Done)
    }

    pub(super) fn unbind(
        &mut self,
        vhost: &str,
        source: &str,
        target: BindTarget,
        routing_key: String,
        arguments: Headers,
        effects: &mut Vec<Effect>,
    ) -> Result<Reply, CoreError> {
        let vhost = self.vhost_name(vhost)?;
        let source = self.binding_source(&vhost, source)?;
        let destination = self.resolve_target(&vhost, &target)?;
        let key = BindingKey {
            destination,
            routing_key: routing_key.into(),
            arguments,
        };
        if !self.vhosts[&vhost].exchanges[&source].has_binding(&key) {
            return Err(CoreError::not_found(
                EntityKind::Exchange,
                format!("binding {source} -> {target:?} '{}'", key.routing_key),
            ));
        }
        self.remove_binding(&vhost, &source, &key, effects);
        Ok(Reply::Done)
    }

    pub(super) fn declare_queue(
        &mut self,
        vhost: &str,
        connection: ConnectionId,
        name: String,
        options: QueueOptions,
        passive: bool,
        declarer: Option<Declarer>,
    ) -> Result<Reply, CoreError> {
        self.connection(connection)?;
        if passive {
            let qid = self.queue_for(vhost, connection, &name)?;
            return Ok(self.declared(qid));
        }
        let generated = name.is_empty();
        if !generated {
            validate_user_name(&name)?;
        }
        check_header_depth(&options.arguments)?;
        let features = QueueFeatures::try_from(&options.arguments)?;
        let vhost = self.vhost_name(vhost)?;
        let ns = self.ns(&vhost)?;
        if let Some(&qid) = ns.queue_names.get(name.as_str()) {
            let queue = &self.queues[&qid];
            check_exclusive_access(queue, connection)?;
            if queue.options != options {
                return Err(CoreError::precondition(
                    EntityKind::Queue,
                    &name,
                    format!(
                        "declared with {:?}, redeclared with {:?}",
                        queue.options, options
                    ),
                ));
            }
            return Ok(self.declared(qid));
        }
        if let Some(max) = ns.limits.max_queues
            && ns.queue_names.len() >= max as usize
        {
            return Err(CoreError::LimitExceeded {
                what: "queues in the virtual host",
                limit: max as usize,
            });
        }
        if let Some(Declarer {
            name: declarer,
            max_queues: Some(max),
        }) = &declarer
            && self.queues_by_declarer.get(declarer).copied().unwrap_or(0) >= *max
        {
            return Err(CoreError::LimitExceeded {
                what: "queues declared by the user",
                limit: *max as usize,
            });
        }
        if self.queues.len() >= self.limits.queues_max {
            return Err(CoreError::LimitExceeded {
                what: "queues",
                limit: self.limits.queues_max,
            });
        }
        let name: Arc<str> = if generated {
            let (candidate, next) = self.generated_queue_name(&vhost);
            self.next_generated_name = next;
            candidate.into()
        } else {
            name.into()
        };
        let qid = QueueId(self.next_queue_id);
        self.next_queue_id += 1;
        let owner = options.exclusive.then_some(connection);
        if owner.is_some() {
            self.connections
                .get_mut(&connection)
                .expect("checked")
                .exclusive_queues
                .push(qid);
        }
        if features.overflow.rejects() {
            self.n_reject_publish_queues += 1;
        }
        if let Some(expires) = features.expires {
            self.timers.push(
                self.now_ms.saturating_add(expires),
                TimerKind::QueueExpiry { queue: qid },
            );
        }
        // Every kind of durable queue pages (priority and length-limited ones too), so memory
        // and checkpoints stay bounded whatever the backlog, and transient ones too when the
        // server says so (`Limits::page_transient`); exclusive queues die with their
        // connection and stay in memory.
        let pageable = self.limits.paging_threshold > 0
            && (options.durable || self.limits.page_transient)
            && !options.exclusive;
        let mut queue = Queue::new(vhost.clone(), name.clone(), options, features, owner);
        if let Some(declarer) = declarer {
            *self
                .queues_by_declarer
                .entry(declarer.name.clone())
                .or_default() += 1;
            queue.declared_by = Some(declarer.name);
        }
        queue.last_used_ms = self.now_ms;
        if pageable {
            queue.paged.threshold = Some(self.limits.paging_threshold);
            queue.paged.threshold_bytes = match self.limits.paging_threshold_bytes {
                0 => u64::MAX,
                bytes => bytes,
            };
        }
        self.queues.insert(qid, queue);
        self.ns_mut(&vhost)?.queue_names.insert(name.clone(), qid);
        Ok(Reply::QueueDeclared {
            name,
            ready: 0,
            consumers: 0,
        })
    }

    /// The reply to a declare of an existing queue, which counts as a use (`x-expires`).
    pub(super) fn declared(&mut self, qid: QueueId) -> Reply {
        let queue = self.queues.get_mut(&qid).expect("caller found it");
        queue.last_used_ms = self.now_ms;
        Reply::QueueDeclared {
            name: queue.name.clone(),
            ready: queue.ready_total(),
            consumers: queue.consumers.len() as u32,
        }
    }

    /// Looks a queue up for `connection`, refusing exclusive queues of other connections.
    pub(super) fn queue_for(
        &self,
        vhost: &str,
        connection: ConnectionId,
        name: &str,
    ) -> Result<QueueId, CoreError> {
        let qid = *self
            .ns(vhost)?
            .queue_names
            .get(name)
            .ok_or_else(|| CoreError::not_found(EntityKind::Queue, name))?;
        check_exclusive_access(&self.queues[&qid], connection)?;
        Ok(qid)
    }

    pub(super) fn delete_queue_cmd(
        &mut self,
        vhost: &str,
        connection: ConnectionId,
        name: &str,
        if_unused: bool,
        if_empty: bool,
        effects: &mut Vec<Effect>,
    ) -> Result<Reply, CoreError> {
        let qid = self.queue_for(vhost, connection, name)?;
        let queue = &self.queues[&qid];
        if if_unused && !queue.consumers.is_empty() {
            return Err(CoreError::precondition(
                EntityKind::Queue,
                name,
                format!("it has {} consumers", queue.consumers.len()),
            ));
        }
        if if_empty && queue.ready_total() > 0 {
            return Err(CoreError::precondition(
                EntityKind::Queue,
                name,
                format!("it has {} ready messages", queue.ready_total()),
            ));
        }
        let messages = self.remove_queue(qid, effects);
        Ok(Reply::QueueDeleted { messages })
    }

    /// Deletes a queue: bindings removed, consumers cancelled (told so), ready messages
    /// dropped. Deliveries outstanding from it stay with their connections; settling them
    /// later is accepted and does nothing. Returns the ready messages dropped.
    pub(super) fn remove_queue(&mut self, qid: QueueId, effects: &mut Vec<Effect>) -> u64 {
        let mut queue = self
            .queues
            .remove(&qid)
            .expect("caller checked the queue exists");
        // Its logged messages go with the queue's `QueueDeleted`: no settlement per message.
        let paged = queue.paged.count;
        if paged > 0 {
            effects.push(Effect::PagesDropped {
                queue: queue.key.clone(),
                epoch: queue.paged.epoch,
            });
            queue.paged.discard();
        }
        if queue.features.overflow.rejects() {
            self.n_reject_publish_queues -= 1;
        }
        if let Some(ns) = self.vhosts.get_mut(&queue.vhost) {
            ns.queue_names.remove(&queue.name);
        }
        if let Some(declarer) = &queue.declared_by {
            let count = self
                .queues_by_declarer
                .get_mut(declarer)
                .expect("a declared queue is counted");
            *count -= 1;
            if *count == 0 {
                self.queues_by_declarer.remove(declarer);
            }
        }
        self.ready_bytes_total -= queue.ready.bytes();
        if queue.stats.delayed > 0 {
            // Its delayed messages go with it (rare: a scan of the timers).
            self.delayed_total -= self.timers.remove_delayed_of(qid);
        }
        if let Some(owner) = queue.owner
            && let Some(conn) = self.connections.get_mut(&owner)
        {
            conn.exclusive_queues.retain(|id| *id != qid);
        }
        for consumer in &queue.consumers {
            if let Some(conn) = self.connections.get_mut(&consumer.connection) {
                conn.consumers.remove(&consumer.tag);
            }
            effects.push(Effect::ConsumerCancelled {
                connection: consumer.connection,
                consumer_tag: consumer.tag,
                reason: CancelReason::QueueDeleted,
            });
        }
        let mut bound_from = queue.bound_from.clone();
        bound_from.sort_by(|left, right| (&left.0, &left.1).cmp(&(&right.0, &right.1)));
        for (source, routing_key, arguments) in bound_from {
            let key = BindingKey {
                destination: Destination::Queue(qid),
                routing_key,
                arguments,
            };
            self.remove_binding(&queue.vhost, &source, &key, effects);
        }
        effects.push(Effect::QueueDeleted {
            name: queue.key.clone(),
            durable: queue.is_durable(),
        });
        queue.ready.len() as u64 + paged
    }
}
