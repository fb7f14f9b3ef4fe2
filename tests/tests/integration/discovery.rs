//! Discovery, driver matching and hotplug on real kernel events: loop devices and TUN
//! interfaces the tests make (and remove, pass or fail), the host's ttys enumerated but never
//! opened, matching's four stages with real drivers, forged uevents, and attach/detach cycles.

use std::{path::Path, process::Command, time::Duration};

use portcullis_client::{ClientError, Session, Status, native::NativeSession, pb};
use portcullis_proto::{frame::Event as NativeEvent, layout::AbiId};
use portcullis_tests::{Broker, BrokerSetup, LoopDevice, run_ok, stdout_ok};

const POLICY: &str = r#"
[[principal]]
name = "local"

[[rule]]
id = "discovered-devices"
effect = "allow"
principals = ["local"]
service = { properties = { personality = { prefix = "org.portcullis.test." } } }
methods = ["*"]
memory = ["dma"]
open = "exclusive"
"#;

const CONFIG: &str = "drivers = \"drivers.d\"\n";

const READ_BLOCKS: u32 = 1;

/// A directory for one test's loop device files, and a personality claiming exactly them.
fn disks_personality(dir: &Path, extra: &str) -> String {
    format!(
        r#"
[[personality]]
id = "org.portcullis.test.disks"
version = "1.0"
driver = "block"
provider_class = "BlockNub"
match = {{ devtype = "disk", "loop.backing_file" = {{ prefix = "{}/" }} }}
probe_score = 1000
properties = {{ role = "scratch" }}
{extra}
"#,
        dir.display()
    )
}

fn broker_with(personalities: &str) -> Broker {
    Broker::with(BrokerSetup {
        config: Some(CONFIG),
        policy: Some(POLICY),
        personalities: Some(personalities),
        ..BrokerSetup::default()
    })
}

fn matching(class: &str) -> pb::Matching {
    pb::Matching {
        class: class.into(),
        ..pb::Matching::default()
    }
}

/// The next event that publishes or terminates a service named `name`.
async fn next_about(session: &Session, name: &str) -> pb::event::Kind {
    use pb::event::Kind;
    loop {
        let event = tokio::time::timeout(Duration::from_secs(30), session.next_event())
            .await
            .unwrap_or_else(|_| panic!("no event about {name} within 30 s"))
            .expect("the session ended");
        match event.kind {
            Some(Kind::Published(ref p)) if p.service.as_ref().is_some_and(|s| s.name == name) => {
                return event.kind.unwrap();
            }
            Some(Kind::Terminated(ref t)) if t.name == name => return event.kind.unwrap(),
            _ => {}
        }
    }
}

/// `ls --json` as root: the nub of this kernel name, with its candidates.
fn nub(broker: &Broker, subsystem: &str, kernel_name: &str) -> serde_json::Value {
    let all: serde_json::Value = serde_json::from_str(&stdout_ok(&broker.cli(&["ls", "--json"]))).unwrap();
    all.as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == format!("{subsystem}/{kernel_name}"))
        .cloned()
        .unwrap_or_else(|| panic!("no nub {subsystem}/{kernel_name} in {all:#}"))
}

