//! Discovery, open, every sample method, close; `watch` sees the asynchronous completion; a
//! session's end releases its pending calls.

use std::{
    io::{BufRead, BufReader},
    process::Stdio,
    time::Duration,
};

use portcullis_tests::{
    Broker,
    client::{OpenMode, Status, matching, pb},
    stdout_ok,
};

#[test]
fn cli_ls_shows_registry_tree_and_json() {
    let broker = Broker::start();
    let tree = stdout_ok(&broker.cli(&["ls"]));
    assert!(tree.contains("+-o Root  <class Root, id 1>"), "{tree}");
    // Root has two buses, the virtual one and the kernel's (whose nubs an administrator sees),
    // and the broker's power domain.
    assert!(tree.contains("| +-o vbus0  <class VirtualBus, id 2>"), "{tree}");
    assert!(tree.contains("|   +-o sample0  <class SampleDevice, id 3>"), "{tree}");
    assert!(tree.contains("| +-o power  <class PowerDomain, id 4>"), "{tree}");
    assert!(
        tree.contains("get_state(0) prevent_sleep(1, async, needs power.assert)"),
        "{tree}"
    );
    assert!(tree.contains("  +-o kernel0  <class KernelBus, id 5>"), "{tree}");
    assert!(tree.contains("+-o net/lo  <class NetNub"), "{tree}");
    assert!(tree.contains("reset(5, needs sample.admin)"), "{tree}");
    let json: serde_json::Value = serde_json::from_str(&stdout_ok(&broker.cli(&["ls", "--json"]))).unwrap();
    let sample = json
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "sample0")
        .unwrap();
    assert_eq!(sample["class"], "SampleDevice");
    assert_eq!(sample["parent"], 2);
    assert_eq!(sample["properties"]["model"], "demo");
    assert_eq!(sample["methods"][1]["struct_in"], serde_json::json!([0, 4096]));
}

#[test]
fn cli_call_add_prints_sum() {
    let broker = Broker::start();
    assert_eq!(
        stdout_ok(&broker.cli(&["call", "sample0", "add", "--scalar", "2", "--scalar", "3"])),
        "5\n"
    );
    // By id and selector too.
    assert_eq!(
        stdout_ok(&broker.cli(&["call", "3", "0", "--scalar", "-1", "--scalar", "2"])),
        "1\n"
    );
    let json: serde_json::Value = serde_json::from_str(&stdout_ok(&broker.cli(&[
        "call",
        "sample0",
        "echo",
        "--struct-hex",
        "00ff",
        "--json",
    ])))
    .unwrap();
    assert_eq!(json["struct_out"], "00ff");
}

