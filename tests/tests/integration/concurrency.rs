//! Many clients at once: 100 connections × 1,000 `add` calls, zero errors, every answer right.

use portcullis_tests::{
    Broker,
    client::{Client, OpenMode, matching},
};

const CONNECTIONS: u64 = 100;
const CALLS: u64 = 1_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_connections_thousand_adds_each() {
    let broker = Broker::start();
    let mut tasks = Vec::new();
    for c in 0..CONNECTIONS {
        // A connection of its own for each client.
        let client = Client::connect(broker.run_dir()).await.unwrap();
        tasks.push(tokio::spawn(async move {
            let session = client.session().await.unwrap();
            let sample = session.find_one(matching::by_name("sample0")).await.unwrap();
            let uc = session.open(sample.id, OpenMode::Shared).await.unwrap();
            let mut wrong = 0u64;
            for i in 0..CALLS {
                let (a, b) = (c << 32 | i, u64::MAX - i);
                let out = session.call_named(&uc, "add", &[a, b], &[]).await.unwrap();
                if out.scalars != [a.wrapping_add(b)] {
                    wrong += 1;
                }
            }
            wrong
        }));
    }
    let mut wrong = 0;
    for t in tasks {
        wrong += t.await.unwrap();
    }
    assert_eq!(wrong, 0, "wrong answers");
    // Every call was served: get_info counts them.
    let (session, uc) = broker.open("sample0", OpenMode::Shared).await;
    let info = session.call_named(&uc, "get_info", &[], &[]).await.unwrap().struct_out;
    assert_eq!(
        u64::from_ne_bytes(info[8..16].try_into().unwrap()),
        CONNECTIONS * CALLS + 1
    );
}
