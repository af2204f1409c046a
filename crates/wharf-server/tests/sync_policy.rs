//! A durable queue's own sync policy (`x-sync`) overrides the broker's: the log record of a
//! persistent message is fsynced as the strongest policy of the queues it entered asks, and
//! the confirm says which it was (docs/durability.md, "The promise").

mod common;

use std::path::Path;
use std::sync::Arc;
use wharf_client::{Client, Durability, ExchangeKind, Message};
use wharf_server::{RunningServer, ServerConfig};
use wharf_storage::{MemStorage, SyncPolicy};

async fn start_on(mem: &MemStorage, dir: &Path, policy: SyncPolicy) -> RunningServer {
    let mut config = ServerConfig::ephemeral(dir);
    config.sync_policy = policy;
    RunningServer::start_with_storage(config, Arc::new(mem.clone()))
        .await
        .expect("server starts")
}

async fn connect(server: &RunningServer) -> Client {
    Client::connect(&server.addr.to_string())
        .await
        .expect("connect")
}

async fn publish(client: &Client, exchange: &str, key: &str, body: &str) -> Durability {
    client
        .publish(
            exchange,
            key,
            Message::new(body.to_owned()).persistent(true),
        )
        .await
        .expect("confirmed")
}

#[tokio::test]
async fn a_queue_can_relax_the_broker_s_policy_but_never_weaken_another_queue_s() {
    let dir = tempfile::tempdir().unwrap();
    let mem = MemStorage::new(11);
    let server = start_on(&mem, dir.path(), SyncPolicy::Always).await;
    let client = connect(&server).await;
    client.declare_queue("strict").durable(true).await.unwrap();
    client
        .declare_queue("relaxed")
        .durable(true)
        .argument("x-sync", "never")
        .await
        .unwrap();
    client
        .declare_queue("soon")
        .durable(true)
        .argument("x-sync", "interval=50")
        .await
        .unwrap();
    client
        .declare_exchange("both", ExchangeKind::Fanout)
        .durable(true)
        .await
        .unwrap();
    client.bind_queue("strict", "both", "").await.unwrap();
    client.bind_queue("relaxed", "both", "").await.unwrap();
    let syncs = mem.sync_count();
    assert_eq!(
        publish(&client, "", "relaxed", "a").await,
        Durability::UnsafeNotSynced,
        "x-sync = never: confirmed after the write"
    );
    assert_eq!(
        publish(&client, "", "soon", "b").await,
        Durability::UnsafeNotSynced,
        "x-sync = interval: confirmed after the write"
    );
    assert_eq!(mem.sync_count(), syncs, "neither waited for an fsync");
    assert_eq!(
        publish(&client, "", "strict", "c").await,
        Durability::Fsynced
    );
    assert_eq!(
        publish(&client, "both", "", "d").await,
        Durability::Fsynced,
        "a message in a strict and a relaxed queue is fsynced"
    );
    client.close().await.unwrap();
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_queue_that_syncs_always_keeps_its_confirmed_messages_through_a_power_cut_under_a_broker_that_never_syncs()
 {
    let dir = tempfile::tempdir().unwrap();
    let mem = MemStorage::new(12);
    let server = start_on(&mem, dir.path(), SyncPolicy::Never).await;
    let client = connect(&server).await;
    client
        .declare_queue("safe")
        .durable(true)
        .argument("x-sync", "always")
        .await
        .unwrap();
    for idx in 0..20 {
        assert_eq!(
            publish(&client, "", "safe", &format!("m{idx}")).await,
            Durability::Fsynced
        );
    }
    // The power goes now: nothing more is written, unsynced writes may be lost or torn.
    let disk = mem.deep_clone();
    disk.crash();
    client.close().await.unwrap();
    server.stop().await.unwrap();
    let server = start_on(&disk, dir.path(), SyncPolicy::Never).await;
    let client = connect(&server).await;
    assert_eq!(client.queue_stats("safe").await.unwrap().ready, 20);
    client.close().await.unwrap();
    server.stop().await.unwrap();
}
