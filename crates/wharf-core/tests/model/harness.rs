//! The harness: renders ops, applies them to the broker and the model, and compares them.

use super::*;

// ----- the harness: renders ops, applies them to broker and model -----

pub(crate) struct Harness {
    pub(crate) broker: Broker,
    pub(crate) model: Model,
    pub(crate) universe: Universe,
    pub(crate) now_ms: u64,
    /// The connection id each slot currently uses; a closed slot moves to a fresh id (the server
    /// never reuses connection ids), which is opened by a later `Open`.
    pub(crate) slots: [ConnectionId; N_CONNECTIONS],
    pub(crate) next_connection_id: u64,
    pub(crate) next_message_id: u64,
    pub(crate) log: Vec<String>,
    /// How often each interesting situation occurred, to show generation reaches them.
    pub(crate) coverage: BTreeMap<String, u64>,
}

impl Harness {
    pub(crate) fn new(universe: Universe) -> Self {
        let mut harness = Harness {
            broker: Broker::new(universe.limits.clone()),
            model: Model::new(universe.limits.clone()),
            universe,
            now_ms: 0,
            slots: [ConnectionId(1), ConnectionId(2), ConnectionId(3)],
            next_connection_id: 4,
            next_message_id: 1,
            log: Vec::new(),
            coverage: BTreeMap::new(),
        };
        for slot in 0..N_CONNECTIONS {
            harness
                .step(&Op::Open { conn: slot })
                .expect("opening a connection is always accepted");
        }
        harness
    }

    /// A harness with the case's setup applied (checked like any other step).
    pub(crate) fn with_setup(universe: Universe) -> Result<Self, String> {
        let mut harness = Harness::new(universe);
        for op in harness.universe.setup.clone() {
            harness.step(&op)?;
        }
        Ok(harness)
    }

    pub(crate) fn exchange_declaration(
        &self,
        idx: usize,
        variant: Variant,
    ) -> (String, ExchangeKind, ExchangeOptions) {
        let name = EXCHANGE_NAMES[idx];
        let (kind, mut options) = match self.universe.exchanges.get(idx) {
            Some(profile) => (profile.kind, profile.options.clone()),
            None if name == BUILTIN_TOPIC => (
                ExchangeKind::Topic,
                ExchangeOptions {
                    durable: true,
                    ..ExchangeOptions::default()
                },
            ),
            None => (
                ExchangeKind::Direct,
                ExchangeOptions {
                    durable: true,
                    ..ExchangeOptions::default()
                },
            ),
        };
        let kind = match variant {
            Variant::OtherKind => match kind {
                ExchangeKind::Direct => ExchangeKind::Topic,
                ExchangeKind::Topic => ExchangeKind::Fanout,
                ExchangeKind::Fanout => ExchangeKind::Headers,
                ExchangeKind::Headers => ExchangeKind::Direct,
            },
            _ => kind,
        };
        if variant == Variant::DurabilityFlipped {
            options.durable = !options.durable;
        }
        (name.to_owned(), kind, options)
    }

    pub(crate) fn bind_target(target: &Target) -> BindTarget {
        match target {
            Target::Queue(idx) => BindTarget::Queue(QUEUE_NAMES[*idx].to_owned()),
            Target::Exchange(idx) => BindTarget::Exchange(EXCHANGE_NAMES[*idx].to_owned()),
        }
    }

    /// The connection and tag of the consumer a cancel or credit names.
    pub(crate) fn consumer(&self, pick: &ConsumerPick) -> (ConnectionId, ConsumerTag) {
        match pick {
            ConsumerPick::Named { conn, tag } => (self.slots[*conn], ConsumerTag(*tag)),
            ConsumerPick::Attached(index) => {
                let all: Vec<(ConnectionId, ConsumerTag)> = self
                    .model
                    .connections
                    .iter()
                    .flat_map(|(id, conn)| conn.consumers.keys().map(|tag| (*id, *tag)))
                    .collect();
                if all.is_empty() {
                    (self.slots[0], ConsumerTag(1))
                } else {
                    all[index.index(all.len())]
                }
            }
        }
    }

