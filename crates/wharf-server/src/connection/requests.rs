//! Requests (declare, bind, subscribe, stats, listings, ...) as core commands, and their
//! responses.

use super::*;

/// A client may not create queues or exchanges named `amq.*` (docs/protocol.md, as RabbitMQ
/// refuses them); a passive declare only looks, so it may name one. Checked here rather than in
/// the core, whose replay must still accept such names logged before this check existed.
fn refuse_amq_prefix(name: &str, passive: bool) -> Result<(), CoreError> {
    if !passive && name.starts_with(wharf_core::AMQ_PREFIX) {
        return Err(CoreError::ReservedName {
            name: name.to_owned(),
            prefix: wharf_core::AMQ_PREFIX,
        });
    }
    Ok(())
}

/// Checks the rights a binding needs, as RabbitMQ's table: write on its destination, read on
/// its source exchange, and the binding key against topic permissions on a topic source.
fn may_bind(
    state: &State,
    access: &mut Access,
    binding: &wharf_protocol::Binding,
) -> Result<(), CoreError> {
    match &binding.destination {
        wharf_protocol::Destination::Queue(queue) => {
            access.check(Resource::Queue, Right::Write, queue)?
        }
        wharf_protocol::Destination::Exchange(exchange) => {
            access.check(Resource::Exchange, Right::Write, exchange)?
        }
    }
    access.check(Resource::Exchange, Right::Read, &binding.source)?;
    check_topic(
        state,
        access,
        &binding.source,
        Right::Read,
        &binding.routing_key,
    )
}

/// Checks what declaring a queue needs: configure on it (on the name the server will give it,
/// if it has none), and with a dead-letter exchange, write on that exchange and read on the
/// queue, as RabbitMQ's table.
fn may_declare_queue(
    state: &State,
    access: &mut Access,
    name: &str,
    arguments: &wharf_core::Headers,
) -> Result<(), CoreError> {
    let generated;
    let name = if name.is_empty() {
        generated = state.broker.next_generated_queue_name(access.vhost());
        generated.as_str()
    } else {
        name
    };
    access.check(Resource::Queue, Right::Configure, name)?;
    if let Some(wharf_core::HeaderValue::Str(exchange)) =
        arguments.get(wharf_core::ARG_DEAD_LETTER_EXCHANGE)
    {
        access.check(Resource::Exchange, Right::Write, exchange)?;
        access.check(Resource::Queue, Right::Read, name)?;
    }
    Ok(())
}

