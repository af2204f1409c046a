//! `wharf bench` producers: bench bodies, closed-loop and batched publishing with a confirm
//! window, open-loop (`--rate`) producers on threads of their own, and the per-producer report.

use super::report::new_histogram;
use super::settings::{PublishMode, Settings};
use super::{BODY_HEADER_BYTES, Clock, HEADERS_KEY, Progress, SEQ_BITS, connect};
use crate::cli::{EXIT_OTHER, Failure};
use bytes::{BufMut as _, Bytes, BytesMut};
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt as _, StreamExt as _};
use hdrhistogram::Histogram;
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use wharf_client::{Client, ClientError, Durability, ExchangeKind, Message, PublishTicket};

/// Bodies are cut from buffers of about this many bytes: one allocation per chunk, not per
/// message.
const BODY_CHUNK_BYTES: usize = 256 * 1024;

/// Cuts bench bodies out of shared chunk buffers.
pub(super) struct Bodies {
    buf: BytesMut,
    size: usize,
    chunk_bytes: usize,
    filler: Vec<u8>,
}

impl Bodies {
    pub(super) fn new(size: usize) -> Bodies {
        Bodies {
            buf: BytesMut::new(),
            size,
            chunk_bytes: (BODY_CHUNK_BYTES / size).clamp(1, 1024) * size,
            filler: (0..size - BODY_HEADER_BYTES)
                .map(|idx| b'a' + (idx % 26) as u8)
                .collect(),
        }
    }

    pub(super) fn next(&mut self, intended_ns: u64, producer_idx: u32, seq: u64) -> Bytes {
        if self.buf.capacity() - self.buf.len() < self.size {
            self.buf = BytesMut::with_capacity(self.chunk_bytes.max(self.size));
        }
        self.buf.put_u64_le(intended_ns);
        self.buf
            .put_u64_le((u64::from(producer_idx) << SEQ_BITS) | seq);
        self.buf.put_slice(&self.filler);
        self.buf.split().freeze()
    }
}

pub(super) struct ProducerReport {
    pub(super) published: u64,
    pub(super) confirmed: u64,
    pub(super) refused: u64,
    /// Published messages without a positive confirm (refused, or the connection ended).
    pub(super) unconfirmed: Vec<u64>,
    pub(super) confirmed_per_queue: Vec<u64>,
    /// Confirm time minus intended send time.
    pub(super) confirm_latency: Histogram<u64>,
    pub(super) last_publish_ns: u64,
    pub(super) last_confirm_ns: u64,
    pub(super) error: Option<ClientError>,
}

impl ProducerReport {
    pub(super) fn new(settings: &Settings, start_ns: u64) -> ProducerReport {
        ProducerReport {
            published: 0,
            confirmed: 0,
            refused: 0,
            unconfirmed: Vec::new(),
            confirmed_per_queue: vec![0; settings.queues as usize],
            confirm_latency: new_histogram(),
            last_publish_ns: start_ns,
            last_confirm_ns: start_ns,
            error: None,
        }
    }
}

pub(super) struct Producer {
    settings: Arc<Settings>,
    idx: u32,
    client: Client,
    exchange: String,
    routing_keys: Arc<Vec<String>>,
    clock: Clock,
    start_ns: u64,
    progress: Arc<Progress>,
}

/// A paced producer waits longer than this before a slot on tokio's timer (1 ms granularity)
/// and only this last stretch on `std::thread::sleep`.
const PACED_COARSE_SLEEP_NS_MIN: u64 = 2_000_000;

/// A batch in flight: first sequence number, size, queue, intended time of its first message,
/// and the outcomes.
type BatchDone = (
    u64,
    u64,
    u32,
    u64,
    Result<Vec<Result<Durability, ClientError>>, ClientError>,
);

impl Producer {
    /// Nanoseconds between two messages of this producer on the `--rate` schedule.
    fn interval_ns(&self) -> Option<f64> {
        self.settings
            .rate
            .map(|rate| 1e9 * f64::from(self.settings.producers) / rate)
    }