    /// The connection and delivery tag an ack, nack or reject names.
    pub(crate) fn delivery_tag(&self, conn: usize, pick: &TagPick) -> (ConnectionId, DeliveryTag) {
        let connection = self.slots[conn];
        let never_given = DeliveryTag(
            self.model
                .connections
                .get(&connection)
                .map_or(1, |conn| conn.last_delivery_tag + 1),
        );
        if let TagPick::Lapsed(index) = pick {
            let all: Vec<(ConnectionId, DeliveryTag)> = self
                .model
                .connections
                .iter()
                .flat_map(|(id, conn)| conn.lapsed.iter().map(|tag| (*id, DeliveryTag(*tag))))
                .collect();
            if !all.is_empty() {
                return all[index.index(all.len())];
            }
        }
        if let TagPick::Newest = pick {
            // Tags are per connection: the latest delivery is the one the model learnt last.
            let newest = self
                .model
                .connections
                .iter()
                .flat_map(|(id, conn)| {
                    conn.unacked
                        .iter()
                        .map(|(tag, out)| (out.serial, *id, *tag))
                })
                .max();
            if let Some((_, connection, tag)) = newest {
                return (connection, DeliveryTag(tag));
            }
        }
        match pick {
            TagPick::Zero | TagPick::Newest => (connection, DeliveryTag(0)),
            TagPick::Unknown => (connection, never_given),
            TagPick::Outstanding(index) | TagPick::Lapsed(index) => {
                let all: Vec<(ConnectionId, DeliveryTag)> = self
                    .model
                    .connections
                    .iter()
                    .flat_map(|(id, conn)| conn.unacked.keys().map(|tag| (*id, DeliveryTag(*tag))))
                    .collect();
                if all.is_empty() {
                    (connection, never_given)
                } else {
                    all[index.index(all.len())]
                }
            }
        }
    }

