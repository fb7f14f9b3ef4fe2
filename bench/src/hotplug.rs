//! Discovery and hotplug on real kernel events, with the broker's own hotplug thread:
//!
//! - from the kernel's uevent for a loop device being attached to the driver's service in the
//!   registry, ready to open (p50, p99; target p99 ≤ 5 ms). The clock starts when a netlink
//!   socket of the bench's own receives the same broadcast the broker's does, and stops when
//!   the broker publishes the service (each one is then opened by a client, untimed, to show it
//!   can be);
//! - start-up enumeration with 64 loop devices attached: the time from an empty registry to one
//!   with a nub per device and a driver started on each of the 64 (median of rounds), beside
//!   the same enumeration with no personality (nubs only).
//!
//! Loop devices over temporary files it makes; each is detached when its round ends.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use portcullis_broker::{
    bus::{hotplug::Hotplug, netlink::UeventSocket, sysfs::Sysfs},
    config::Config,
    registry::personality::Personalities,
    server,
    session::{Core, CoreEvent},
};
use portcullis_proto::layout::AbiId;

use crate::summarize;

fn personalities(dir: &Path) -> Personalities {
    let text = format!(
        "[[personality]]\nid = \"org.portcullis.bench.disks\"\nversion = \"1\"\ndriver = \"block\"\nprovider_class = \"BlockNub\"\nmatch = {{ \"loop.backing_file\" = {{ prefix = \"{}/\" }} }}\nprobe_score = 100\n",
        dir.display()
    );
    Personalities::parse(&[("bench".into(), text)]).unwrap()
}

fn core(dir: &Path) -> Arc<Core> {
    let policy = dir.join("policy.toml");
    std::fs::write(
        &policy,
        "[[principal]]\nname = \"all\"\n[[rule]]\nid = \"disks\"\neffect = \"allow\"\nprincipals = [\"all\"]\nservice = { class = \"BlockDevice\" }\nmethods = [\"*\"]\n",
    )
    .unwrap();
    server::build_core(&Config::parse("bench", "").unwrap(), Some(&policy)).unwrap()
}

