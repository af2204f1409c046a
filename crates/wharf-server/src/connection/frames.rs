//! The frames of one read, applied as one command batch (`batch.rs`): publishes, settles,
//! credit, requests; then the log commit and the confirms that wait for it.

use super::*;

/// Whether the connection's user may publish to the message's exchange (write), and with its
/// routing key if the user has topic permissions on that topic exchange.
fn may_publish(state: &State, access: &mut Access, message: &Message) -> Result<(), CoreError> {
    if access.publish_known_allowed(&message.exchange) {
        return Ok(());
    }
    access.check(Resource::Exchange, Right::Write, &message.exchange)?;
    if access.has_topic_permissions(&message.exchange) {
        return check_topic(
            state,
            access,
            &message.exchange,
            Right::Write,
            &message.routing_key,
        );
    }
    access.remember_publish_allowed(&message.exchange);
    Ok(())
}

/// Publishes one message: confirmed now (transient), deferred to the log (durable) or refused.
pub(super) fn publish_one(
    state: &mut State,
    access: &mut Access,
    now: u64,
    message: Arc<Message>,
    seq: u64,
    confirms: &mut Confirms,
    deferred: &mut Deferred,
) {
    if let Err(err) = may_publish(state, access, &message) {
        confirms.push(seq, refused(ErrorCode::AccessRefused, err.to_string()));
        return;
    }
    if message.persistent
        && let Some(reason) = state.refusing_durable()
    {
        confirms.push(seq, refused(ErrorCode::ResourceLimit, reason));
        return;
    }
    match state.publish(now, access.vhost(), message) {
        Ok(Published::Logged) => deferred.seqs.push(seq),
        Ok(Published::InMemory) => {
            confirms.push(seq, ConfirmStatus::Confirmed(Durability::InMemory))
        }
        Ok(Published::Duplicate) => confirms.push(seq, ConfirmStatus::Duplicate),
        Err(err) => confirms.push(seq, refused(error_code(&err), err.to_string())),
    }
}

/// Commits the log record of a batch whose confirms or responses wait for it, as the log's
/// leader (docs/durability.md "Latency"): if no fsync is in flight, the record is written and
/// fsynced on this runtime worker and its completion queues the confirm for this connection's
/// writer task on the same worker, so no thread is woken on the way. It runs as a task of its
/// own, spawned on this worker: the reader finishes its turn first, and the writer tasks this
/// batch woke (deliveries to consumers) stay free for another worker to run while this one
/// waits on the disk, so deliveries are not held back by the fsync.
pub(super) fn commit_log(leader: Leader) {
    tokio::spawn(async move {
        leader.commit();
    });
}

