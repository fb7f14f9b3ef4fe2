//! Sleep and wake as `portcullis power sleep|wake` gives them (the same path logind's
//! PrepareForSleep takes): every client told, calls held until wake, sessions, opens and
//! mappings kept, and real devices finishing before sleep and restored on wake — a pty's line
//! settings, a loop device's flush, a TUN interface's configuration.

use std::time::{Duration, Instant};

use portcullis_client::{OpenMode, Session, Status, native::NativeSession, pb};
use portcullis_proto::{frame::Event as NativeEvent, layout::AbiId};
use portcullis_tests::{Broker, BrokerSetup, LoopDevice, run_ok};

use pb::power_request::Action;

const SAMPLE: &str = "[[device]]\nname = \"sample0\"\ndriver = \"sample\"\n";

async fn power(broker: &Broker, action: Action) -> pb::PowerStatus {
    broker.client().await.power(action).await.unwrap()
}

/// The next event of `session` that `want` accepts (others are skipped), within 30 s.
async fn next_event(session: &Session, want: impl Fn(&pb::event::Kind) -> bool) -> pb::event::Kind {
    loop {
        let event = tokio::time::timeout(Duration::from_secs(30), session.next_event())
            .await
            .expect("no such event within 30 s")
            .expect("the session ended");
        if let Some(kind) = event.kind
            && want(&kind)
        {
            return kind;
        }
    }
}

/// Sends requests on `session` until it has been told `want` (a native client hears events
/// when it reads), within 30 s.
async fn native_hears(session: &mut NativeSession, want: NativeEvent) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        session.find("sample0").await.unwrap();
        if session.take_events().contains(&want) {
            return;
        }
        assert!(Instant::now() < deadline, "the native client was not told {want:?}");
    }
}

/// Polls the broker until `stats` satisfies `done`, driving `pending` so that it cannot be
/// answered unseen (it must not be answered first), within 30 s.
async fn until_stats<F>(broker: &Broker, mut pending: std::pin::Pin<&mut F>, done: impl Fn(&serde_json::Value) -> bool)
where
    F: std::future::Future,
    F::Output: std::fmt::Debug,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        tokio::select! {
            early = &mut pending => panic!("answered while the devices slept: {early:?}"),
            () = tokio::task::yield_now() => {}
        }
        let stats = broker.stats();
        if done(&stats) {
            return;
        }
        assert!(Instant::now() < deadline, "never came to pass: {stats}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sleep_holds_calls_until_wake_tells_every_client_and_keeps_their_sessions() {
    let broker = Broker::with(BrokerSetup {
        config: Some(SAMPLE),
        ..BrokerSetup::default()
    });
    let baseline = broker.baseline_fds();
    let (session, sample) = broker.open("sample0", OpenMode::Shared).await;
    let mut native = NativeSession::connect(broker.run_dir(), AbiId::native()).await.unwrap();
    let id = native.find("sample0").await.unwrap().remove(0).id;
    let handle = native.open(id, false).await.unwrap();

    let asleep = power(&broker, Action::Sleep).await;
    assert!(asleep.asleep);
    assert_eq!((asleep.sleeps, asleep.last_source.as_str()), (1, "admin"));
    assert!(asleep.order.contains(&"sample0".to_string()), "{asleep:?}");
    assert!(asleep.failures.is_empty(), "{:?}", asleep.failures);
    next_event(&session, |k| matches!(k, pb::event::Kind::WillSleep(_))).await;
    native_hears(&mut native, NativeEvent::WillSleep).await;
    // Sleeping twice is one sleep.
    assert_eq!(power(&broker, Action::Sleep).await.sleeps, 1);

    // A call now waits for wake: counted as waiting, not answered.
    let call = Box::pin(session.call_named(&sample, "add", &[2, 3], &[]));
    let mut call = call;
    until_stats(&broker, call.as_mut(), |s| s["power"]["waiting_calls"] == 1).await;
    assert_eq!(broker.stats()["pending_calls"], 1);

    let awake = power(&broker, Action::Wake).await;
    assert!(!awake.asleep);
    assert_eq!((awake.sleeps, awake.wakes), (1, 1));
    let mut down = asleep.order.clone();
    down.reverse();
    assert_eq!(awake.order, down, "wake runs the drivers in the reverse order of sleep");
    assert_eq!(
        call.await.unwrap().scalars,
        vec![5],
        "the call ran once the devices woke"
    );
    next_event(&session, |k| matches!(k, pb::event::Kind::HasWoken(_))).await;
    native_hears(&mut native, NativeEvent::HasWoken).await;

    // Nothing was lost over the sleep: the user client still answers, the native client opens.
    assert_eq!(
        session
            .call_named(&sample, "add", &[20, 22], &[])
            .await
            .unwrap()
            .scalars,
        vec![42]
    );
    let stats = broker.stats();
    assert_eq!(
        (stats["sessions"].as_u64(), stats["power"]["waiting_calls"].as_u64()),
        (Some(2), Some(0))
    );
    assert_eq!(native.call(handle, 0, &[1, 1], &[], 0).await.unwrap().scalars, vec![2]);
    drop((session, native));
    broker.assert_no_leaks(baseline);
}