    pub(crate) fn command(&mut self, op: &Op) -> Command {
        let slot = |conn: &usize| self.slots[*conn];
        match op {
            Op::Open { conn } => Command::OpenConnection {
                vhost: wharf_core::DEFAULT_VHOST.into(),
                connection: slot(conn),
            },
            Op::Close { conn, .. } => Command::CloseConnection {
                connection: slot(conn),
            },
            Op::DeclareExchange {
                exchange,
                variant,
                passive,
            } => {
                let (name, kind, options) = self.exchange_declaration(*exchange, *variant);
                Command::DeclareExchange {
                    vhost: wharf_core::DEFAULT_VHOST.into(),
                    name,
                    kind,
                    options,
                    passive: *passive,
                }
            }
            Op::DeleteExchange {
                exchange,
                if_unused,
            } => Command::DeleteExchange {
                vhost: wharf_core::DEFAULT_VHOST.into(),
                name: EXCHANGE_NAMES[*exchange].to_owned(),
                if_unused: *if_unused,
            },
            Op::DeclareQueue {
                conn,
                queue,
                variant,
                passive,
            } => {
                let mut options = self
                    .universe
                    .queues
                    .get(*queue)
                    .cloned()
                    .unwrap_or_default();
                match variant {
                    Variant::AsProfiled => {}
                    Variant::DurabilityFlipped => options.durable = !options.durable,
                    Variant::OtherKind => {
                        options.single_active_consumer = !options.single_active_consumer
                    }
                }
                Command::DeclareQueue {
                    vhost: wharf_core::DEFAULT_VHOST.into(),
                    connection: slot(conn),
                    name: QUEUE_NAMES[*queue].to_owned(),
                    options,
                    passive: *passive,
                    declarer: None,
                }
            }
            Op::DeleteQueue {
                conn,
                queue,
                if_unused,
                if_empty,
            } => Command::DeleteQueue {
                vhost: wharf_core::DEFAULT_VHOST.into(),
                connection: slot(conn),
                name: QUEUE_NAMES[*queue].to_owned(),
                if_unused: *if_unused,
                if_empty: *if_empty,
            },
            Op::Purge { conn, queue } => Command::PurgeQueue {
                vhost: wharf_core::DEFAULT_VHOST.into(),
                connection: slot(conn),
                name: QUEUE_NAMES[*queue].to_owned(),
            },
            Op::Bind {
                source,
                target,
                key,
                arguments,
            } => Command::Bind {
                vhost: wharf_core::DEFAULT_VHOST.into(),
                source: EXCHANGE_NAMES[*source].to_owned(),
                target: Self::bind_target(target),
                routing_key: BINDING_KEYS[*key].to_owned(),
                arguments: binding_arguments(*arguments),
            },
            Op::UnbindExisting { binding } => {
                let all: Vec<(String, BindTarget, String, Headers)> =
                    self.model.bindings().collect();
                let (source, target, routing_key, arguments) = if all.is_empty() {
                    (
                        "x0".to_owned(),
                        BindTarget::Queue("q0".to_owned()),
                        String::new(),
                        Headers::new(),
                    )
                } else {
                    all[binding.index(all.len())].clone()
                };
                Command::Unbind {
                    vhost: wharf_core::DEFAULT_VHOST.into(),
                    source,
                    target,
                    routing_key,
                    arguments,
                }
            }
            Op::Unbind {
                source,
                target,
                key,
                arguments,
            } => Command::Unbind {
                vhost: wharf_core::DEFAULT_VHOST.into(),
                source: EXCHANGE_NAMES[*source].to_owned(),
                target: Self::bind_target(target),
                routing_key: BINDING_KEYS[*key].to_owned(),
                arguments: binding_arguments(*arguments),
            },
            Op::Publish {
                exchange,
                key,
                headers,
                padding,
                timing,
            } => {
                let message_id = self.next_message_id;
                self.next_message_id += 1;
                let body = format!("m{message_id}{}", "_".repeat(*padding * 3));
                let message = Message {
                    exchange: EXCHANGE_NAMES[*exchange].into(),
                    headers: message_headers(*headers),
                    persistent: padding % 2 == 0,
                    priority: (message_id % 4) as u8,
                    delay_ms: timing.delay_ms,
                    expiration_ms: timing.expiration_ms,
                    message_id: timing.message_id.map(|idx| MESSAGE_IDS[idx].to_owned()),
                    ..Message::new(PUBLISH_KEYS[*key], body)
                };
                Command::Publish {
                    vhost: wharf_core::DEFAULT_VHOST.into(),
                    message: Arc::new(message),
                }
            }
            Op::Subscribe {
                conn,
                queue,
                tag,
                prefetch,
                auto_ack,
                exclusive,
                priority,
                ack_timeout_ms,
                initial_credit,
            } => Command::Subscribe {
                vhost: wharf_core::DEFAULT_VHOST.into(),
                connection: slot(conn),
                queue: QUEUE_NAMES[*queue].to_owned(),
                consumer_tag: ConsumerTag(*tag),
                options: ConsumerOptions {
                    prefetch: *prefetch,
                    initial_credit: *initial_credit,
                    auto_ack: *auto_ack,
                    exclusive: *exclusive,
                    priority: *priority,
                    ack_timeout_ms: *ack_timeout_ms,
                },
            },
            Op::Cancel { consumer } => {
                let (connection, consumer_tag) = self.consumer(consumer);
                Command::Cancel {
                    connection,
                    consumer_tag,
                }
            }
            Op::Credit { consumer, credit } => {
                let (connection, consumer_tag) = self.consumer(consumer);
                Command::Credit {
                    connection,
                    consumer_tag,
                    credit: *credit,
                }
            }
            Op::Ack {
                conn,
                pick,
                multiple,
            } => {
                let (connection, delivery_tag) = self.delivery_tag(*conn, pick);
                Command::Ack {
                    connection,
                    delivery_tag,
                    multiple: *multiple,
                }
            }
            Op::Nack {
                conn,
                pick,
                multiple,
                requeue,
            } => {
                let (connection, delivery_tag) = self.delivery_tag(*conn, pick);
                Command::Nack {
                    connection,
                    delivery_tag,
                    multiple: *multiple,
                    requeue: *requeue,
                }
            }
            Op::Reject {
                conn,
                pick,
                requeue,
            } => {
                let (connection, delivery_tag) = self.delivery_tag(*conn, pick);
                Command::Reject {
                    connection,
                    delivery_tag,
                    requeue: *requeue,
                }
            }
            Op::AckRange {
                conn,
                pick,
                span,
                reversed,
            } => {
                let (connection, DeliveryTag(tag)) = self.delivery_tag(*conn, pick);
                let (first, last) = if *reversed {
                    (tag + span, tag)
                } else {
                    (tag, tag + span)
                };
                Command::AckRange {
                    connection,
                    first: DeliveryTag(first),
                    last: DeliveryTag(last),
                }
            }
            Op::Defer {
                conn,
                pick,
                delay_ms,
            } => {
                let (connection, delivery_tag) = self.delivery_tag(*conn, pick);
                Command::Defer {
                    connection,
                    delivery_tag,
                    delay_ms: *delay_ms,
                }
            }
            Op::Touch { conn, pick } => {
                let (connection, delivery_tag) = self.delivery_tag(*conn, pick);
                Command::Touch {
                    connection,
                    delivery_tag,
                }
            }
            Op::Redrive {
                conn,
                queue,
                dead_letters,
                max,
            } => {
                let holding: Vec<&ModelQueue> = self
                    .model
                    .queues
                    .values()
                    .filter(|queue| {
                        queue.ready.iter().any(|copy| {
                            death_origin(&copy.message, &queue.name).is_some_and(
                                |(origin, _, _)| self.model.queues.contains_key(&origin),
                            )
                        })
                    })
                    .collect();
                let (connection, queue) = match dead_letters {
                    Some(index) if !holding.is_empty() => {
                        let queue = holding[index.index(holding.len())];
                        (queue.owner.unwrap_or(slot(conn)), queue.name.clone())
                    }
                    _ => (slot(conn), QUEUE_NAMES[*queue].to_owned()),
                };
                Command::Redrive {
                    vhost: wharf_core::DEFAULT_VHOST.into(),
                    connection,
                    queue,
                    max: *max,
                    into: None,
                }
            }
            Op::Advance { .. } | Op::ToDeadline { .. } => Command::Tick,
            Op::PublishMany { .. } | Op::AckAllButOldest | Op::KeepFailing { .. } => {
                unreachable!("expanded into several commands by Harness::step")
            }
        }
    }

