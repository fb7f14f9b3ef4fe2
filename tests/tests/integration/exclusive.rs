//! Exclusive opens: a second exclusive opener is refused; the holder's death frees the service.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use portcullis_tests::{
    Broker,
    client::{OpenMode, Status, matching},
};

#[tokio::test]
async fn exclusive_second_opener_refused_until_holder_is_killed() {
    let broker = Broker::start();
    let mut holder = Command::new(env!("CARGO_BIN_EXE_holder"))
        .arg(broker.run_dir())
        .arg("sample0")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(holder.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "held");

    let client = broker.client().await;
    let session = client.session().await.unwrap();
    let sample = session.find_one(matching::by_name("sample0")).await.unwrap();
    let refused = session.open(sample.id, OpenMode::Exclusive).await.unwrap_err();
    assert_eq!(refused.status(), Some(Status::ExclusiveAccess), "{refused}");
    let shared = session.open(sample.id, OpenMode::Shared).await.unwrap_err();
    assert_eq!(
        shared.status(),
        Some(Status::ExclusiveAccess),
        "a shared open is refused too while exclusive is held"
    );

    // SIGKILL: no chance to close anything. The broker must notice the dead connection.
    holder.kill().unwrap();
    holder.wait().unwrap();
    // The kernel closes the dead process's socket; the broker sees the end of the connection
    // and releases the open. Wait for that event (the bound only catches a broker that never
    // notices).
    let killed_at = Instant::now();
    let reopened = loop {
        match session.open(sample.id, OpenMode::Exclusive).await {
            Ok(uc) => break uc,
            Err(e) => assert_eq!(e.status(), Some(Status::ExclusiveAccess), "{e}"),
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(20),
            "service still held 20 s after the holder was killed"
        );
        tokio::task::yield_now().await;
    };
    assert_eq!(
        session
            .call_named(&reopened, "add", &[1, 2], &[])
            .await
            .unwrap()
            .scalars,
        vec![3]
    );
}

#[tokio::test]
async fn exclusive_refused_while_shared_open_and_granted_after_close() {
    let broker = Broker::start();
    let client = broker.client().await;
    let a = client.session().await.unwrap();
    let b = client.session().await.unwrap();
    let sample = a.find_one(matching::by_name("sample0")).await.unwrap();
    let shared = a.open(sample.id, OpenMode::Shared).await.unwrap();
    assert_eq!(
        b.open(sample.id, OpenMode::Exclusive).await.unwrap_err().status(),
        Some(Status::ExclusiveAccess)
    );
    a.close(&shared).await.unwrap();
    let exclusive = b.open(sample.id, OpenMode::Exclusive).await.unwrap();
    assert_eq!(
        b.call_named(&exclusive, "add", &[2, 2], &[]).await.unwrap().scalars,
        vec![4]
    );
}