    /// The intended send time of `seq` on the schedule; producers are phase-shifted so that
    /// together they publish evenly.
    fn slot_ns(&self, interval_ns: f64, seq: u64) -> u64 {
        let phase = interval_ns * f64::from(self.idx) / f64::from(self.settings.producers);
        self.start_ns + (seq as f64 * interval_ns + phase) as u64
    }

    fn message(&self, body: Bytes, queue_idx: u32, seq: u64) -> Message {
        let mut message = Message::new(body).persistent(self.settings.persistent);
        if let Some(max_priority) = self.settings.max_priority {
            message = message.priority((seq % (u64::from(max_priority) + 1)) as u8);
        }
        if self.settings.kind == ExchangeKind::Headers {
            message.header(HEADERS_KEY, i64::from(queue_idx))
        } else {
            message
        }
    }

    /// Publishes until the count or the deadline, then waits for every confirm. In open-loop
    /// mode it runs as a [`PacedProducer`].
    pub(super) async fn run(self) -> ProducerReport {
        let settings = self.settings.clone();
        let publisher = self.client.publisher_with_window(settings.confirm_window);
        let count = settings.producer_count(self.idx);
        let deadline_ns = settings
            .duration
            .map(|duration| self.start_ns + duration.as_nanos() as u64);
        let interval_ns = self.interval_ns();
        let mut report = ProducerReport::new(&settings, self.start_ns);
        let mut bodies = Bodies::new(settings.size);
        let batch = u64::from(settings.batch);
        let batches_in_flight_max = (settings.confirm_window as usize)
            .div_ceil(settings.batch as usize)
            .max(1);
        let mut tickets: VecDeque<(u64, u32, u64, PublishTicket)> = VecDeque::new();
        let mut batches: FuturesUnordered<BoxFuture<'_, BatchDone>> = FuturesUnordered::new();
        let mut seq = 0_u64;
        loop {
            if count.is_some_and(|count| seq >= count) {
                break;
            }
            let mut now_ns = self.clock.now_ns();
            if deadline_ns.is_some_and(|deadline| now_ns >= deadline) {
                break;
            }
            // How many to send now: up to the end of this routing run of `batch` messages,
            // and, on a schedule, only those whose slot has come.
            let mut n_send = batch - seq % batch;
            if let Some(count) = count {
                n_send = n_send.min(count - seq);
            }
            if let Some(interval_ns) = interval_ns {
                let slot_ns = self.slot_ns(interval_ns, seq);
                if slot_ns > now_ns + PACED_COARSE_SLEEP_NS_MIN {
                    // A long wait goes on tokio's timer, which keeps this thread's connection
                    // served (heartbeats, confirms); the last stretch on the precise sleep.
                    let coarse_ns = slot_ns - now_ns - PACED_COARSE_SLEEP_NS_MIN;
                    tokio::time::sleep(Duration::from_nanos(coarse_ns)).await;
                    now_ns = self.clock.now_ns();
                }
                if slot_ns > now_ns {
                    std::thread::sleep(Duration::from_nanos(slot_ns - now_ns));
                    now_ns = self.clock.now_ns();
                }
                let n_slots_passed =
                    (now_ns.saturating_sub(self.start_ns) as f64 / interval_ns) as u64 + 1;
                n_send = n_send.min(n_slots_passed.saturating_sub(seq).max(1));
            }
            let queue_idx = settings.queue_of(self.idx, seq);
            let routing_key = &self.routing_keys[queue_idx as usize];
            let intended = |seq: u64| match interval_ns {
                Some(interval_ns) => self.slot_ns(interval_ns, seq),
                None => now_ns,
            };
            if settings.publish == PublishMode::Single {
                let body = bodies.next(intended(seq), self.idx, seq);
                match publisher
                    .publish(
                        &self.exchange,
                        routing_key,
                        self.message(body, queue_idx, seq),
                    )
                    .await
                {
                    Ok(ticket) => tickets.push_back((seq, queue_idx, intended(seq), ticket)),
                    Err(err) => {
                        report.error = Some(err);
                        break;
                    }
                }
                seq += 1;
                report.published += 1;
                if interval_ns.is_some() {
                    // Paced: the connection's writer runs on this thread's runtime. Let it
                    // write the message (and the reader take in confirms) before sleeping.
                    tokio::task::yield_now().await;
                }
                self.drain_ready_tickets(&mut tickets, &mut report);
                if tickets.len() > 2 * settings.confirm_window as usize
                    && let Some(entry) = tickets.pop_front()
                {
                    self.settle_ticket(entry, &mut report).await;
                }
            } else {
                let first_intended = intended(seq);
                let messages: Vec<Message> = (seq..seq + n_send)
                    .map(|msg_seq| {
                        let body = bodies.next(intended(msg_seq), self.idx, msg_seq);
                        self.message(body, queue_idx, msg_seq)
                    })
                    .collect();
                let first_seq = seq;
                let publisher = &publisher;
                let exchange = self.exchange.as_str();
                batches.push(Box::pin(async move {
                    let outcomes = publisher
                        .publish_batch(exchange, routing_key, messages)
                        .await;
                    (first_seq, n_send, queue_idx, first_intended, outcomes)
                }));
                seq += n_send;
                report.published += n_send;
                // Polling sends the new batch's frames; completed ones are accounted.
                while let Some(Some(done)) = batches.next().now_or_never() {
                    self.account_batch(done, &mut report);
                }
                if interval_ns.is_some() {
                    // Paced: let this thread's connection writer send the batch now.
                    tokio::task::yield_now().await;
                }
                while batches.len() >= batches_in_flight_max {
                    match batches.next().await {
                        Some(done) => self.account_batch(done, &mut report),
                        None => break,
                    }
                }
                if report.error.is_some() {
                    break;
                }
            }
            report.last_publish_ns = self.clock.now_ns();
            self.progress
                .primary
                .store(report.published, Ordering::Relaxed);
        }
        report.last_publish_ns = self.clock.now_ns();
        self.progress
            .primary
            .store(report.published, Ordering::Relaxed);
        while let Some(entry) = tickets.pop_front() {
            self.settle_ticket(entry, &mut report).await;
        }
        while let Some(done) = batches.next().await {
            self.account_batch(done, &mut report);
        }
        drop(batches);
        let _ = self.client.close().await;
        report
    }