    /// Everything observable, to show a failed command changed nothing.
    pub(crate) fn snapshot(&self) -> String {
        let unacked: Vec<usize> = self
            .model
            .connections
            .keys()
            .map(|id| self.broker.unacked_count(*id))
            .collect();
        format!(
            "{:?}\n{:?}\n{:?}\n{unacked:?}\n{:?}",
            self.broker.list_queues(wharf_core::DEFAULT_VHOST),
            self.broker.list_exchanges(wharf_core::DEFAULT_VHOST),
            self.broker.list_bindings(wharf_core::DEFAULT_VHOST),
            (
                self.broker.delayed_total(),
                self.broker.durable_messages().len()
            )
        )
    }

    pub(crate) fn record_coverage(
        &mut self,
        command: &Command,
        outcome: &Result<Reply, CoreError>,
        effects: &[Effect],
        before: &Model,
    ) {
        let mut hit = |what: String| *self.coverage.entry(what).or_default() += 1;
        let name = format!("{command:?}")
            .split([' ', '{'])
            .next()
            .unwrap_or_default()
            .to_owned();
        match outcome {
            Ok(_) => hit(format!("ok {name}")),
            Err(err) => hit(format!("err {name} {:?}", ErrorClass::from(err))),
        }
        for effect in effects {
            match effect {
                Effect::Deliver(delivery) => {
                    hit("deliver".into());
                    if delivery.redelivered {
                        hit("redeliver".into());
                    }
                    let queue = &before.queues.get(&*delivery.queue);
                    if let Some(queue) = queue {
                        if queue.options.single_active_consumer && queue.consumers.len() > 1 {
                            hit("deliver single-active with standby".into());
                        }
                        let priorities: BTreeSet<i32> =
                            queue.consumers.iter().map(|c| c.options.priority).collect();
                        if priorities.len() > 1 {
                            hit("deliver with mixed priorities".into());
                        }
                        if queue
                            .ready
                            .first()
                            .is_some_and(|oldest| !Arc::ptr_eq(&oldest.message, &delivery.message))
                        {
                            hit("deliver a higher priority ahead of older messages".into());
                        }
                        let consumer = queue.consumers.iter().find(|c| {
                            c.connection == delivery.connection && c.tag == delivery.consumer_tag
                        });
                        if consumer.is_some_and(|c| {
                            c.options.auto_ack && c.options.initial_credit.is_some()
                        }) {
                            hit("deliver auto-ack with credit".into());
                        }
                        if consumer.is_some_and(|c| {
                            !c.options.auto_ack && c.options.initial_credit.is_some()
                        }) {
                            hit("deliver manual-ack in credit mode".into());
                        }
                    }
                }
                Effect::ConsumerCancelled { .. } => hit("consumer cancelled by broker".into()),
                Effect::DurableEnqueued { queues, .. } => {
                    hit("durable enqueue".into());
                    if queues.len() > 1 {
                        hit("durable enqueue to several queues".into());
                    }
                }
                Effect::DurableSettled { .. } => hit("durable settle".into()),
                Effect::DurableSettledRange { .. }
                | Effect::PageOut { .. }
                | Effect::PageIn { .. }
                | Effect::PagesDropped { .. } => {
                    unreachable!("the model's brokers never page")
                }
                Effect::QueueDeleted { .. } => {
                    if !matches!(command, Command::DeleteQueue { .. }) {
                        hit(format!("queue deleted implicitly by {name}"));
                    }
                }
                Effect::ExchangeDeleted { .. } => {
                    if !matches!(command, Command::DeleteExchange { .. }) {
                        hit(format!("exchange auto-deleted by {name}"));
                    }
                }
            }
        }
        if let (
            Command::Publish { vhost: _, message },
            Ok(Reply::Published {
                routed,
                refused_by,
                duplicates,
            }),
        ) = (command, outcome)
        {
            hit(format!("publish routed to {routed}"));
            if *duplicates > 0 {
                hit("publish dropped a duplicate".into());
            }
            if refused_by.is_some() {
                hit("publish refused by one full queue of several".into());
            }
            let dropped = |queues: &BTreeMap<String, ModelQueue>| -> u64 {
                queues.values().map(|queue| queue.dropped).sum()
            };
            if dropped(&self.model.queues) > dropped(&before.queues) {
                hit("drop-head over a length limit".into());
            }
            if !message.exchange.is_empty() {
                let exchange = &before.exchanges[&*message.exchange];
                if exchange
                    .bindings
                    .iter()
                    .any(|b| matches!(b.target, ModelTarget::Exchange(_)))
                    && *routed > 0
                {
                    hit("publish through exchange-to-exchange binding".into());
                }
                hit(format!(
                    "publish via {:?} routed {}",
                    exchange.kind,
                    *routed > 0
                ));
            }
        }
        if let (
            Command::Ack { connection, .. }
            | Command::Nack { connection, .. }
            | Command::Reject { connection, .. }
            | Command::AckRange { connection, .. },
            Ok(Reply::Settled { count }),
        ) = (command, outcome)
        {
            hit(format!("settled {}", (*count).min(2)));
            if let Some(conn) = before.connections.get(connection) {
                if conn.unacked.len() > 64 {
                    hit("settle with more than 64 outstanding".into());
                }
                if conn
                    .unacked
                    .values()
                    .any(|out| before.queue_by_id(out.queue_id).is_none())
                {
                    hit("settle with a delivery of a deleted queue outstanding".into());
                }
            }
        }
    }