fn losetup(args: &[&str], file: Option<&Path>) -> String {
    let mut cmd = Command::new("losetup");
    cmd.args(args);
    if let Some(file) = file {
        cmd.arg(file);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "losetup {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// A loop device over a new file in `dir`.
fn attach(dir: &Path, n: usize) -> (PathBuf, PathBuf) {
    let file = dir.join(format!("disk{n}.img"));
    std::fs::write(&file, vec![0u8; 64 << 10]).unwrap();
    let device = PathBuf::from(losetup(&["--find", "--show"], Some(&file)));
    (device, file)
}

/// The media goes (the broker lets go, then the kernel finishes the detach).
fn pull_media(device: &Path, file: &Path) {
    losetup(&["--detach", &device.display().to_string()], None);
    std::fs::File::options()
        .write(true)
        .open(file)
        .unwrap()
        .set_len(0)
        .unwrap();
    let _ = Command::new("losetup").arg("--set-capacity").arg(device).output();
}

fn wait_detached(device: &Path) {
    let name = device.file_name().unwrap().to_string_lossy().into_owned();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Path::new(&format!("/sys/block/{name}/loop/backing_file")).exists() {
        assert!(Instant::now() < deadline, "{name} still attached");
        std::thread::sleep(Duration::from_millis(1));
    }
}

pub fn run(quick: bool) {
    println!("### Hotplug: a kernel uevent to a service a client can open\n");
    let cycles = if quick { 30 } else { 200 };
    let dir = tempfile::Builder::new()
        .prefix("portcullis-bench-hotplug-")
        .tempdir()
        .unwrap();
    let runtime = crate::server_runtime();
    let _guard = runtime.enter();
    let core = core(dir.path());
    let mut published = core.subscribe();
    let broker_socket = UeventSocket::open().unwrap();
    let ours = UeventSocket::open().unwrap();
    let hotplug = Hotplug::new(core.clone(), personalities(dir.path()), Sysfs::default()).unwrap();
    hotplug.enumerate();
    let thread = hotplug.listen(broker_socket).unwrap();
    let peer = Arc::new(portcullis_broker::session::PeerIdentity::of_self().unwrap());
    let mut samples = Vec::with_capacity(cycles);
    for n in 0..cycles {
        // Whatever is queued from the last round is not this round's.
        while let Ok(portcullis_broker::bus::netlink::Received::Event(_)) = ours.receive() {}
        while let Some(Ok(_)) = published.try_recv() {}
        let (device, file) = attach(dir.path(), n);
        let name = device.file_name().unwrap().to_string_lossy().into_owned();
        let devpath = format!("/devices/virtual/block/{name}");
        // The kernel's broadcast, as a listener of the bench's own receives it.
        let kernel = loop {
            let mut fds = [rustix::event::PollFd::new(&ours, rustix::event::PollFlags::IN)];
            rustix::event::poll(&mut fds, None).unwrap();
            if let Ok(portcullis_broker::bus::netlink::Received::Event(e)) = ours.receive()
                && e.devpath == devpath
            {
                break Instant::now();
            }
        };
        let service = loop {
            match &*runtime.block_on(published.recv()).unwrap() {
                CoreEvent::Published(s) if s.name() == name && s.class() == "BlockDevice" => break s.clone(),
                _ => {}
            }
        };
        samples.push(kernel.elapsed());
        // A client can open it.
        let mut session = portcullis_broker::session::Session::new(core.clone(), peer.clone(), AbiId::native());
        let (handle, _, _) = session
            .open_user_client(service.id(), portcullis_broker::registry::OpenMode::Shared)
            .unwrap();
        session.close_user_client(handle).unwrap();
        drop(session);
        // The broker's last reference: the device closes when the service is terminated.
        drop(service);
        pull_media(&device, &file);
        wait_detached(&device);
    }
    hotplug.stop();
    thread.join().unwrap();
    let s = summarize(&mut samples);
    println!(
        "{cycles} attach cycles (`losetup` of a 64 KiB file), each timed from the kernel's uevent to the published service\n"
    );
    println!("| | p50 ms | p99 ms | max ms |");
    println!("|---|---|---|---|");
    println!(
        "| uevent → service ready | {:.3} | {:.3} | {:.3} |\n",
        s.p50.as_secs_f64() * 1e3,
        s.p99.as_secs_f64() * 1e3,
        samples.iter().max().unwrap().as_secs_f64() * 1e3
    );
    println!(
        "target: p99 ≤ 5 ms — {}\n",
        if s.p99 <= Duration::from_millis(5) {
            "met"
        } else {
            "NOT met"
        }
    );
    drop(runtime);
    enumeration(quick);
}

/// Start-up with 64 loop devices attached: time to a fully matched registry.
fn enumeration(quick: bool) {
    println!("### Start-up enumeration with 64 loop devices attached\n");
    let dir = tempfile::Builder::new()
        .prefix("portcullis-bench-enum-")
        .tempdir()
        .unwrap();
    let devices: Vec<(PathBuf, PathBuf)> = (0..64).map(|n| attach(dir.path(), n)).collect();
    let rounds = if quick { 3 } else { 9 };
    let runtime = crate::server_runtime();
    let _guard = runtime.enter();
    let mut matched = Vec::new();
    let mut nubs_only = Vec::new();
    let mut nubs = 0;
    for _ in 0..rounds {
        for (set, times) in [
            (personalities(dir.path()), &mut matched),
            (Personalities::default(), &mut nubs_only),
        ] {
            let with_drivers = !set.all().is_empty();
            let core = core(dir.path());
            let started = Instant::now();
            let hotplug = Hotplug::new(core.clone(), set, Sysfs::default()).unwrap();
            hotplug.enumerate();
            times.push(started.elapsed());
            nubs = hotplug.nub_count();
            let drivers = core
                .registry()
                .find(&portcullis_broker::registry::Matching {
                    class: Some("BlockDevice".into()),
                    ..Default::default()
                })
                .len();
            assert_eq!(drivers, if with_drivers { 64 } else { 0 });
            // The drivers close their devices with the core.
            drop(hotplug);
            drop(core);
        }
    }
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let (m, n) = (median(&mut matched), median(&mut nubs_only));
    println!(
        "{nubs} nubs (the 64 loop devices and the rest of this machine's ttys, block and net devices), median of {rounds} rounds\n"
    );
    println!("| enumeration | ms |");
    println!("|---|---|");
    println!("| nubs and 64 block drivers started | {:.2} |", m.as_secs_f64() * 1e3);
    println!("| nubs only (no personality) | {:.2} |", n.as_secs_f64() * 1e3);
    println!(
        "\nratio: {:.2}× (matching and starting 64 drivers against publishing alone)\n",
        m.as_secs_f64() / n.as_secs_f64()
    );
    drop(runtime);
    for (device, file) in &devices {
        let _ = Command::new("losetup").arg("--detach").arg(device).output();
        let _ = file;
    }
}