#[tokio::test(flavor = "multi_thread")]
async fn mappings_survive_sleep_and_a_call_that_cannot_wait_is_refused_asleep() {
    let config = format!("{SAMPLE}[power]\ncall_wait_ms = 0\n");
    let broker = Broker::with(BrokerSetup {
        config: Some(&config),
        ..BrokerSetup::default()
    });
    let mut native = NativeSession::connect(broker.run_dir(), AbiId::native()).await.unwrap();
    let id = native.find("sample0").await.unwrap().remove(0).id;
    let handle = native.open(id, true).await.unwrap();
    let dma = native.map_memory(handle, 1).await.unwrap();
    rustix::io::pwrite(&dma.fd, b"kept over the sleep", 0).unwrap();

    power(&broker, Action::Sleep).await;
    let refused = native.call(handle, 0, &[1, 2], &[], 0).await.unwrap_err();
    assert_eq!(refused.status(), Some(Status::Asleep), "{refused}");
    power(&broker, Action::Wake).await;

    // checksum_dma(offset 0, len 19) reads what the client wrote before the sleep.
    let sum = native.call(handle, 8, &[0, 19], &[], 0).await.unwrap().scalars;
    assert_eq!(sum, vec![portcullis_tests::fnv1a(b"kept over the sleep")]);
}

#[tokio::test(flavor = "multi_thread")]
async fn only_an_administrator_sleeps_the_devices() {
    let broker = Broker::with(BrokerSetup {
        config: Some(SAMPLE),
        ..BrokerSetup::default()
    });
    let out = broker.cli_as(portcullis_tests::NOBODY, &["power", "sleep"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("only root or the broker's own user"), "{stderr}");
    assert!(!power(&broker, Action::Status).await.asleep);
    // Root's command line does it, and says what it did.
    let out = portcullis_tests::stdout_ok(&broker.cli(&["power", "sleep"]));
    assert!(out.contains("asleep") && out.contains("sample0"), "{out}");
    let out = portcullis_tests::stdout_ok(&broker.cli(&["power", "wake", "--json"]));
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (status["asleep"].as_bool(), status["wakes"].as_u64()),
        (Some(false), Some(1))
    );
}