    pub(crate) fn record_dead_letters(&mut self, before: &Model) {
        for (reason, count) in &self.model.dead_letter_counts {
            if before.dead_letter_counts.get(reason) != Some(count) {
                *self
                    .coverage
                    .entry(format!("dead letter {reason}"))
                    .or_default() += 1;
            }
        }
        for (event, count) in &self.model.events {
            if before.events.get(event) != Some(count) {
                *self.coverage.entry((*event).to_owned()).or_default() += 1;
            }
        }
    }

    pub(crate) fn step(&mut self, op: &Op) -> Result<(), String> {
        if let Op::AckAllButOldest = op {
            let busiest = self
                .model
                .connections
                .iter()
                .max_by_key(|(_, conn)| conn.unacked.len());
            let Some((connection, conn)) = busiest else {
                return Ok(());
            };
            let (connection, tags) = (
                *connection,
                conn.unacked.keys().skip(1).copied().collect::<Vec<u64>>(),
            );
            for tag in tags {
                // The model has checked the outcome (each of these acks must succeed).
                let _settled = self.apply_checked(Command::Ack {
                    connection,
                    delivery_tag: DeliveryTag(tag),
                    multiple: false,
                })?;
            }
            return Ok(());
        }
        if let Op::PublishMany {
            exchange,
            key,
            count,
            with_ids,
        } = op
        {
            for idx in 0..*count {
                let (exchange, key, headers, padding) =
                    (*exchange, *key, idx % N_MESSAGE_HEADERS, idx % 3);
                let timing = Timing {
                    message_id: with_ids.then_some(idx % MESSAGE_IDS.len()),
                    ..Timing::default()
                };
                self.step(&Op::Publish {
                    exchange,
                    key,
                    headers,
                    padding,
                    timing,
                })?;
            }
            return Ok(());
        }
        if let Op::Advance { ms, tick } = op {
            self.now_ms += ms;
            self.log.push(format!("(clock +{ms} ms)"));
            if *tick {
                // The model has checked the outcome (a tick always succeeds).
                let _done = self.apply_checked(Command::Tick)?;
            }
            return Ok(());
        }
        if let Op::KeepFailing { rounds } = op {
            for _ in 0..*rounds {
                let (connection, delivery_tag) = self.delivery_tag(0, &TagPick::Newest);
                if delivery_tag.0 == 0 {
                    break;
                }
                let _settled = self.apply_checked(Command::Nack {
                    connection,
                    delivery_tag,
                    multiple: false,
                    requeue: true,
                })?;
                if self
                    .model
                    .next_real_deadline()
                    .is_some_and(|deadline| deadline <= self.now_ms + 10)
                {
                    self.step(&Op::ToDeadline {
                        early: false,
                        tick: true,
                    })?;
                }
            }
            return Ok(());
        }
        if let Op::ToDeadline { early, tick } = op {
            let dedup_ends = self.model.queues.values().flat_map(|queue| {
                queue
                    .dedup
                    .values()
                    .copied()
                    .filter(|until| *until > self.now_ms)
            });
            let next = self
                .model
                .next_real_deadline()
                .into_iter()
                .chain(dedup_ends)
                .min();
            if let Some(moment) = next {
                let at = moment - u64::from(*early);
                // The next command takes the clock 1 ms further.
                self.now_ms = self.now_ms.max(at.saturating_sub(1));
                self.log.push(format!("(clock to {})", self.now_ms));
            }
            if *tick {
                let _done = self.apply_checked(Command::Tick)?;
            }
            return Ok(());
        }
        let command = self.command(op);
        let outcome = self.apply_checked(command)?;
        if let (true, Op::Close { conn, reopen }) = (outcome.is_ok(), op) {
            self.slots[*conn] = ConnectionId(self.next_connection_id);
            self.next_connection_id += 1;
            if *reopen {
                self.step(&Op::Open { conn: *conn })?;
            }
        }
        Ok(())
    }