/// Applies a batch of frames under one lock. Returns why the connection must end, if it must,
/// and the log leader to commit, if the batch's confirms or responses wait for the log and the
/// client had nothing else waiting on it.
pub(super) fn apply_frames(
    shared: &Arc<Context>,
    reader: &mut Reader,
    frames: &mut Vec<Frame>,
    outbox: &Arc<Output>,
) -> (Option<Exit>, Option<Leader>) {
    // A user deleted, or no longer allowed on the virtual host, is disconnected at its next
    // frame (a heartbeat at the latest), as RabbitMQ closes a deleted user's connections.
    // Checked (and the patterns recompiled, if they changed) before the lock is taken.
    if !reader.access.may_connect() {
        frames.clear();
        let reason = format!(
            "user '{}' was deleted or lost its permissions on vhost '{}'",
            reader.access.user(),
            reader.access.vhost()
        );
        return (Some(Exit::Close(ErrorCode::ConnectionForced, reason)), None);
    }
    let now = now_ms();
    let mut confirms = Confirms::default();
    let mut deferred = Deferred::default();
    let mut exit = None;
    let connection = reader.connection;
    let after = {
        // Output is written by this reader once the lock is released (writer::flush_or_wake).
        let mut state = shared.batch();
        // Its virtual host was deleted (and perhaps added again, with permissions granted
        // again, since this connection's last frame): it has no place in the new one.
        if !state.broker.connection_vhost_is_live(connection) {
            frames.clear();
            drop(state);
            let reason = format!("vhost '{}' was deleted", reader.access.vhost());
            return (Some(Exit::Close(ErrorCode::ConnectionForced, reason)), None);
        }
        // Publishes made outside connections (recovery) are none of this reader's business.
        state.broker.take_routed(&mut reader.routed);
        for frame in frames.drain(..) {
            if exit.is_some() {
                continue;
            }
            let minor_required = frame.minor_required();
            if minor_required > reader.minor {
                // Only what the negotiated minor defines may be sent (docs/protocol.md §8).
                exit = Some(Exit::Close(
                    ErrorCode::ProtocolViolation,
                    format!(
                        "frame kind {} needs protocol 1.{minor_required}; this connection speaks 1.{}",
                        frame.kind(),
                        reader.minor
                    ),
                ));
                continue;
            }
            match frame {
                Frame::Publish(publish) => {
                    reader.publish_seq += 1;
                    reader.published = true;
                    let message = message_from_wire(
                        &mut reader.names,
                        &publish.exchange,
                        &publish.routing_key,
                        &publish.properties,
                        publish.body,
                    );
                    publish_one(
                        &mut state,
                        &mut reader.access,
                        now,
                        message,
                        reader.publish_seq,
                        &mut confirms,
                        &mut deferred,
                    );
                }
                Frame::PublishBatch(batch) => {
                    reader.published = true;
                    for message in &batch.messages {
                        reader.publish_seq += 1;
                        let exchange = batch.exchange_of(message);
                        let routing_key = batch.routing_key_of(message);
                        let message = message_from_wire(
                            &mut reader.names,
                            exchange,
                            routing_key,
                            &message.properties,
                            message.body.clone(),
                        );
                        publish_one(
                            &mut state,
                            &mut reader.access,
                            now,
                            message,
                            reader.publish_seq,
                            &mut confirms,
                            &mut deferred,
                        );
                    }
                }
                Frame::Ack(ack) => {
                    let command = Command::Ack {
                        connection,
                        delivery_tag: DeliveryTag(ack.delivery_tag),
                        multiple: ack.multiple,
                    };
                    exit = settle(&mut state, now, command);
                }
                Frame::Nack(nack) => {
                    let command = Command::Nack {
                        connection,
                        delivery_tag: DeliveryTag(nack.delivery_tag),
                        multiple: nack.multiple,
                        requeue: nack.requeue,
                    };
                    exit = settle(&mut state, now, command);
                }
                Frame::Reject(reject) => {
                    let command = Command::Reject {
                        connection,
                        delivery_tag: DeliveryTag(reject.delivery_tag),
                        requeue: reject.requeue,
                    };
                    exit = settle(&mut state, now, command);
                }
                Frame::AckRanges(ranges) => {
                    for range in ranges.ranges {
                        let command = Command::AckRange {
                            connection,
                            first: DeliveryTag(range.first),
                            last: DeliveryTag(range.last),
                        };
                        exit = settle(&mut state, now, command);
                        if exit.is_some() {
                            break;
                        }
                    }
                }
                Frame::Defer(defer) => {
                    let command = Command::Defer {
                        connection,
                        delivery_tag: DeliveryTag(defer.delivery_tag),
                        delay_ms: defer.delay_ms,
                    };
                    exit = settle(&mut state, now, command);
                }
                Frame::Touch(touch) => {
                    let command = Command::Touch {
                        connection,
                        delivery_tag: DeliveryTag(touch.delivery_tag),
                    };
                    exit = settle(&mut state, now, command);
                }
                Frame::Credit(credit) => {
                    let command = Command::Credit {
                        connection,
                        consumer_tag: ConsumerTag(credit.consumer_tag),
                        credit: credit.credit,
                    };
                    if let Err(err) = state.apply(now, command) {
                        // Credit for a consumer that was just cancelled is a benign race.
                        debug!(connection = connection.0, "credit ignored: {err}");
                    }
                }
                Frame::Request {
                    correlation_id,
                    request,
                } if request.is_admin() => {
                    let user = reader.access.user().to_owned();
                    reader.admin.submit(
                        shared,
                        &user,
                        reader.anonymous,
                        outbox,
                        correlation_id,
                        request,
                    );
                }
                Frame::Request {
                    correlation_id,
                    request,
                } => {
                    let logged_before = state.pending_log_ops();
                    let response =
                        handle_request(&mut state, &mut reader.access, connection, now, request);
                    if matches!(response, Response::Subscribed { .. }) {
                        // The answer precedes the consumer's first delivery (it logs nothing).
                        outbox.push_frame_held(Frame::Response {
                            correlation_id,
                            response,
                        });
                        state.route_effects();
                        continue;
                    }
                    state.route_effects();
                    let frame = Frame::Response {
                        correlation_id,
                        response,
                    };
                    if state.pending_log_ops() > logged_before {
                        // A durable change: answer once it is on disk.
                        deferred.frames.push(frame);
                    } else {
                        outbox.push_frame_held(frame);
                    }
                }
                Frame::Heartbeat => {}
                Frame::Close(close) => {
                    debug!(connection = connection.0, code = %close.code, "client closes: {}", close.reason);
                    // `CloseOk` once the broker let the connection go (`serve`).
                    exit = Some(Exit::ClosedByClient);
                }
                Frame::CloseOk => exit = Some(Exit::Gone),
                other => {
                    exit = Some(Exit::Close(
                        ErrorCode::ProtocolViolation,
                        format!("frame kind {} is not sent by clients", other.kind()),
                    ));
                }
            }
            state.route_effects();
        }
        if !deferred.seqs.is_empty() || !deferred.frames.is_empty() {
            let in_flight_before = reader
                .in_flight
                .count
                .fetch_add(deferred.seqs.len() as u64, Ordering::AcqRel);
            let (outbox, in_flight) = (outbox.clone(), reader.in_flight.clone());
            // Lead when nothing else of this client awaits the log: it is most likely waiting
            // for exactly these confirms, so their latency is what counts. A client with
            // publishes already in flight is pipelining: its batches join the writer thread's
            // group commits, and no runtime worker waits on the disk.
            state.on_durable(
                Box::new(move |outcome| deferred.complete(&outbox, &in_flight, outcome)),
                in_flight_before == 0,
            );
        }
        state.broker.take_routed(&mut reader.routed);
        state.finish()
    };
    if !confirms.ranges.is_empty() {
        outbox.push_frame_held(Frame::Confirm(Confirm {
            ranges: confirms.ranges,
        }));
    }
    // Deliveries first, then this connection's own responses, confirms and close.
    let leader = after.flush(Some(outbox));
    (exit, leader)
}

/// Applies an ack / nack / reject: an unknown delivery tag closes the connection (the client's
/// bookkeeping is broken; see docs/protocol.md).
pub(super) fn settle(state: &mut State, now: u64, command: Command) -> Option<Exit> {
    match state.apply(now, command) {
        Ok(_) => None,
        Err(err) => Some(Exit::Close(error_code(&err), err.to_string())),
    }
}
