//! The machine's loopback latency floor: what any broker's publish → deliver latency is built
//! on, measured without a broker.
//!
//! A sender thread writes fixed-size messages over loopback TCP on an open-loop schedule
//! (`std::thread::sleep` to each slot, the way `wharf bench --rate` paces). A receiver thread
//! reads them and records, in an HdrHistogram, how late each arrived against its intended send
//! time. With one hop the sender writes straight to the receiver; with two hops every message
//! goes through a relay (`relay`, in its own process in the `loopback-floor` binary) that
//! copies bytes from the sender's connection to the receiver's: a broker that does no work at
//! all. Everything is blocking I/O on dedicated threads, the fewest wakeups a message can take.
//!
//! Wharf's S3 (`wharf bench --scenario s3`, 10,000 msgs/s) has two hops, producer → broker →
//! consumer. Run back to back with it, two hops here tell how much of S3's tail is the
//! machine's (docs/benchmarks.md, "Session 5").

use hdrhistogram::Histogram;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// Every message starts with its sequence number and its intended send time (ns since the
/// run's start), both u64 LE.
pub const MESSAGE_HEADER_BYTES: usize = 16;
/// Largest message: keeps the relay's and the receiver's buffers small.
pub const MESSAGE_BYTES_MAX: usize = 1 << 20;
/// Most messages in one run (the histogram and the run stay bounded).
pub const MESSAGES_MAX: u64 = 100_000_000;
/// A receiver or relay that hears nothing for this long gives up instead of hanging.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Latencies are recorded in ns up to this (longer ones saturate).
const LATENCY_NS_MAX: u64 = 60_000_000_000;
/// What a client writes first on a relay connection: which end it is.
const ROLE_SENDER: u8 = b'S';
const ROLE_RECEIVER: u8 = b'R';

/// Why a run cannot start or did not finish.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FloorError {
    #[error("--rate must be a positive number of messages per second, got {0}")]
    Rate(f64),
    #[error("a run needs between 1 and {MESSAGES_MAX} messages, got {0}")]
    Count(u64),
    #[error("--seconds must be a positive number, got {0}")]
    Seconds(f64),
    #[error("--size must be between {MESSAGE_HEADER_BYTES} and {MESSAGE_BYTES_MAX} bytes, got {0}")]
    Size(usize),
    #[error("--hops must be 1 (sender → receiver) or 2 (through a relay), got {0}")]
    Hops(u8),
    #[error("a relay connection must start with 'S' (sender) or 'R' (receiver), got byte {0}")]
    Role(u8),
    #[error("message {got} arrived where {expected} was due: the relay reordered or lost data")]
    Order { expected: u64, got: u64 },
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

impl FloorError {
    fn io(what: &'static str) -> impl FnOnce(io::Error) -> Self {
        move |source| Self::Io { what, source }
    }
}

/// How many loopback connections a message crosses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hops {
    /// Sender → receiver.
    One,
    /// Sender → relay → receiver, like producer → broker → consumer.
    Two,
}

impl TryFrom<u8> for Hops {
    type Error = FloorError;

    fn try_from(hops: u8) -> Result<Self, FloorError> {
        match hops {
            1 => Ok(Self::One),
            2 => Ok(Self::Two),
            other => Err(FloorError::Hops(other)),
        }
    }
}

/// One run: `count` messages of `size` bytes at `rate` per second.
#[derive(Debug, Clone, Copy)]
pub struct FloorSettings {
    rate: f64,
    count: u64,
    size: usize,
}

impl FloorSettings {
    /// Checks each setting against its range.
    pub fn new(rate: f64, count: u64, size: usize) -> Result<Self, FloorError> {
        if !(rate.is_finite() && rate > 0.0) {
            return Err(FloorError::Rate(rate));
        }
        if count == 0 || count > MESSAGES_MAX {
            return Err(FloorError::Count(count));
        }
        if !(MESSAGE_HEADER_BYTES..=MESSAGE_BYTES_MAX).contains(&size) {
            return Err(FloorError::Size(size));
        }
        Ok(Self { rate, count, size })
    }

    /// The settings of a run of `seconds` at `rate`.
    pub fn for_duration(rate: f64, seconds: f64, size: usize) -> Result<Self, FloorError> {
        if !(seconds.is_finite() && seconds > 0.0) {
            return Err(FloorError::Seconds(seconds));
        }
        let count = (rate * seconds).ceil();
        // NaN, infinite and huge products all land on 0 or past MESSAGES_MAX.
        let count = if count.is_finite() && count >= 1.0 {
            count.min(MESSAGES_MAX as f64 + 1.0) as u64
        } else {
            0
        };
        Self::new(rate, count, size)
    }