    /// Applies one command to the broker and checks it against the model.
    pub(crate) fn apply_checked(
        &mut self,
        command: Command,
    ) -> Result<Result<Reply, CoreError>, String> {
        let before = self.snapshot();
        self.now_ms += 1;
        self.log.push(format!("@{} {command:?}", self.now_ms));
        let mut effects = Vec::new();
        let outcome = self
            .broker
            .apply(self.now_ms, command.clone(), &mut effects);
        let model_before = self.model.clone();
        self.model
            .observe(self.now_ms, &command, &outcome, &effects)?;
        self.record_coverage(&command, &outcome, &effects, &model_before);
        self.record_dead_letters(&model_before);
        if outcome.is_err() && self.snapshot() != before {
            return Err(format!(
                "failed command {outcome:?} changed the broker state"
            ));
        }
        self.model.check_broker(&self.broker)?;
        // The broker's own invariants, recounted from scratch whatever the state's size.
        self.broker
            .check_invariants()
            .map_err(|violation| format!("the broker broke an invariant: {violation}"))?;
        Ok(outcome)
    }
}

pub(crate) fn run_case(case: &Case) -> Result<(), String> {
    let mut harness = Harness::with_setup(case.universe.clone())?;
    let n_setup = harness.log.len();
    for (step, op) in case.ops.iter().enumerate() {
        if let Err(err) = harness.step(op) {
            let commands: Vec<String> = harness
                .log
                .iter()
                .enumerate()
                .map(|(idx, command)| format!("  {:>2}: {command}", idx as i64 - n_setup as i64))
                .collect();
            return Err(format!(
                "step {step} ({op:?}) disagrees with the model:\n{err}\ncommands applied (setup ones numbered negative):\n{}",
                commands.join("\n")
            ));
        }
    }
    Ok(())
}