#[tokio::test]
async fn session_every_sample_method_then_close() {
    let broker = Broker::start();
    let client = broker.client().await;
    let listed = client.list_services(matching::all()).await.unwrap();
    assert_eq!(
        listed.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
        ["Root", "vbus0", "sample0", "power"]
    );

    let session = client.session().await.unwrap();
    let found = session.find_services(matching::by_class("SampleDevice")).await.unwrap();
    assert_eq!(found.len(), 1);
    let sample = session.open(found[0].id, OpenMode::Shared).await.unwrap();
    assert_eq!(
        sample.privileges,
        vec!["sample.admin".to_string()],
        "root holds the admin privilege"
    );

    let add = session.call_named(&sample, "add", &[u64::MAX, 3], &[]).await.unwrap();
    assert_eq!(add.scalars, vec![2], "add wraps");

    let payload: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
    assert_eq!(
        session
            .call_named(&sample, "echo", &[], &payload)
            .await
            .unwrap()
            .struct_out,
        payload
    );
    assert!(
        session
            .call_named(&sample, "echo", &[], &[])
            .await
            .unwrap()
            .struct_out
            .is_empty()
    );

    let info = session
        .call_named(&sample, "get_info", &[], &[])
        .await
        .unwrap()
        .struct_out;
    assert_eq!(info.len(), 16);
    assert_eq!(u32::from_ne_bytes(info[0..4].try_into().unwrap()), 1, "version");
    assert_eq!(u32::from_ne_bytes(info[4..8].try_into().unwrap()), 1, "current opens");
    assert_eq!(
        u64::from_ne_bytes(info[8..16].try_into().unwrap()),
        4,
        "calls served before get_info, plus itself"
    );

    // wait_event completes with fire_event's value; a second session fires it.
    let waiting = session.call_named(&sample, "wait_event", &[10_000], &[]);
    let firer = client.session().await.unwrap();
    let fire_handle = firer.open(sample.service.id, OpenMode::Shared).await.unwrap();
    let fire = async {
        // Fire until the waiter is registered (fire_event reports how many it completed).
        loop {
            let completed = firer
                .call_named(&fire_handle, "fire_event", &[99], &[])
                .await
                .unwrap()
                .scalars[0];
            if completed == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    let (waited, ()) = tokio::join!(waiting, fire);
    assert_eq!(waited.unwrap().scalars, vec![99]);

    // wait_event times out with Timeout.
    let timeout = session.call_named(&sample, "wait_event", &[20], &[]).await.unwrap_err();
    assert_eq!(timeout.status(), Some(Status::Timeout));

    // reset (root holds sample.admin) zeroes calls served.
    session.call_named(&sample, "reset", &[], &[]).await.unwrap();
    let info = session
        .call_named(&sample, "get_info", &[], &[])
        .await
        .unwrap()
        .struct_out;
    assert_eq!(u64::from_ne_bytes(info[8..16].try_into().unwrap()), 1);
    assert_eq!(
        u32::from_ne_bytes(info[4..8].try_into().unwrap()),
        2,
        "two user clients open"
    );

    session.close(&sample).await.unwrap();
    let closed = session.call_named(&sample, "add", &[1, 1], &[]).await.unwrap_err();
    assert_eq!(closed.status(), Some(Status::NotOpen));
    assert_eq!(
        session.close(&sample).await.unwrap_err().status(),
        Some(Status::NotOpen)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn closing_user_client_aborts_its_pending_call() {
    let broker = Broker::start();
    let (session, uc) = broker.open("sample0", OpenMode::Shared).await;
    let other = session.open(uc.service.id, OpenMode::Shared).await.unwrap();
    let waiting = session.call_named(&uc, "wait_event", &[60_000], &[]);
    let close = async {
        // Close once the call is waiting in the driver (not before it arrived).
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while broker.stats()["driver_waiting"] != 1 {
            assert!(std::time::Instant::now() < deadline, "wait_event never pended");
            tokio::task::yield_now().await;
        }
        session.close(&uc).await.unwrap();
    };
    let (waited, ()) = tokio::join!(waiting, close);
    assert_eq!(waited.unwrap_err().status(), Some(Status::Aborted));
    // The aborted waiter is gone from the device: firing completes nobody.
    assert_eq!(
        session
            .call_named(&other, "fire_event", &[1], &[])
            .await
            .unwrap()
            .scalars,
        vec![0]
    );
}

#[tokio::test]
async fn session_end_releases_pending_calls() {
    let broker = Broker::start();
    let client = broker.client().await;
    let firer = client.session().await.unwrap();
    let sample = firer.find_one(matching::by_name("sample0")).await.unwrap();
    let fire_uc = firer.open(sample.id, OpenMode::Shared).await.unwrap();
    {
        let doomed = client.session().await.unwrap();
        let uc = doomed.open(sample.id, OpenMode::Shared).await.unwrap();
        let request = pb::client_message::Request::Call(pb::CallMethod {
            handle: uc.handle,
            selector: 3,
            scalars: vec![60_000],
            struct_in: vec![],
            struct_out_len: 0,
        });
        // Start the asynchronous call, then end the session without waiting for it.
        let pending = tokio::time::timeout(Duration::from_millis(200), doomed.request(request)).await;
        assert!(pending.is_err(), "wait_event must still be pending");
    }
    // The broker released the dead session's waiter: no one is completed, the opens are gone.
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    loop {
        let info = firer
            .call_named(&fire_uc, "get_info", &[], &[])
            .await
            .unwrap()
            .struct_out;
        // The user client goes at once; its pending call's waiter goes when the call's task
        // sees the cancellation, a moment later.
        if u32::from_ne_bytes(info[4..8].try_into().unwrap()) == 1 && broker.stats()["driver_waiting"] == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the dead session's user client was not released"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        firer
            .call_named(&fire_uc, "fire_event", &[5], &[])
            .await
            .unwrap()
            .scalars,
        vec![0]
    );
}

#[tokio::test]
async fn cli_watch_sees_async_completion() {
    let broker = Broker::start();
    let mut watch = broker
        .cli_command(portcullis_tests::bin(), &["watch", "sample0", "--count", "1", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until watch has subscribed.
    let mut stderr = BufReader::new(watch.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "watching sample0");

    let (session, uc) = broker.open("sample0", OpenMode::Shared).await;
    // Requests of one session are dispatched in order: the wait is registered before the fire.
    let (waited, fired) = tokio::join!(
        session.call_named(&uc, "wait_event", &[10_000], &[]),
        session.call_named(&uc, "fire_event", &[42], &[])
    );
    assert_eq!(waited.unwrap().scalars, vec![42]);
    assert_eq!(fired.unwrap().scalars, vec![1]);

    let out = tokio::task::spawn_blocking(move || watch.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    let event: serde_json::Value = serde_json::from_str(stdout.lines().next().unwrap()).unwrap();
    assert_eq!(event["event"], "notification");
    assert_eq!(event["service"], "sample0");
    assert_eq!(event["value"], 42);
    assert_eq!(event["detail"], "completed 1 waiter(s)");
    assert!(out.status.success());
}