    /// Messages in the run.
    pub fn count(&self) -> u64 {
        self.count
    }
}

/// What a run measured: publish → receive latency against the intended send time.
#[derive(Debug, Clone)]
pub struct FloorReport {
    pub received: u64,
    /// Seconds from the first slot to the last message received.
    pub seconds: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    /// Messages later than 2 ms (S3's p99.9 target).
    pub over_2ms: u64,
}

impl FloorReport {
    fn from_histogram(histogram: &Histogram<u64>, seconds: f64, over_2ms: u64) -> Self {
        let us = |quantile: f64| histogram.value_at_quantile(quantile) as f64 / 1e3;
        Self {
            received: histogram.len(),
            seconds,
            p50_us: us(0.5),
            p90_us: us(0.9),
            p99_us: us(0.99),
            p999_us: us(0.999),
            max_us: histogram.max() as f64 / 1e3,
            over_2ms,
        }
    }

    /// One JSON object, for scripts.
    pub fn to_json(&self) -> String {
        format!(
            "{{\"received\":{},\"seconds\":{:.3},\"latency_us\":{{\"p50\":{:.1},\"p90\":{:.1},\
             \"p99\":{:.1},\"p999\":{:.1},\"max\":{:.1}}},\"over_2ms\":{}}}",
            self.received,
            self.seconds,
            self.p50_us,
            self.p90_us,
            self.p99_us,
            self.p999_us,
            self.max_us,
            self.over_2ms
        )
    }
}

/// Serves one run on `listener`: accepts the sender's and the receiver's connections (either
/// order; each names itself with its first byte), then copies the sender's bytes to the
/// receiver until the sender closes. Returns the bytes relayed.
pub fn relay(listener: &TcpListener) -> Result<u64, FloorError> {
    let mut sender = None;
    let mut receiver = None;
    while sender.is_none() || receiver.is_none() {
        let (mut stream, _) = listener.accept().map_err(FloorError::io("accept"))?;
        stream
            .set_read_timeout(Some(IDLE_TIMEOUT))
            .map_err(FloorError::io("set the relay's read timeout"))?;
        let mut role = [0_u8];
        stream
            .read_exact(&mut role)
            .map_err(FloorError::io("read a connection's role"))?;
        match role[0] {
            ROLE_SENDER if sender.is_none() => sender = Some(stream),
            ROLE_RECEIVER if receiver.is_none() => receiver = Some(stream),
            other => return Err(FloorError::Role(other)),
        }
    }
    let (mut sender, mut receiver) = (sender.expect("accepted"), receiver.expect("accepted"));
    receiver
        .set_nodelay(true)
        .map_err(FloorError::io("set TCP_NODELAY"))?;
    let mut buf = vec![0_u8; 64 * 1024];
    let mut relayed = 0_u64;
    loop {
        let n_read = sender
            .read(&mut buf)
            .map_err(FloorError::io("read from the sender"))?;
        if n_read == 0 {
            return Ok(relayed);
        }
        receiver
            .write_all(&buf[..n_read])
            .map_err(FloorError::io("write to the receiver"))?;
        relayed += n_read as u64;
    }
}

/// Runs the sender and the receiver: straight to each other (`relay_addr` `None`, one hop) or
/// through the relay listening at `relay_addr` (two hops).
pub fn run(
    settings: FloorSettings,
    relay_addr: Option<SocketAddr>,
) -> Result<FloorReport, FloorError> {
    let (mut sender, receiver) = match relay_addr {
        None => {
            let listener =
                TcpListener::bind("127.0.0.1:0").map_err(FloorError::io("bind a listener"))?;
            let addr = listener
                .local_addr()
                .map_err(FloorError::io("read the listener's address"))?;
            let sender = TcpStream::connect(addr).map_err(FloorError::io("connect"))?;
            let (receiver, _) = listener.accept().map_err(FloorError::io("accept"))?;
            (sender, receiver)
        }
        Some(addr) => {
            let connect = |role: u8| -> Result<TcpStream, FloorError> {
                let mut stream = TcpStream::connect(addr).map_err(FloorError::io("connect"))?;
                stream
                    .write_all(&[role])
                    .map_err(FloorError::io("send the role byte"))?;
                Ok(stream)
            };
            (connect(ROLE_SENDER)?, connect(ROLE_RECEIVER)?)
        }
    };
    sender
        .set_nodelay(true)
        .map_err(FloorError::io("set TCP_NODELAY"))?;
    receiver
        .set_read_timeout(Some(IDLE_TIMEOUT))
        .map_err(FloorError::io("set the receiver's read timeout"))?;
    let start = Instant::now();
    let receiving = std::thread::Builder::new()
        .name("floor-receiver".into())
        .spawn(move || receive(receiver, settings, start))
        .map_err(FloorError::io("start the receiver thread"))?;
    let sent = send(&mut sender, settings, start);
    // Closing tells the relay to finish; a receiver missing messages times out.
    drop(sender);
    let received = receiving
        .join()
        .expect("the receiver thread does not panic");
    sent?;
    received
}