fn outcomes(nub: &serde_json::Value) -> Vec<(String, String)> {
    nub["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["personality"]
                    .as_str()
                    .unwrap()
                    .trim_start_matches("org.portcullis.test.")
                    .to_string(),
                c["outcome"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// The registry but its kernel nubs, by name and class: the tests running beside this one
/// make devices too (and `losetup --find` makes a new loop device when they hold every free
/// one).
fn registry(broker: &Broker) -> Vec<(String, String)> {
    let all: serde_json::Value = serde_json::from_str(&stdout_ok(&broker.cli(&["ls", "--json"]))).unwrap();
    all.as_array()
        .unwrap()
        .iter()
        .filter(|s| !s["class"].as_str().unwrap().ends_with("Nub"))
        .map(|s| {
            (
                s["name"].as_str().unwrap().to_string(),
                s["class"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Waits until the kernel has detached the loop device: the broker let go of it.
fn wait_detached(device: &LoopDevice) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while device.attached() {
        assert!(
            std::time::Instant::now() < deadline,
            "{} still attached",
            device.path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_loop_device_is_matched_served_and_terminated_when_its_media_goes_mid_calls() {
    let dir = portcullis_tests::tempdir_named("portcullis-disks-");
    let broker = broker_with(&disks_personality(dir.path(), ""));
    let baseline_fds = broker.baseline_fds();
    let registry_before = registry(&broker);
    let client = broker.client().await;
    let watcher = client.session().await.unwrap();
    assert!(
        watcher
            .watch_matching(matching("BlockDevice"))
            .await
            .unwrap()
            .is_empty()
    );

    let device = LoopDevice::attach_in(Some(dir.path()), &vec![7u8; 1 << 20], false);
    let name = device.name();
    let pb::event::Kind::Published(published) = next_about(&watcher, &name).await else {
        panic!("terminated before published");
    };
    let service = published.service.unwrap();
    assert_eq!(service.class, "BlockDevice");
    let text = |key: &str| match service.properties.get(key).and_then(|v| v.kind.clone()) {
        Some(pb::property_value::Kind::Text(t)) => t,
        other => panic!("{key}: {other:?}"),
    };
    assert_eq!(text("role"), "scratch");
    assert_eq!(text("personality"), "org.portcullis.test.disks");
    assert_eq!(text("loop.backing_file"), device.file.display().to_string());
    let record = nub(&broker, "block", &name);
    assert_eq!(outcomes(&record), vec![("disks".to_string(), "started".to_string())]);
    assert_eq!(record["candidates"][0]["service"], service.id);

    // A client reads blocks in a loop while the media goes.
    let mut s = NativeSession::connect(broker.run_dir(), AbiId::native()).await.unwrap();
    let handle = s.open(service.id, true).await.unwrap();
    let dma = s.map_memory(handle, 0).await.unwrap();
    assert_eq!(
        s.call(handle, READ_BLOCKS, &[0, 8, 0], &[], 0).await.unwrap().scalars,
        vec![4096]
    );
    let mut got = vec![0u8; 4096];
    rustix::io::pread(&dma.fd, &mut got, 0).unwrap();
    assert_eq!(got, vec![7u8; 4096]);
    let (first_tx, first) = tokio::sync::oneshot::channel();
    let reader = tokio::spawn(async move {
        let mut ok = 0u64;
        let mut first_tx = Some(first_tx);
        loop {
            match s.call(handle, READ_BLOCKS, &[0, 8, 0], &[], 0).await {
                Ok(_) => ok += 1,
                Err(e) => return (ok, e, s),
            }
            if let Some(tx) = first_tx.take() {
                let _ = tx.send(());
            }
        }
    });
    // Some calls ran before the media went: the loop's first is done before it goes.
    first.await.unwrap();
    device.pull_media();
    let pb::event::Kind::Terminated(_) = next_about(&watcher, &name).await else {
        panic!("published again");
    };
    let (ok, error, mut s) = reader.await.unwrap();
    assert!(ok > 0, "no call ran before the media went");
    assert!(
        matches!(error.status(), Some(Status::NoDevice | Status::NotOpen)),
        "a call racing the removal ends with NO_DEVICE (or, once its user client is closed, NOT_OPEN): {error}"
    );
    // The owner is told its user client is gone, and why.
    let closed = loop {
        if let Some(event) = s
            .take_events()
            .into_iter()
            .find(|e| matches!(e, NativeEvent::UserClientClosed { .. }))
        {
            break event;
        }
        let _ = s.find("").await;
    };
    assert!(
        matches!(closed, NativeEvent::UserClientClosed { handle: h, status, .. } if h == handle && status == Status::NoDevice as u32),
        "{closed:?}"
    );
    // Its mapping is revoked: the blocks read into it are gone.
    rustix::io::pread(&dma.fd, &mut got, 0).unwrap();
    assert_eq!(got, vec![0u8; 4096], "the dma memory still holds the device's blocks");
    drop(dma);
    drop(s);
    // The broker let go: the kernel finished the detach it had deferred.
    wait_detached(&device);
    drop(watcher);
    drop(client);
    broker.assert_no_leaks(baseline_fds);
    assert_eq!(registry(&broker), registry_before);
    // The nub stays (the loop device exists), matched again: no media, then no backing file.
    let record = nub(&broker, "block", &name);
    let outcome = record["candidates"][0]["outcome"].as_str().unwrap();
    assert!(outcome == "probe" || outcome == "passive", "{record:#}");
}

#[tokio::test(flavor = "multi_thread")]
async fn matching_tries_candidates_by_score_per_category_with_probe_and_start_failures() {
    let dir = portcullis_tests::tempdir_named("portcullis-disks-");
    // Attached read-only before the broker starts: matched by the enumeration at start.
    let device = LoopDevice::attach_in(Some(dir.path()), &vec![1u8; 1 << 20], true);
    // The test holds the kernel's exclusive claim: an exclusive start must fail.
    let claim = rustix::fs::open(
        &device.path,
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::EXCL | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .unwrap();
    let prefix = dir.path().display();
    let one = |id: &str, score: u32, extra: &str| {
        format!(
            "[[personality]]\nid = \"org.portcullis.test.{id}\"\nversion = \"1\"\ndriver = \"block\"\nprovider_class = \"BlockNub\"\nmatch = {{ \"loop.backing_file\" = {{ prefix = \"{prefix}/\" }} }}\nprobe_score = {score}\n{extra}\n"
        )
    };
    let personalities = [
        one("writer", 3000, ""),
        one("claimer", 2000, "read_only = true\nexclusive = true"),
        one("reader", 1000, "read_only = true"),
        one("spare", 500, "read_only = true"),
        one("inspector", 100, "read_only = true\ncategory = \"inspect\""),
        // Another class: not a candidate at all.
        "[[personality]]\nid = \"org.portcullis.test.serial\"\nversion = \"1\"\ndriver = \"tty\"\nprovider_class = \"TtyNub\"\nmatch = { devname = \"portcullis-test-none\" }\nprobe_score = 1\n".to_string(),
    ]
    .concat();
    let broker = broker_with(&personalities);
    let record = nub(&broker, "block", &device.name());
    let expected: Vec<(String, String)> = [
        ("claimer", "start"),
        ("reader", "started"),
        ("spare", "outranked"),
        ("writer", "probe"),
        ("inspector", "started"),
    ]
    .iter()
    .map(|(a, b)| ((*a).to_string(), (*b).to_string()))
    .collect();
    assert_eq!(outcomes(&record), expected, "{record:#}");
    let by_id = |id: &str| {
        record["candidates"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["personality"] == format!("org.portcullis.test.{id}"))
            .cloned()
            .unwrap()
    };
    assert_eq!(by_id("writer")["outcome"], "probe");
    assert!(
        by_id("writer")["reason"].as_str().unwrap().contains("read-only"),
        "{record:#}"
    );
    assert_eq!(by_id("claimer")["outcome"], "start");
    assert!(
        by_id("claimer")["reason"].as_str().unwrap().contains("busy"),
        "{record:#}"
    );
    assert_eq!(by_id("reader")["outcome"], "started");
    assert_eq!(by_id("spare")["outcome"], "outranked");
    assert_eq!(by_id("inspector")["outcome"], "started");
    assert_eq!(by_id("inspector")["category"], "inspect");
    // Both categories' drivers serve: the device and its inspect twin can be opened.
    let name = device.name();
    for service in [name.clone(), format!("{name}.inspect")] {
        let (session, uc) = broker.open(&service, portcullis_client::OpenMode::Shared).await;
        let geometry = session
            .call_named(&uc, "get_geometry", &[], &[])
            .await
            .unwrap()
            .struct_out;
        assert_eq!(geometry[16], 1, "{service} is read-only");
    }
    // The tty personality considered no block nub, and no tty was opened.
    assert!(
        record["candidates"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["driver"] == "block")
    );
    drop(claim);
}

/// Persistent TUN interfaces the test creates and deletes with `ip`, named for this test.
struct Tun(String);

impl Tun {
    fn create(name: &str) -> Tun {
        run_ok(Command::new("ip").args(["tuntap", "add", "dev", name, "mode", "tun"]));
        Tun(name.to_string())
    }
}

impl Drop for Tun {
    fn drop(&mut self) {
        if Path::new("/sys/class/net").join(&self.0).exists() {
            let _ = Command::new("ip").args(["link", "del", &self.0]).output();
        }
    }
}

/// A net personality claiming the one interface of this name.
fn tun_personality(name: &str) -> String {
    format!(
        "[[personality]]\nid = \"org.portcullis.test.tuns\"\nversion = \"1\"\ndriver = \"net\"\nprovider_class = \"NetNub\"\nmatch = {{ \"net.interface\" = \"{name}\" }}\nprobe_score = 10\n"
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tun_interface_is_served_while_it_exists_and_its_deletion_ends_a_waiting_call() {
    // A name no other test or host interface has.
    let name = format!("pcd{}", std::process::id() % 100_000);
    let broker = broker_with(&tun_personality(&name));
    let baseline_fds = broker.baseline_fds();
    let client = broker.client().await;
    let watcher = client.session().await.unwrap();
    watcher.watch_matching(matching("NetDevice")).await.unwrap();
    let tun = Tun::create(&name);
    let pb::event::Kind::Published(published) = next_about(&watcher, &name).await else {
        panic!("terminated before published");
    };
    assert_eq!(published.service.unwrap().class, "NetDevice");
    let (session, net) = broker.open(&name, portcullis_client::OpenMode::Shared).await;
    session.call_named(&net, "get_info", &[], &[]).await.unwrap();
    {
        let waiting = session.call_named(&net, "recv_packet", &[60_000], &[]);
        tokio::pin!(waiting);
        broker.until_driver_waits(waiting.as_mut()).await;
        run_ok(Command::new("ip").args(["link", "del", &name]));
        let gone: ClientError = waiting.await.unwrap_err();
        assert_eq!(gone.status(), Some(Status::NoDevice), "{gone}");
    }
    let pb::event::Kind::Terminated(_) = next_about(&watcher, &name).await else {
        panic!("published again");
    };
    drop(tun);
    drop(session);
    drop(watcher);
    drop(client);
    broker.assert_no_leaks(baseline_fds);
    // The nub went with the interface.
    let all = stdout_ok(&broker.cli(&["ls", "--json"]));
    assert!(!all.contains(&format!("\"net/{name}\"")), "{all}");
}

/// The broker's open descriptors that name a tty.
fn open_ttys(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .map(|p| p.display().to_string())
        .filter(|p| p.starts_with("/dev/tty") || p.starts_with("/dev/console") || p.starts_with("/dev/pts"))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn host_ttys_are_published_as_nubs_never_opened_and_a_kernel_change_rematches() {
    // A personality that can match only a tty this test would have made: none of the host's.
    let personalities = "[[personality]]\nid = \"org.portcullis.test.serial\"\nversion = \"1\"\ndriver = \"tty\"\nprovider_class = \"TtyNub\"\nmatch = { \"usb.serial\" = \"portcullis-test-none\" }\nprobe_score = 10\n";
    let broker = broker_with(personalities);
    let listed = std::fs::read_dir("/sys/class/tty").unwrap().count();
    let all: serde_json::Value = serde_json::from_str(&stdout_ok(&broker.cli(&["ls", "--json"]))).unwrap();
    let ttys: Vec<&serde_json::Value> = all
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["class"] == "TtyNub")
        .collect();
    assert_eq!(ttys.len(), listed);
    for tty in &ttys {
        assert_eq!(tty["properties"]["subsystem"], "tty");
        assert_eq!(tty["candidates"][0]["outcome"], "passive", "{tty:#}");
    }
    assert!(all.as_array().unwrap().iter().all(|s| s["class"] != "TtyDevice"));
    assert_eq!(open_ttys(broker.pid()), Vec::<String>::new());
    // The kernel itself announces a change of /dev/tty (a synthetic uevent): the broker reads
    // the device again and matches it again — and still opens nothing.
    std::fs::write("/sys/devices/virtual/tty/tty/uevent", "change").unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !broker
        .log()
        .lines()
        .any(|l| l.contains("uevent") && l.contains("/devices/virtual/tty/tty\"") && l.contains("change"))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the change was not seen:\n{}",
            broker.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(nub(&broker, "tty", "tty")["candidates"][0]["outcome"], "passive");
    assert_eq!(open_ttys(broker.pid()), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_uevent_forged_in_user_space_is_ignored_and_logged() {
    let name = format!("pcf{}", std::process::id() % 100_000);
    let broker = broker_with(&tun_personality(&name));
    let socket = rustix::net::socket_with(
        rustix::net::AddressFamily::NETLINK,
        rustix::net::SocketType::RAW,
        rustix::net::SocketFlags::CLOEXEC,
        Some(rustix::net::netlink::KOBJECT_UEVENT),
    )
    .unwrap();
    rustix::net::bind(&socket, &rustix::net::netlink::SocketAddrNetlink::new(0, 0)).unwrap();
    let devpath = format!("/devices/virtual/net/{name}");
    let forged = format!(
        "add@{devpath}\0ACTION=add\0DEVPATH={devpath}\0SUBSYSTEM=net\0INTERFACE={name}\0IFINDEX=4242\0SEQNUM=999999\0"
    );
    rustix::net::sendto(
        &socket,
        forged.as_bytes(),
        rustix::net::SendFlags::empty(),
        &rustix::net::netlink::SocketAddrNetlink::new(0, 1),
    )
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !broker.log().contains("not the kernel (0): refused") {
        assert!(
            std::time::Instant::now() < deadline,
            "no refusal logged:\n{}",
            broker.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let all = stdout_ok(&broker.cli(&["ls", "--json"]));
    assert!(
        !all.contains(&format!("\"net/{name}\"")),
        "a forged device was published: {all}"
    );
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hundred_attach_detach_cycles_leave_registry_descriptors_and_memory_where_they_began() {
    let dir = portcullis_tests::tempdir_named("portcullis-disks-");
    let broker = broker_with(&disks_personality(dir.path(), ""));
    let client = broker.client().await;
    let watcher = client.session().await.unwrap();
    watcher.watch_matching(matching("BlockDevice")).await.unwrap();
    let cycle = || async {
        let device = LoopDevice::attach_in(Some(dir.path()), &[0u8; 64 << 10], false);
        assert!(matches!(
            next_about(&watcher, &device.name()).await,
            pb::event::Kind::Published(_)
        ));
        device.pull_media();
        assert!(matches!(
            next_about(&watcher, &device.name()).await,
            pb::event::Kind::Terminated(_)
        ));
        wait_detached(&device);
    };
    let registry = || registry(&broker);
    for _ in 0..10 {
        cycle().await;
    }
    let (services, fds, rss) = (registry(), broker.stats()["open_fds"].clone(), rss_kib(broker.pid()));
    for _ in 0..100 {
        cycle().await;
    }
    assert_eq!(registry(), services);
    let after = broker.stats();
    assert_eq!(after["open_fds"], fds, "{after}");
    assert_eq!(after["user_clients"], 0, "{after}");
    let grown = rss_kib(broker.pid()).saturating_sub(rss);
    assert!(grown < 2048, "RSS grew {grown} KiB over 100 cycles");
}

#[test]
fn driver_lint_locates_errors_and_the_broker_refuses_a_set_with_errors() {
    let dir = portcullis_tests::tempdir();
    let drivers = dir.path().join("drivers.d");
    std::fs::create_dir(&drivers).unwrap();
    let file = drivers.join("bad.toml");
    let run_lint = || {
        Command::new(portcullis_tests::bin())
            .args(["driver", "lint"])
            .arg(&drivers)
            .output()
            .unwrap()
    };
    std::fs::write(
        &file,
        "[[personality]]\nid = \"org.example.x\"\nversion = \"1\"\ndriver = \"blok\"\nprovider_class = \"BlockNub\"\nprobe_score = 1\n",
    )
    .unwrap();
    let lint = run_lint();
    assert_eq!(lint.status.code(), Some(1));
    let out = String::from_utf8_lossy(&lint.stdout);
    assert!(
        out.contains(&format!(
            "{}:4:10: unknown driver \"blok\" (did you mean \"block\"?)",
            file.display()
        )),
        "{out}"
    );
    // Group-writable: refused too, with the fix.
    std::fs::write(
        &file,
        "[[personality]]\nid = \"org.example.x\"\nversion = \"1\"\ndriver = \"block\"\nprovider_class = \"BlockNub\"\nprobe_score = 1\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o664)).unwrap();
    let lint = run_lint();
    assert_eq!(lint.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&lint.stdout).contains("writable by its group"),
        "{lint:?}"
    );
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let lint = run_lint();
    assert!(lint.status.success(), "{lint:?}");
    assert!(String::from_utf8_lossy(&lint.stdout).contains("1 personalities in 1 files, no errors"));
    // The broker does not start on a set with errors.
    std::fs::write(&file, "[[personality]]\nid = \"x\"\n").unwrap();
    std::fs::write(dir.path().join("config.toml"), CONFIG).unwrap();
    let broker = Command::new(portcullis_tests::bin())
        .args(["broker", "--run-dir"])
        .arg(dir.path().join("run"))
        .arg("--config")
        .arg(dir.path().join("config.toml"))
        .output()
        .unwrap();
    assert!(!broker.status.success());
    let stderr = String::from_utf8_lossy(&broker.stderr);
    assert!(
        stderr.contains("driver personalities:") && stderr.contains("bad.toml:"),
        "{stderr}"
    );
}

#[test]
fn watch_match_prints_what_matches_now_and_refuses_a_malformed_pair() {
    let broker = Broker::start();
    let out = broker.cli(&[
        "watch",
        "--match",
        "class=SampleDevice",
        "--match",
        "model=demo",
        "--count",
        "1",
    ]);
    assert!(
        stdout_ok(&out).contains("present sample0 <class SampleDevice"),
        "{out:?}"
    );
    let out = broker.cli(&["watch", "--match", "class=SampleDevice", "--count", "1", "--json"]);
    let line: serde_json::Value = serde_json::from_str(stdout_ok(&out).trim()).unwrap();
    assert_eq!(line["event"], "present");
    assert_eq!(line["service"]["name"], "sample0");
    let out = broker.cli(&["watch", "--match", "class"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("write KEY=VALUE"),
        "{out:?}"
    );
}

/// A file system mounted on a loop device the test made, unmounted when dropped.
struct Mounted(tempfile::TempDir);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0.path()).output();
    }
}

#[test]
fn a_mounted_disk_fails_the_probe_unless_the_personality_allows_it() {
    let dir = portcullis_tests::tempdir_named("portcullis-disks-");
    let device = LoopDevice::attach_in(Some(dir.path()), &vec![0u8; 8 << 20], false);
    run_ok(Command::new("mkfs.ext2").arg("-q").arg(&device.path));
    let mounted = Mounted(portcullis_tests::tempdir());
    run_ok(Command::new("mount").arg(&device.path).arg(mounted.0.path()));
    let careful = disks_personality(dir.path(), "");
    let bold = disks_personality(dir.path(), "allow_mounted = true\nread_only = true")
        .replace("org.portcullis.test.disks", "org.portcullis.test.bold")
        .replace("probe_score = 1000", "probe_score = 100");
    let broker = broker_with(&format!("{careful}{bold}"));
    let record = nub(&broker, "block", &device.name());
    let expected: Vec<(String, String)> = vec![("bold".into(), "started".into()), ("disks".into(), "probe".into())];
    assert_eq!(outcomes(&record), expected, "{record:#}");
    let reason = record["candidates"][1]["reason"].as_str().unwrap();
    assert!(
        reason.contains(&format!("is mounted at {}", mounted.0.path().display())) && reason.contains("allow_mounted"),
        "{reason}"
    );
    drop(broker);
    drop(mounted);
}
