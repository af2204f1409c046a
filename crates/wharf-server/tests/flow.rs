//! Publisher flow control through the real server and client: a publisher faster than the
//! consumers of its queue is held to their pace once the queue's backlog passes the flow limit;
//! consumers that stop taking, or take too slowly to drain the backlog soon (a job queue),
//! release it; queues without consumers never hold it. (That a connection is not held for a
//! queue it consumes from itself is a unit test of `connection.rs`: with the slow-consumer
//! release, it only changes how long a hold lasts.)

mod common;

use common::{DEADLINE, TestServer};
use wharf_client::{Client, ConsumeOptions, Message};

/// The flow limit the tests run with (ready messages).
const LIMIT: u64 = 200;
/// Messages per publish call; each call waits for its confirms, so at most one is in flight.
const BATCH: usize = 10;

async fn start(limit: u64) -> TestServer {
    TestServer::start_with(|config| {
        config.flow_ready_messages = limit;
        config.flow_ready_bytes = 0;
    })
    .await
}

async fn connect(server: &TestServer) -> Client {
    Client::connect(&server.server.addr.to_string())
        .await
        .expect("connect")
}

/// Publishes `n_batches` batches of `BATCH` to `queue`, each confirmed before the next.
async fn publish(client: &Client, queue: &str, n_batches: usize) {
    let publisher = client.publisher_with_window(BATCH as u32);
    for batch in 0..n_batches {
        let messages = (0..BATCH)
            .map(|idx| Message::new(format!("m{}", batch * BATCH + idx)))
            .collect();
        for outcome in publisher.publish_batch("", queue, messages).await.unwrap() {
            outcome.expect("confirmed");
        }
    }
}

fn manual(prefetch: u32) -> ConsumeOptions {
    ConsumeOptions {
        prefetch,
        auto_ack: false,
        ..ConsumeOptions::default()
    }
}

/// A consumer acking one message at a time (prefetch 1: a round trip per message) is far
/// slower than a publisher sending ten per round trip. With flow control the publisher ends
/// with the queue near the limit; without it the queue would hold nearly everything.
async fn backlog_when_the_publisher_is_done(limit: u64) -> u64 {
    let server = start(limit).await;
    let client = connect(&server).await;
    client.declare_queue("work").await.unwrap();
    let n_batches = 300;
    let total = n_batches * BATCH;
    let mut consumer = connect(&server)
        .await
        .consume("work", manual(1))
        .await
        .unwrap();
    let consuming = tokio::spawn(async move {
        let mut seen = std::collections::BTreeSet::new();
        while seen.len() < total {
            let delivery = tokio::time::timeout(DEADLINE, consumer.next())
                .await
                .expect("deliveries keep coming")
                .expect("open")
                .expect("ok");
            let body = std::str::from_utf8(delivery.body()).unwrap();
            seen.insert(body[1..].parse::<usize>().unwrap());
            delivery.ack().await.unwrap();
        }
        seen
    });
    tokio::time::timeout(DEADLINE * 3, publish(&client, "work", n_batches))
        .await
        .expect("the publisher finishes");
    let backlog = client.queue_stats("work").await.unwrap().ready;
    let seen = tokio::time::timeout(DEADLINE * 3, consuming)
        .await
        .expect("the consumer takes everything")
        .unwrap();
    assert_eq!(seen.len(), total, "every message delivered once");
    assert_eq!(seen.last(), Some(&(total - 1)));
    backlog
}

#[tokio::test]
async fn a_publisher_faster_than_the_consumers_is_held_near_the_flow_limit() {
    let backlog = backlog_when_the_publisher_is_done(LIMIT).await;
    // The last batch is read and confirmed before the reader looks at the queue.
    assert!(
        backlog <= LIMIT + BATCH as u64,
        "backlog {backlog} over the limit {LIMIT} plus one batch"
    );
}

#[tokio::test]
async fn without_flow_control_the_same_publisher_runs_ahead() {
    // The contrast that shows the test above measures flow control, not a slow publisher.
    let backlog = backlog_when_the_publisher_is_done(0).await;
    assert!(backlog > 4 * LIMIT, "backlog {backlog}");
}