fn send(sender: &mut TcpStream, settings: FloorSettings, start: Instant) -> Result<(), FloorError> {
    let interval_ns = 1e9 / settings.rate;
    let mut message = vec![0_u8; settings.size];
    for seq in 0..settings.count {
        let slot_ns = (seq as f64 * interval_ns) as u64;
        let now_ns = start.elapsed().as_nanos() as u64;
        if slot_ns > now_ns {
            std::thread::sleep(Duration::from_nanos(slot_ns - now_ns));
        }
        message[..8].copy_from_slice(&seq.to_le_bytes());
        message[8..16].copy_from_slice(&slot_ns.to_le_bytes());
        sender
            .write_all(&message)
            .map_err(FloorError::io("write to the sender's connection"))?;
    }
    Ok(())
}

fn receive(
    mut receiver: TcpStream,
    settings: FloorSettings,
    start: Instant,
) -> Result<FloorReport, FloorError> {
    let mut histogram =
        Histogram::<u64>::new_with_bounds(1, LATENCY_NS_MAX, 3).expect("valid histogram bounds");
    let mut message = vec![0_u8; settings.size];
    let mut over_2ms = 0_u64;
    for expected in 0..settings.count {
        receiver
            .read_exact(&mut message)
            .map_err(FloorError::io("read a message"))?;
        let now_ns = start.elapsed().as_nanos() as u64;
        let got = u64::from_le_bytes(message[..8].try_into().expect("8 bytes"));
        if got != expected {
            return Err(FloorError::Order { expected, got });
        }
        let slot_ns = u64::from_le_bytes(message[8..16].try_into().expect("8 bytes"));
        let latency_ns = now_ns.saturating_sub(slot_ns).max(1);
        over_2ms += u64::from(latency_ns > 2_000_000);
        histogram.saturating_record(latency_ns);
    }
    Ok(FloorReport::from_histogram(
        &histogram,
        start.elapsed().as_secs_f64(),
        over_2ms,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relay_thread() -> (SocketAddr, std::thread::JoinHandle<Result<u64, FloorError>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        (addr, std::thread::spawn(move || relay(&listener)))
    }

    #[test]
    fn one_hop_receives_every_message_in_order_with_its_latency() {
        let settings = FloorSettings::new(20_000.0, 2_000, 100).unwrap();
        let report = run(settings, None).unwrap();
        assert_eq!(report.received, 2_000);
        assert!(report.p50_us > 0.0);
        assert!(report.p50_us <= report.p99_us && report.p99_us <= report.max_us);
        // The schedule spans 0.1 s: the run cannot end before its last slot.
        assert!(report.seconds >= 0.0999, "{report:?}");
    }

    #[test]
    fn two_hops_go_through_the_relay_which_copies_every_byte() {
        let (addr, relaying) = relay_thread();
        let settings = FloorSettings::new(20_000.0, 1_000, 64).unwrap();
        let report = run(settings, Some(addr)).unwrap();
        assert_eq!(report.received, 1_000);
        assert_eq!(relaying.join().unwrap().unwrap(), 64_000);
    }

    #[test]
    fn a_relay_refuses_a_connection_that_names_no_role() {
        let (addr, relaying) = relay_thread();
        let mut stream = TcpStream::connect(addr).unwrap();
        stream.write_all(b"X").unwrap();
        assert!(matches!(
            relaying.join().unwrap(),
            Err(FloorError::Role(b'X'))
        ));
    }

    /// A relay of the test's own making: `forward` gets the sender's and the receiver's
    /// connections.
    fn fake_relay(
        forward: impl FnOnce(TcpStream, TcpStream) + Send + 'static,
    ) -> (SocketAddr, std::thread::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let relaying = std::thread::spawn(move || {
            let mut streams = Vec::new();
            for _ in 0..2 {
                let (mut stream, _) = listener.accept().unwrap();
                let mut role = [0_u8];
                stream.read_exact(&mut role).unwrap();
                streams.push((role[0], stream));
            }
            streams.sort_by_key(|(role, _)| *role);
            let [(_, receiver), (_, sender)] = <[_; 2]>::try_from(streams).unwrap();
            forward(sender, receiver);
        });
        (addr, relaying)
    }

    #[test]
    fn messages_later_than_two_ms_are_counted() {
        // The relay holds message 1 back for 3 ms: the delay is what the test measures.
        let (addr, relaying) = fake_relay(|mut sender, mut receiver| {
            let mut message = [0_u8; 16];
            for seq in 0..3 {
                sender.read_exact(&mut message).unwrap();
                if seq == 1 {
                    std::thread::sleep(Duration::from_millis(3));
                }
                receiver.write_all(&message).unwrap();
            }
        });
        let settings = FloorSettings::new(100_000.0, 3, 16).unwrap();
        let report = run(settings, Some(addr)).unwrap();
        relaying.join().unwrap();
        assert!(report.over_2ms >= 1, "{report:?}");
        assert!(report.max_us >= 3_000.0, "{report:?}");
    }

    #[test]
    fn a_receiver_notices_a_message_out_of_order() {
        // The relay drops message 0 and passes on message 1.
        let (addr, relaying) = fake_relay(|mut sender, mut receiver| {
            let mut message = [0_u8; 16];
            sender.read_exact(&mut message).unwrap();
            sender.read_exact(&mut message).unwrap();
            receiver.write_all(&message).unwrap();
        });
        let settings = FloorSettings::new(10_000.0, 2, 16).unwrap();
        let outcome = run(settings, Some(addr));
        relaying.join().unwrap();
        assert!(
            matches!(
                outcome,
                Err(FloorError::Order {
                    expected: 0,
                    got: 1
                })
            ),
            "{outcome:?}"
        );
    }

    #[test]
    fn settings_out_of_range_are_refused_with_their_value() {
        assert!(matches!(
            FloorSettings::new(0.0, 1, 100),
            Err(FloorError::Rate(_))
        ));
        assert!(matches!(
            FloorSettings::new(f64::NAN, 1, 100),
            Err(FloorError::Rate(_))
        ));
        assert!(matches!(
            FloorSettings::new(1.0, 0, 100),
            Err(FloorError::Count(0))
        ));
        assert!(matches!(
            FloorSettings::new(1.0, 1, 15),
            Err(FloorError::Size(15))
        ));
        assert!(matches!(
            FloorSettings::new(1.0, 1, MESSAGE_BYTES_MAX + 1),
            Err(FloorError::Size(_))
        ));
        assert!(matches!(
            FloorSettings::for_duration(1_000.0, 0.0, 100),
            Err(FloorError::Seconds(_))
        ));
        assert!(matches!(
            FloorSettings::for_duration(1e9, 1e9, 100),
            Err(FloorError::Count(_))
        ));
        assert!(matches!(
            FloorSettings::for_duration(-5.0, 1.0, 100),
            Err(FloorError::Rate(_))
        ));
        assert_eq!(
            FloorSettings::for_duration(10_000.0, 0.25, 100)
                .unwrap()
                .count(),
            2_500
        );
        assert!(matches!(Hops::try_from(3), Err(FloorError::Hops(3))));
        assert_eq!(Hops::try_from(2).unwrap(), Hops::Two);
        assert!(
            FloorError::Size(15)
                .to_string()
                .contains("between 16 and 1048576")
        );
    }

    #[test]
    fn the_report_reads_its_percentiles_off_the_histogram_and_as_json() {
        let mut histogram = Histogram::<u64>::new_with_bounds(1, LATENCY_NS_MAX, 3).unwrap();
        for latency_ns in [100_000, 2_000_000, 2_500_000, 9_000_000] {
            histogram.record(latency_ns).unwrap();
        }
        let report = FloorReport::from_histogram(&histogram, 1.5, 2);
        assert!((report.p50_us - 2_000.0).abs() < 2.0, "{report:?}");
        assert!((report.max_us - 9_000.0).abs() < 9.0, "{report:?}");
        let json = report.to_json();
        assert!(
            json.starts_with("{\"received\":4,\"seconds\":1.500,"),
            "{json}"
        );
        assert!(json.ends_with("\"over_2ms\":2}"), "{json}");
    }
}
