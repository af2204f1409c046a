//! A `wharf` client process killed with SIGKILL: the broker requeues what it held (moved here
//! from the server's e2e tests, since it runs the `wharf` binary).

mod common;

use common::{DEADLINE, TestServer};
use std::time::Duration;
use wharf_client::{Client, ConsumeOptions, Message};

#[tokio::test]
async fn a_killed_client_process_gets_its_unacked_messages_redelivered_to_others() {
    let server = TestServer::start().await;
    let client = Client::connect(&server.addr().to_string())
        .await
        .expect("connect");
    client.declare_queue("jobs").await.unwrap();
    for idx in 0..3 {
        client
            .publish("", "jobs", Message::new(format!("job-{idx}")))
            .await
            .unwrap();
    }
    // Another process takes the messages without acking them and is killed with SIGKILL.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_wharf"))
        .args(["consume", "jobs", "--prefetch", "10", "--server"])
        .arg(server.addr().to_string())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn a consuming client process");
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while client.queue_stats("jobs").await.unwrap().unacked != 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the child never took the messages"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    child.kill().expect("kill -9");
    child.wait().expect("reaped");
    // The broker sees the socket close and requeues; another consumer gets them, flagged.
    let manual = ConsumeOptions {
        prefetch: 10,
        auto_ack: false,
        ..ConsumeOptions::default()
    };
    let mut consumer = client.consume("jobs", manual).await.unwrap();
    for idx in 0..3 {
        let delivery = tokio::time::timeout(DEADLINE, consumer.next())
            .await
            .expect("a delivery within the deadline")
            .expect("stream open")
            .expect("delivery ok");
        assert_eq!(delivery.body(), format!("job-{idx}").as_bytes());
        assert!(delivery.redelivered());
        delivery.ack().await.unwrap();
    }
}
