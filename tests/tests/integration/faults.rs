//! A driver is code that can have bugs: a panic in one driver's method ends that call with
//! INTERNAL and terminates that one service, whatever transport carried the call (the ring's
//! thread included); the broker, its other services and their sessions carry on. The `fault`
//! driver exists only in the test suite's broker (`cargo xtask test` builds it with the
//! `fault-injection` feature).

use portcullis_client::{ClientError, OpenMode, Status, matching, native::NativeSession, pb, ring::RingClient};
use portcullis_proto::{frame::Event, layout::AbiId};
use portcullis_tests::{Broker, BrokerSetup};

const CONFIG: &str = "[[device]]\nname = \"sample0\"\ndriver = \"sample\"\n\n[[device]]\nname = \"fault_grpc\"\ndriver = \"fault\"\n\n[[device]]\nname = \"fault_async\"\ndriver = \"fault\"\n\n[[device]]\nname = \"fault_native\"\ndriver = \"fault\"\n\n[[device]]\nname = \"fault_ring\"\ndriver = \"fault\"\n";

const POLICY: &str = "[[principal]]\nname = \"all\"\n\n[[rule]]\nid = \"all\"\neffect = \"allow\"\nprincipals = [\"all\"]\nmethods = [\"*\"]\n";

fn internal(e: &ClientError) -> bool {
    matches!(e, ClientError::Refused { status: Status::Internal, message, .. } if message.contains("the service was terminated"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_panicking_driver_ends_its_call_and_its_service_and_nothing_else() {
    let broker = Broker::with(BrokerSetup {
        config: Some(CONFIG),
        policy: Some(POLICY),
        ..BrokerSetup::default()
    });
    let baseline = broker.baseline_fds();
    let client = broker.client().await;
    let watcher = client.session().await.unwrap();
    watcher.subscribe(&[]).await.unwrap();
    let (bystander, sample) = broker.open("sample0", OpenMode::Shared).await;

    // gRPC, a synchronous method.
    let session = client.session().await.unwrap();
    let fault = session.find_one(matching::by_name("fault_grpc")).await.unwrap();
    let uc = session.open(fault.id, OpenMode::Shared).await.unwrap();
    assert_eq!(session.call_named(&uc, "ok", &[], &[]).await.unwrap().scalars, vec![1]);
    let failed = session.call_named(&uc, "panic", &[], &[]).await.unwrap_err();
    assert!(internal(&failed), "{failed}");
    let closed = session.next_event().await.unwrap();
    assert!(
        matches!(&closed.kind, Some(pb::event::Kind::UserClientClosed(c)) if c.handle == uc.handle && c.status == Status::NoDevice as i32),
        "{closed:?}"
    );
    assert_eq!(
        session.call_named(&uc, "ok", &[], &[]).await.unwrap_err().status(),
        Some(Status::NotOpen)
    );

    // gRPC, an asynchronous method whose completion panics on a runtime task.
    let fault = session.find_one(matching::by_name("fault_async")).await.unwrap();
    let uc = session.open(fault.id, OpenMode::Shared).await.unwrap();
    let failed = session.call_named(&uc, "panic_later", &[], &[]).await.unwrap_err();
    assert!(internal(&failed), "{failed}");

    // The native socket.
    let mut native = NativeSession::connect(broker.run_dir(), AbiId::native()).await.unwrap();
    let fault = native.find("fault_native").await.unwrap().remove(0);
    let handle = native.open(fault.id, false).await.unwrap();
    let failed = native.call(handle, 1, &[], &[], 0).await.unwrap_err();
    assert!(internal(&failed), "{failed}");
    assert!(
        native
            .take_events()
            .iter()
            .any(|e| matches!(e, Event::UserClientClosed { handle: h, .. } if *h == handle)),
        "the native client is told its user client closed"
    );

    // The ring: the call runs on the ring's own thread.
    let run_dir = broker.run_dir();
    let ring_failure = tokio::task::spawn_blocking(move || {
        let mut ring = RingClient::connect(run_dir, Default::default()).unwrap();
        let fault = ring.find("fault_ring").unwrap().remove(0);
        let handle = ring.open(fault.id, false).unwrap();
        ring.call(handle, 1, &[], &[], 0).unwrap_err()
    })
    .await
    .unwrap();
    assert!(internal(&ring_failure), "{ring_failure}");

    // Every faulty service is gone, and said so; everything else carries on.
    let mut terminated = Vec::new();
    while terminated.len() < 4 {
        if let Some(pb::event::Kind::Terminated(t)) = watcher.next_event().await.unwrap().kind {
            terminated.push(t.name);
        }
    }
    terminated.sort();
    assert_eq!(terminated, ["fault_async", "fault_grpc", "fault_native", "fault_ring"]);
    assert_eq!(
        bystander
            .call_named(&sample, "add", &[2, 3], &[])
            .await
            .unwrap()
            .scalars,
        vec![5]
    );
    let names: Vec<String> = client
        .list_services(matching::all())
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert!(
        names.contains(&"sample0".to_string()) && !names.iter().any(|n| n.starts_with("fault")),
        "{names:?}"
    );
    assert!(broker.is_running_ref());
    assert!(broker.log().contains("a driver panicked: the service is terminated"));
    drop((session, native, bystander, watcher, client));
    broker.assert_no_leaks(baseline);
}
