//! Store faults that need no NATS: the client points at a closed port, so everything goes to
//! the backing store.

use std::time::{Duration, Instant};

use auditbridge_client::{
    Backpressure, Client, EventBuilder, FileParams, Outcome, RecordError, StoreConfig,
};

fn event(i: usize) -> auditbridge_client::Event {
    EventBuilder::new("acme", "user.login")
        .actor(format!("u-{i}"))
        .outcome(Outcome::Success)
        .source("store-faults")
        .build()
        .unwrap()
}

fn closed_port_url() -> String {
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    format!("nats://{addr}")
}

/// The file store's directory is deleted under a running client, so every segment rotation
/// fails with an I/O error. That is a failing store, retried — not a full one: the refusal
/// says `StoreFailing`, nothing is counted as stored that was not, and once the directory is
/// back the held events are written and `record` accepts again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_store_is_retried_and_not_reported_full() {
    let dir = std::env::temp_dir().join(format!(
        "abclient-faults-{}",
        auditbridge_client::Uuid::now_v7().simple()
    ));
    let mut params = FileParams::new(&dir);
    params.segment_bytes = 1; // every write after the first in a segment rotates
    let client = Client::builder()
        .nats_url(closed_port_url())
        .store(StoreConfig::File(params))
        .queue_capacity(10)
        .max_in_flight(4)
        .drain_batch(4)
        .connect()
        .await
        .unwrap();

    client.record(event(0)).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while client.stats().buffered_events < 1 {
        assert!(Instant::now() < deadline, "{:?}", client.stats());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    std::fs::remove_dir_all(&dir).unwrap();

    let mut refusal = None;
    for i in 1..200 {
        match client.record(event(i)).await {
            Ok(()) => tokio::time::sleep(Duration::from_millis(2)).await,
            Err(e) => {
                refusal = Some(e);
                break;
            }
        }
    }
    let stats = client.stats();
    match refusal {
        Some(RecordError::Full {
            cause: Backpressure::StoreFailing,
            ..
        }) => {}
        other => panic!("expected Full(StoreFailing), got {other:?}; {stats:?}"),
    }
    assert!(stats.store_errors > 0, "{stats:?}");
    assert_eq!(
        stats.buffered_events, 1,
        "nothing more was stored: {stats:?}"
    );

    // The directory comes back: the retry succeeds, the held events are stored.
    std::fs::create_dir_all(&dir).unwrap();
    let accepted = stats.accepted_events;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let s = client.stats();
        if s.buffered_events == accepted {
            break;
        }
        assert!(Instant::now() < deadline, "held events never stored: {s:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    client.record(event(1000)).await.unwrap();
    let err = client.close(Duration::from_secs(1)).await.unwrap_err();
    assert!(
        matches!(
            err,
            auditbridge_client::CloseError::Unpublished { durable: true, .. }
        ),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