/// A pty pair: the master (the test's "hardware" end) and the follower's path.
fn pty() -> (std::os::fd::OwnedFd, std::path::PathBuf) {
    use rustix::pty::{OpenptFlags, grantpt, openpt, ptsname, unlockpt};
    let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC).unwrap();
    grantpt(&master).unwrap();
    unlockpt(&master).unwrap();
    let name = ptsname(&master, Vec::new()).unwrap();
    (master, std::path::PathBuf::from(name.to_str().unwrap()))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tty_drains_before_sleep_and_gets_its_line_settings_back_on_wake() {
    let (master, follower) = pty();
    let config = format!(
        "[[device]]\nname = \"tty0\"\ndriver = \"tty\"\npath = \"{}\"\n[power]\ndriver_timeout_ms = 300\n",
        follower.display()
    );
    let policy = "[[principal]]\nname = \"all\"\n[[rule]]\nid = \"tty\"\neffect = \"allow\"\nprincipals = [\"all\"]\nservice = { class = \"TtyDevice\" }\nmethods = [\"*\"]\n";
    let broker = Broker::with(BrokerSetup {
        config: Some(&config),
        policy: Some(policy),
        ..BrokerSetup::default()
    });
    let (session, tty) = broker.open("tty0", OpenMode::Shared).await;
    let session = std::sync::Arc::new(session);
    let mut line = session.tty_get_line(&tty).await.unwrap();
    line.baud = 57_600;
    session.tty_set_line(&tty, line).await.unwrap();

    // Writes the hardware has not taken (nobody reads the master): the sleep waits for them,
    // then says they could not finish.
    const WRITES: usize = 64;
    let writer = {
        let (session, tty) = (session.clone(), tty.clone());
        tokio::spawn(async move {
            for _ in 0..WRITES {
                session
                    .call_named(&tty, "write", &[60_000], &[0x55; 4096])
                    .await
                    .unwrap();
            }
        })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while broker.stats()["driver_waiting"] != 1 {
        assert!(!writer.is_finished(), "the pty took every write");
        assert!(std::time::Instant::now() < deadline, "no write waited for the device");
    }
    let stuck = power(&broker, Action::Sleep).await;
    assert!(
        stuck
            .failures
            .iter()
            .any(|f| f.starts_with("tty0:") && f.contains("1 writes in progress")),
        "{:?}",
        stuck.failures
    );
    power(&broker, Action::Wake).await;
    let hardware = std::thread::spawn(move || {
        let mut got = 0;
        while got < WRITES * 4096 {
            let mut buf = [0u8; 4096];
            got += rustix::io::read(&master, &mut buf).unwrap();
        }
        master
    });
    writer.await.unwrap();
    let master = hardware.join().unwrap();

    // Drained: the sleep finishes clean. Meanwhile the device loses its settings (as a USB
    // serial adapter reset over a sleep would); wake sets them again.
    assert!(power(&broker, Action::Sleep).await.failures.is_empty());
    let mut lost = rustix::termios::tcgetattr(&master).unwrap();
    lost.set_speed(9600).unwrap();
    rustix::termios::tcsetattr(&master, rustix::termios::OptionalActions::Now, &lost).unwrap();
    assert_eq!(rustix::termios::tcgetattr(&master).unwrap().output_speed(), 9600);
    let awake = power(&broker, Action::Wake).await;
    assert!(awake.failures.is_empty(), "{:?}", awake.failures);
    assert_eq!(rustix::termios::tcgetattr(&master).unwrap().output_speed(), 57_600);
    assert_eq!(session.tty_get_line(&tty).await.unwrap().baud, 57_600);
}

/// Flush requests the block device has completed (field 16 of `/sys/block/<dev>/stat`).
fn flushes(device: &LoopDevice) -> u64 {
    let stat = std::fs::read_to_string(format!("/sys/block/{}/stat", device.name())).unwrap();
    stat.split_whitespace().nth(15).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_block_device_flushes_before_sleep() {
    let device = LoopDevice::attach(&vec![0u8; 1 << 20], false);
    let config = format!(
        "[[device]]\nname = \"disk0\"\ndriver = \"block\"\npath = \"{}\"\n",
        device.path.display()
    );
    let policy = "[[principal]]\nname = \"all\"\n[[rule]]\nid = \"disk\"\neffect = \"allow\"\nprincipals = [\"all\"]\nservice = { class = \"BlockDevice\" }\nmethods = [\"*\"]\nmemory = [\"dma\"]\nopen = \"exclusive\"\n";
    let broker = Broker::with(BrokerSetup {
        config: Some(&config),
        policy: Some(policy),
        ..BrokerSetup::default()
    });
    let mut s = NativeSession::connect(broker.run_dir(), AbiId::native()).await.unwrap();
    let id = s.find("disk0").await.unwrap().remove(0).id;
    let handle = s.open(id, true).await.unwrap();
    let dma = s.map_memory(handle, 0).await.unwrap();
    rustix::io::pwrite(&dma.fd, &[0xa5; 512], 0).unwrap();
    s.call(handle, 2, &[3, 1, 0], &[], 0).await.unwrap();

    let before = flushes(&device);
    let asleep = power(&broker, Action::Sleep).await;
    assert!(asleep.failures.is_empty(), "{:?}", asleep.failures);
    assert!(flushes(&device) > before, "no flush reached the device before sleep");
    power(&broker, Action::Wake).await;
    assert_eq!(&std::fs::read(&device.file).unwrap()[1536..2048], &[0xa5; 512]);
}

/// The interface's MTU and whether it is up, as `ip` tells it in the broker's namespace.
fn link(broker: &Broker) -> (u32, bool) {
    let out = broker.in_netns("ip", &["-o", "link", "show", "pc0"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mtu = text
        .split_whitespace()
        .skip_while(|w| *w != "mtu")
        .nth(1)
        .and_then(|m| m.parse().ok())
        .unwrap_or_else(|| panic!("no mtu in {text:?}"));
    let flags = text.split_whitespace().nth(2).unwrap_or_default();
    (mtu, flags.contains("UP") && !flags.contains("DOWN"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tun_interface_keeps_its_configuration_over_sleep() {
    let policy = "[[principal]]\nname = \"root\"\nuid = [0]\n[[rule]]\nid = \"net\"\neffect = \"allow\"\nprincipals = [\"root\"]\nservice = { class = \"NetDevice\" }\nmethods = [\"*\"]\nprivileges = [\"net.admin\"]\n";
    let broker = Broker::with(BrokerSetup {
        config: Some("[[device]]\nname = \"net0\"\ndriver = \"net\"\ninterface = \"pc0\"\n"),
        policy: Some(policy),
        wrapper: &["unshare", "--net", "--"],
        ..BrokerSetup::default()
    });
    let (session, net) = broker.open("net0", OpenMode::Shared).await;
    session.call_named(&net, "set_mtu", &[1280], &[]).await.unwrap();
    session.call_named(&net, "set_up", &[], &[]).await.unwrap();
    assert_eq!(link(&broker), (1280, true));

    power(&broker, Action::Sleep).await;
    // Over the sleep the interface loses its configuration.
    run_ok(broker.in_netns("ip", &["link", "set", "pc0", "down", "mtu", "1400"]));
    assert_eq!(link(&broker), (1400, false));
    let awake = power(&broker, Action::Wake).await;
    assert!(awake.failures.is_empty(), "{:?}", awake.failures);
    assert_eq!(
        link(&broker),
        (1280, true),
        "wake set the interface's configuration again"
    );
}

const POWER_POLICY: &str = r#"
[[principal]]
name = "all"

[[rule]]
id = "sample"
effect = "allow"
principals = ["all"]
service = { class = "SampleDevice" }
methods = ["*"]

[[rule]]
id = "assert"
effect = "allow"
principals = ["all"]
service = { class = "PowerDomain" }
methods = ["*"]
privileges = ["power.assert"]
"#;

/// The uid of the broker's service user.
fn service_uid() -> u64 {
    let out = std::process::Command::new("id")
        .args(["-u", "portcullis"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// Waits (up to 30 s) until logind's inhibitors satisfy `done`.
fn until_inhibitors(
    bus: &portcullis_tests::SystemBus,
    done: impl Fn(&[(String, String, String, String, u64, u64)]) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = bus.inhibitors();
        if done(&now) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "logind's inhibitors never came to that: {now:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_broker_follows_logind_and_a_power_assertion_blocks_sleep_until_its_client_goes() {
    let bus = portcullis_tests::system_bus();
    let broker = Broker::with(BrokerSetup {
        config: Some(SAMPLE),
        policy: Some(POWER_POLICY),
        env: &[("DBUS_SYSTEM_BUS_ADDRESS", &bus.address)],
        ..BrokerSetup::default()
    });
    let (uid, pid) = (service_uid(), u64::from(broker.pid()));
    let ours = |mode: &'static str| {
        move |i: &[(String, String, String, String, u64, u64)]| {
            i.iter()
                .filter(|(what, who, _, m, u, p)| {
                    what == "sleep" && who == "portcullis" && m == mode && (*u, *p) == (uid, pid)
                })
                .count()
        }
    };
    // The broker takes a delay inhibitor as its own user once it follows logind.
    until_inhibitors(bus, |i| ours("delay")(i) == 1);
    assert!(power(&broker, Action::Status).await.logind);

    // logind suspends the machine: the broker sleeps (clients told), lets logind go on by
    // releasing its delay, and wakes when logind says the machine has woken.
    let (session, sample) = broker.open("sample0", OpenMode::Shared).await;
    bus.suspend(0).unwrap_or_else(|e| panic!("{e}\n{}", bus.log("logind")));
    next_event(&session, |k| matches!(k, pb::event::Kind::WillSleep(_))).await;
    next_event(&session, |k| matches!(k, pb::event::Kind::HasWoken(_))).await;
    let status = power(&broker, Action::Status).await;
    assert_eq!(
        (status.sleeps, status.wakes, status.last_source.as_str(), status.asleep),
        (1, 1, "logind", false)
    );
    until_inhibitors(bus, |i| ours("delay")(i) == 1);
    assert_eq!(
        session.call_named(&sample, "add", &[1, 2], &[]).await.unwrap().scalars,
        vec![3]
    );

    // An app's power assertion is a block inhibitor held by the broker for it: logind refuses
    // to sleep while it is held (root asks it to honour inhibitors, flag 1)...
    let (app, domain) = broker.open("power", OpenMode::Shared).await;
    app.call_named(&domain, "prevent_sleep", &[], &[]).await.unwrap();
    until_inhibitors(bus, |i| ours("block")(i) == 1);
    assert_eq!(
        app.call_named(&domain, "get_state", &[], &[]).await.unwrap().scalars,
        vec![0, 1, 1]
    );
    // (logind's "Access denied to root due to active block inhibitor"; the same call succeeds
    // below, once the assertion is gone.)
    let refused = bus.suspend(1).unwrap_err();
    assert!(refused.contains("Access denied"), "{refused}");
    assert_eq!(
        power(&broker, Action::Status).await.sleeps,
        1,
        "the machine did not sleep"
    );
    // ... and when its client goes, however it goes, the assertion goes with it.
    drop((app, domain));
    until_inhibitors(bus, |i| ours("block")(i) == 0);
    assert_eq!(power(&broker, Action::Status).await.assertions, 0);
    bus.suspend(1).unwrap_or_else(|e| panic!("{e}"));
    next_event(&session, |k| matches!(k, pb::event::Kind::HasWoken(_))).await;
    assert_eq!(power(&broker, Action::Status).await.sleeps, 2);
}