    fn drain_ready_tickets(
        &self,
        tickets: &mut VecDeque<(u64, u32, u64, PublishTicket)>,
        report: &mut ProducerReport,
    ) {
        while let Some((_, _, _, ticket)) = tickets.front_mut() {
            let Some(outcome) = ticket.now_or_never() else {
                return;
            };
            let (seq, queue_idx, intended_ns, _) = tickets.pop_front().expect("front exists");
            self.account_one(seq, queue_idx, intended_ns, outcome, report);
        }
    }

    async fn settle_ticket(
        &self,
        (seq, queue_idx, intended_ns, ticket): (u64, u32, u64, PublishTicket),
        report: &mut ProducerReport,
    ) {
        let outcome = ticket.await;
        self.account_one(seq, queue_idx, intended_ns, outcome, report);
    }

    fn account_one(
        &self,
        seq: u64,
        queue_idx: u32,
        intended_ns: u64,
        outcome: Result<Durability, ClientError>,
        report: &mut ProducerReport,
    ) {
        let now_ns = self.clock.now_ns();
        report.last_confirm_ns = now_ns;
        match outcome {
            Ok(_) => {
                report.confirmed += 1;
                report.confirmed_per_queue[queue_idx as usize] += 1;
                report
                    .confirm_latency
                    .saturating_record(now_ns.saturating_sub(intended_ns).max(1));
            }
            Err(err) => {
                self.account_refusal(seq, err, report);
            }
        }
        self.progress
            .secondary
            .store(report.confirmed, Ordering::Relaxed);
    }

    fn account_refusal(&self, seq: u64, err: ClientError, report: &mut ProducerReport) {
        report.unconfirmed.push(seq);
        if err.is_connection_error() {
            report.error.get_or_insert(err);
        } else {
            report.refused += 1;
        }
    }