/// Applies a request, once the connection's user is found to have the rights it needs
/// (docs/security.md has the table). A passive declare, statistics and listings need only
/// access to the virtual host, as a passive declare in RabbitMQ.
pub(super) fn handle_request(
    state: &mut State,
    access: &mut Access,
    connection: ConnectionId,
    now: u64,
    request: Request,
) -> Response {
    let vhost = access.vhost().clone();
    let result: Result<Response, CoreError> = (|| match request {
        Request::DeclareQueue {
            name,
            durable,
            exclusive,
            auto_delete,
            passive,
            arguments,
        } => {
            refuse_amq_prefix(&name, passive)?;
            let mut arguments = table_to_headers(&arguments);
            if !passive {
                may_declare_queue(state, access, &name, &arguments)?;
            }
            let single_active_consumer = QueueOptions::take_single_active_consumer(&mut arguments)?;
            let options = QueueOptions {
                durable,
                exclusive,
                auto_delete,
                single_active_consumer,
                arguments,
            };
            // Every queue remembers the user who declared it, so that a limit set later counts
            // the queues it already has.
            let declarer = Declarer {
                name: access.user_arc().clone(),
                max_queues: access.user_limits().max_queues,
            };
            match state.apply(
                now,
                Command::DeclareQueue {
                    vhost: vhost.clone(),
                    connection,
                    name,
                    options,
                    passive,
                    declarer: Some(declarer),
                },
            )? {
                Reply::QueueDeclared {
                    name,
                    ready,
                    consumers,
                } => Ok(Response::QueueDeclared {
                    name: name.to_string(),
                    ready,
                    consumers,
                }),
                other => unreachable!("declare queue replied {other:?}"),
            }
        }
        Request::DeleteQueue {
            name,
            if_unused,
            if_empty,
        } => {
            access.check(Resource::Queue, Right::Configure, &name)?;
            match state.apply(
                now,
                Command::DeleteQueue {
                    vhost: vhost.clone(),
                    connection,
                    name,
                    if_unused,
                    if_empty,
                },
            )? {
                Reply::QueueDeleted { messages } => Ok(Response::Deleted { messages }),
                other => unreachable!("delete queue replied {other:?}"),
            }
        }
        Request::PurgeQueue { name } => {
            access.check(Resource::Queue, Right::Read, &name)?;
            match state.apply(
                now,
                Command::PurgeQueue {
                    vhost: vhost.clone(),
                    connection,
                    name,
                },
            )? {
                Reply::Purged { messages } => Ok(Response::Purged { messages }),
                other => unreachable!("purge replied {other:?}"),
            }
        }
        Request::DeclareExchange {
            name,
            kind,
            durable,
            auto_delete,
            internal,
            passive,
            arguments,
        } => {
            refuse_amq_prefix(&name, passive)?;
            if !passive {
                access.check(Resource::Exchange, Right::Configure, &name)?;
            }
            let options = ExchangeOptions {
                durable,
                auto_delete,
                internal,
                arguments: table_to_headers(&arguments),
            };
            state.apply(
                now,
                Command::DeclareExchange {
                    vhost: vhost.clone(),
                    name,
                    kind: core_kind(kind),
                    options,
                    passive,
                },
            )?;
            Ok(Response::Done)
        }
        Request::DeleteExchange { name, if_unused } => {
            access.check(Resource::Exchange, Right::Configure, &name)?;
            state.apply(
                now,
                Command::DeleteExchange {
                    vhost: vhost.clone(),
                    name,
                    if_unused,
                },
            )?;
            Ok(Response::Done)
        }
        Request::Bind(binding) => {
            may_bind(state, access, &binding)?;
            state.apply(
                now,
                Command::Bind {
                    vhost: vhost.clone(),
                    source: binding.source,
                    target: bind_target(binding.destination),
                    routing_key: binding.routing_key,
                    arguments: table_to_headers(&binding.arguments),
                },
            )?;
            Ok(Response::Done)
        }
        Request::Unbind(binding) => {
            may_bind(state, access, &binding)?;
            state.apply(
                now,
                Command::Unbind {
                    vhost: vhost.clone(),
                    source: binding.source,
                    target: bind_target(binding.destination),
                    routing_key: binding.routing_key,
                    arguments: table_to_headers(&binding.arguments),
                },
            )?;
            Ok(Response::Done)
        }
        Request::Subscribe {
            queue,
            consumer_tag,
            prefetch,
            auto_ack,
            exclusive,
            priority,
            initial_credit,
            arguments,
        } => {
            access.check(Resource::Queue, Right::Read, &queue)?;
            let ack_timeout_ms =
                ConsumerOptions::ack_timeout_of(&table_to_headers(&arguments), auto_ack)?;
            let options = ConsumerOptions {
                prefetch,
                initial_credit,
                auto_ack,
                exclusive,
                priority,
                ack_timeout_ms,
            };
            state.apply(
                now,
                Command::Subscribe {
                    vhost: vhost.clone(),
                    connection,
                    queue,
                    consumer_tag: ConsumerTag(consumer_tag),
                    options,
                },
            )?;
            Ok(Response::Subscribed { consumer_tag })
        }
        Request::Cancel { consumer_tag } => {
            state.apply(
                now,
                Command::Cancel {
                    connection,
                    consumer_tag: ConsumerTag(consumer_tag),
                },
            )?;
            Ok(Response::Done)
        }
        Request::QueueStats { name } => Ok(Response::Stats(queue_info(
            state.broker.queue_stats(&vhost, &name)?,
        ))),
        Request::QueueStatsV2 { name } => Ok(Response::StatsV2(queue_info_v2(
            state.broker.queue_stats(&vhost, &name)?,
        ))),
        Request::ListQueuesV2 => Ok(Response::QueuesV2(
            state
                .broker
                .list_queues(&vhost)
                .into_iter()
                .map(queue_info_v2)
                .collect(),
        )),
        Request::Redrive { queue, max } => {
            // Takes messages from the queue (read; an operator's act on it: configure) and puts
            // each into the queue its `x-death` header names, which a publisher may have
            // written: only into the queues the user may write to (the rest stay).
            access.check(Resource::Queue, Right::Read, &queue)?;
            access.check(Resource::Queue, Right::Configure, &queue)?;
            let into = state
                .broker
                .list_queues(&vhost)
                .into_iter()
                .map(|info| info.name)
                .filter(|name| access.check(Resource::Queue, Right::Write, name).is_ok())
                .collect();
            match state.apply(
                now,
                Command::Redrive {
                    vhost: vhost.clone(),
                    connection,
                    queue,
                    max,
                    into: Some(into),
                },
            )? {
                Reply::Redriven { moved } => Ok(Response::Redriven { moved }),
                other => unreachable!("redrive replied {other:?}"),
            }
        }
        Request::ListQueues => Ok(Response::Queues(
            state
                .broker
                .list_queues(&vhost)
                .into_iter()
                .map(queue_info)
                .collect(),
        )),
        Request::ListExchanges => Ok(Response::Exchanges(
            state
                .broker
                .list_exchanges(&vhost)
                .into_iter()
                .map(|info| ExchangeInfo {
                    name: info.name,
                    kind: wire_kind(info.kind),
                    durable: info.options.durable,
                })
                .collect(),
        )),
        other => unreachable!("administration requests go to admin.rs: {other:?}"),
    })();
    result.unwrap_or_else(|err| Response::Error {
        code: error_code(&err),
        message: err.to_string(),
    })
}