#[tokio::test]
async fn consumers_that_stop_taking_release_the_publisher() {
    let server = start(LIMIT).await;
    let client = connect(&server).await;
    client.declare_queue("stuck").await.unwrap();
    // Five deliveries, never acked: the consumer takes nothing more.
    let mut consumer = connect(&server)
        .await
        .consume("stuck", manual(5))
        .await
        .unwrap();
    // 2,000 publish calls: were each held for one flow window (10 ms), this would take 20 s.
    let n_batches = 2_000;
    tokio::time::timeout(DEADLINE, publish(&client, "stuck", n_batches))
        .await
        .expect("the publisher is held once, not for every batch");
    let stats = client.queue_stats("stuck").await.unwrap();
    assert_eq!(stats.ready, (n_batches * BATCH) as u64 - 5);
    assert_eq!(stats.unacked, 5);
    let first = tokio::time::timeout(DEADLINE, consumer.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(&first.body()[..], b"m0");
}

#[tokio::test]
async fn a_job_queue_whose_workers_take_slowly_does_not_hold_its_producer() {
    let server = start(LIMIT).await;
    let client = connect(&server).await;
    client.declare_queue("jobs").await.unwrap();
    let mut worker = connect(&server)
        .await
        .consume("jobs", manual(1))
        .await
        .unwrap();
    // The worker finishes a job every 10 publish calls: it keeps taking, far too slowly to
    // drain the backlog. Held for a window (10 ms) after each job, the producer would need
    // 20 s for its 2,000 calls; it is held for one window per second at most.
    let publisher = client.publisher_with_window(BATCH as u32);
    let n_batches = 2_000;
    let work = async {
        for batch in 0..n_batches {
            let messages = (0..BATCH).map(|_| Message::new("job")).collect();
            for outcome in publisher.publish_batch("", "jobs", messages).await.unwrap() {
                outcome.expect("confirmed");
            }
            if batch % 10 == 9 {
                let job = worker.next().await.unwrap().unwrap();
                job.ack().await.unwrap();
            }
        }
    };
    tokio::time::timeout(DEADLINE, work)
        .await
        .expect("the producer is not held to the workers' pace");
    let stats = client.queue_stats("jobs").await.unwrap();
    let acked = (n_batches / 10) as u64;
    assert_eq!(
        stats.ready + stats.unacked,
        (n_batches * BATCH) as u64 - acked
    );
}

#[tokio::test]
async fn a_queue_without_consumers_never_holds_its_publisher() {
    let server = start(LIMIT).await;
    let client = connect(&server).await;
    client.declare_queue("store").await.unwrap();
    let n_batches = 2_000;
    tokio::time::timeout(DEADLINE, publish(&client, "store", n_batches))
        .await
        .expect("never held");
    assert_eq!(
        client.queue_stats("store").await.unwrap().ready,
        (n_batches * BATCH) as u64
    );
}

#[tokio::test]
async fn a_held_publisher_is_released_when_its_consumers_leave() {
    let server = start(LIMIT).await;
    let client = connect(&server).await;
    client.declare_queue("left").await.unwrap();
    let consumer_client = connect(&server).await;
    let mut consumer = consumer_client.consume("left", manual(1)).await.unwrap();
    // Keep the consumer taking slowly until the backlog is over the limit, then close it.
    let publishing = {
        let client = client.clone();
        tokio::spawn(async move { publish(&client, "left", 300).await })
    };
    loop {
        let delivery = tokio::time::timeout(DEADLINE, consumer.next())
            .await
            .expect("deliveries keep coming")
            .unwrap()
            .unwrap();
        delivery.ack().await.unwrap();
        if client.queue_stats("left").await.unwrap().ready > LIMIT {
            break;
        }
    }
    drop(consumer);
    consumer_client.close().await.unwrap();
    tokio::time::timeout(DEADLINE, publishing)
        .await
        .expect("the publisher resumes once no consumer is left")
        .unwrap();
    assert_eq!(client.queue_stats("left").await.unwrap().consumers, 0);
}