    fn account_batch(&self, done: BatchDone, report: &mut ProducerReport) {
        let (first_seq, n_messages, queue_idx, intended_ns, outcomes) = done;
        let now_ns = self.clock.now_ns();
        report.last_confirm_ns = now_ns;
        match outcomes {
            Ok(outcomes) => {
                let mut n_confirmed = 0;
                for (seq, outcome) in (first_seq..).zip(outcomes) {
                    match outcome {
                        Ok(_) => n_confirmed += 1,
                        Err(err) => self.account_refusal(seq, err, report),
                    }
                }
                report.confirmed += n_confirmed;
                report.confirmed_per_queue[queue_idx as usize] += n_confirmed;
                if n_confirmed > 0 {
                    report.confirm_latency.saturating_record_n(
                        now_ns.saturating_sub(intended_ns).max(1),
                        n_confirmed,
                    );
                }
            }
            Err(err) => {
                // Nothing of this batch was sent.
                report.published -= n_messages;
                report.error.get_or_insert(err);
            }
        }
        self.progress
            .secondary
            .store(report.confirmed, Ordering::Relaxed);
    }
}

/// What a producer is given once every producer is connected.
pub(super) struct ProducerStart {
    pub(super) idx: u32,
    pub(super) exchange: String,
    pub(super) routing_keys: Arc<Vec<String>>,
    pub(super) clock: Clock,
    pub(super) start_ns: u64,
    pub(super) progress: Arc<Progress>,
}

impl ProducerStart {
    pub(super) fn into_producer(self, settings: Arc<Settings>, client: Client) -> Producer {
        Producer {
            settings,
            idx: self.idx,
            client,
            exchange: self.exchange,
            routing_keys: self.routing_keys,
            clock: self.clock,
            start_ns: self.start_ns,
            progress: self.progress,
        }
    }
}

/// A connected producer waiting for the start.
pub(super) enum PendingProducer {
    /// Runs as a task of the bench's runtime.
    Task(Client),
    /// Runs on a thread of its own (see [`PacedProducer`]).
    Paced(PacedProducer),
}

/// An open-loop (`--rate`) producer: a thread of its own that sleeps to each message's slot
/// with `std::thread::sleep` (precise to tens of µs, where tokio's timer has 1 ms granularity),
/// driving its connection on a current-thread runtime of its own. The publishing thread writes
/// each message to the socket itself: no other thread is woken between the schedule and the
/// broker, as with an application on a `current_thread` runtime (and as `loopback-floor`'s
/// sender does).
pub(super) struct PacedProducer {
    start: std::sync::mpsc::Sender<ProducerStart>,
    thread: tokio::task::JoinHandle<ProducerReport>,
}

impl PacedProducer {
    /// Starts the thread and waits until its connection is open.
    pub(super) async fn connect(settings: Arc<Settings>) -> Result<PacedProducer, Failure> {
        let (connected_sender, connected) = tokio::sync::oneshot::channel();
        let (start, started) = std::sync::mpsc::channel::<ProducerStart>();
        let thread = tokio::task::spawn_blocking(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(err) => {
                    let failure = Failure::new(
                        EXIT_OTHER,
                        format!("cannot start a producer runtime: {err}"),
                    );
                    let _ = connected_sender.send(Err(failure));
                    return ProducerReport::new(&settings, 0);
                }
            };
            let client = match runtime.block_on(connect(&settings, "producer")) {
                Ok(client) => client,
                Err(failure) => {
                    let _ = connected_sender.send(Err(failure));
                    return ProducerReport::new(&settings, 0);
                }
            };
            let _ = connected_sender.send(Ok(()));
            match started.recv() {
                Ok(start) => runtime.block_on(start.into_producer(settings, client).run()),
                // The run was abandoned before it started (another producer failed to connect).
                Err(_) => ProducerReport::new(&settings, 0),
            }
        });
        match connected.await {
            Ok(Ok(())) => Ok(PacedProducer { start, thread }),
            Ok(Err(failure)) => Err(failure),
            Err(_) => Err(Failure::new(EXIT_OTHER, "a producer thread ended early")),
        }
    }

    pub(super) fn start(self, start: ProducerStart) -> tokio::task::JoinHandle<ProducerReport> {
        // The thread is waiting on the other end and only returns after receiving.
        let _ = self.start.send(start);
        self.thread
    }
}
