//! The device families against direct use of the same device, in the same run, contenders
//! taking turns round by round:
//!
//! - block: sequential 1 MiB reads through the ring into the mapped `dma` memory, against
//!   `pread` with `O_DIRECT` on the same loop device (a file in the page cache behind it); and
//!   random 4 KiB reads, one client, against the same `pread`s;
//! - tty: a 64-byte write and its echo through a pty (a thread echoes on the master side),
//!   through the broker's ring against `write`/`read` on the follower;
//! - net: 1,400-byte packets through a TUN interface and back (the kernel forwards each one out
//!   of the interface it came in on), through the broker's ring against `write`/`read` on a TUN
//!   descriptor of the bench's own.
//!
//! Everything runs in a network namespace of the bench's own (it re-executes itself under
//! `unshare --net`), with devices it makes and removes: a loop device over a temporary file,
//! a pty pair, two TUN interfaces on TEST-NET addresses.

use std::{
    os::fd::OwnedFd,
    path::PathBuf,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use portcullis_broker::{config::Config, server, transport::native};
use portcullis_client::{
    devices::packet_records,
    ring::{RingClient, RingOptions},
};
use portcullis_proto::ring::WaitMode;
use rustix::fs::{Mode, OFlags};

use crate::{Args, summarize};

/// Set in the re-executed bench, which runs in a network namespace of its own.
const IN_NETNS: &str = "PORTCULLIS_BENCH_NETNS";

const POLICY: &str = r#"
[[principal]]
name = "all"

[[rule]]
id = "devices"
effect = "allow"
principals = ["all"]
methods = ["*"]
memory = ["dma", "packets"]
open = "exclusive"
privileges = ["net.admin"]
"#;

/// The block device's size.
const DISK: u64 = 256 << 20;

/// Runs the device benchmarks: here, if this process already has a network namespace of its
/// own, else in a copy of itself that has one.
pub fn run(args: &Args, argv: &[String]) {
    if std::env::var_os(IN_NETNS).is_none() {
        let status = Command::new("unshare")
            .args(["--net", "--"])
            .arg(std::env::current_exe().unwrap())
            .args(argv)
            .arg("devices")
            .env(IN_NETNS, "1")
            .status()
            .unwrap();
        assert!(status.success(), "the device benchmarks failed: {status}");
        return;
    }
    let devices = Devices::make();
    let broker = Broker::start(&devices);
    block(args, &devices, &broker);
    tty(args, &devices, &broker);
    net(args, &devices, &broker);
}

/// A loop device over a temporary file, detached when dropped.
struct Loop {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("--detach").arg(&self.path).status();
    }
}

struct Devices {
    disk: Loop,
    /// The pty's master, and its follower's path.
    pty: (OwnedFd, PathBuf),
}

fn run_ok(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Devices {
    fn make() -> Devices {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("disk.img");
        let data: Vec<u8> = (0..DISK).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        std::fs::write(&file, &data).unwrap();
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(&file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let disk = Loop {
            path: PathBuf::from(String::from_utf8(out.stdout).unwrap().trim()),
            _dir: dir,
        };
        use rustix::pty::{OpenptFlags, grantpt, openpt, ptsname, unlockpt};
        let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC).unwrap();
        grantpt(&master).unwrap();
        unlockpt(&master).unwrap();
        let follower = PathBuf::from(ptsname(&master, Vec::new()).unwrap().to_str().unwrap());
        // The kernel forwards a packet back out of the interface it came in on.
        for (key, value) in [
            ("net/ipv4/ip_forward", "1"),
            ("net/ipv4/conf/all/send_redirects", "0"),
            ("net/ipv4/conf/default/send_redirects", "0"),
            ("net/ipv4/conf/all/rp_filter", "0"),
            ("net/ipv4/conf/default/rp_filter", "0"),
        ] {
            std::fs::write(format!("/proc/sys/{key}"), value).unwrap();
        }
        Devices {
            disk,
            pty: (master, follower),
        }
    }
}

struct Broker {
    dir: tempfile::TempDir,
    _servers: tokio::runtime::Runtime,
}

impl Broker {
    fn start(devices: &Devices) -> Broker {
        let dir = tempfile::tempdir().unwrap();
        let config = format!(
            "[[device]]\nname = \"disk0\"\ndriver = \"block\"\npath = \"{}\"\n\n[[device]]\nname = \"tty0\"\ndriver = \"tty\"\npath = \"{}\"\n\n[[device]]\nname = \"net0\"\ndriver = \"net\"\ninterface = \"pcb0\"\n\n[[device]]\nname = \"sample0\"\ndriver = \"sample\"\n",
            devices.disk.path.display(),
            devices.pty.1.display()
        );
        let policy = dir.path().join("policy.toml");
        std::fs::write(&policy, POLICY).unwrap();
        let servers = crate::server_runtime();
        let _guard = servers.enter();
        let core = server::build_core(&Config::parse("bench", &config).unwrap(), Some(&policy)).unwrap();
        let listener = native::bind(&dir.path().join("native.sock")).unwrap();
        servers.spawn(native::serve(
            core,
            listener,
            portcullis_broker::config::RingConfig::default(),
            std::future::pending(),
        ));
        Broker { dir, _servers: servers }
    }

    /// A ring client with the default options (adaptive wait, 50 µs of spinning) and a user
    /// client of `name` open.
    fn ring(&self, name: &str, exclusive: bool) -> (RingClient, u64) {
        self.ring_with(name, exclusive, RingOptions::default())
    }

    fn ring_with(&self, name: &str, exclusive: bool, options: RingOptions) -> (RingClient, u64) {
        let mut ring = RingClient::connect(self.dir.path(), options).unwrap();
        let id = ring.find(name).unwrap()[0].id;
        let handle = ring.open(id, exclusive).unwrap();
        (ring, handle)
    }
}

/// A page-aligned slice of `buf` of `len` bytes (direct I/O needs aligned memory).
fn aligned(buf: &mut [u8], len: usize) -> &mut [u8] {
    let skip = (4096 - buf.as_ptr() as usize % 4096) % 4096;
    &mut buf[skip..skip + len]
}

/// How long a client that moves a MiB of blocks, or a batch of packets, per call spins before it
/// sleeps: longer than one such call takes, so that it never pays the sleep and the wake-up
/// (see docs/BENCHMARKS.md).
const LONG_SPIN: Duration = Duration::from_micros(250);

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn block(args: &Args, devices: &Devices, broker: &Broker) {
    const MIB: u64 = 1 << 20;
    let direct = rustix::fs::open(&devices.disk.path, OFlags::RDONLY | OFlags::DIRECT, Mode::empty()).unwrap();
    let mut raw = vec![0u8; MIB as usize + 4096];
    let buf = aligned(&mut raw, MIB as usize);
    let (mut ring, h) = broker.ring("disk0", false);
    let _dma = ring.map_memory(h, 0).unwrap();
    let spinning = RingOptions {
        wait: WaitMode::Adaptive,
        spin: LONG_SPIN,
        ..RingOptions::default()
    };
    let (mut tuned, th) = broker.ring_with("disk0", false, spinning);
    let _tuned_dma = tuned.map_memory(th, 0).unwrap();
    let pass = |mut read: Box<dyn FnMut(u64) + '_>| {
        let start = Instant::now();
        for i in 0..DISK / MIB {
            read(i * MIB);
        }
        (DISK as f64 / (1 << 20) as f64) / start.elapsed().as_secs_f64()
    };
    let (mut broker_mibs, mut tuned_mibs, mut direct_mibs) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..args.rounds {
        broker_mibs.push(pass(Box::new(|at| {
            let out = ring.call(h, 1, &[at / 512, MIB / 512, 0], &[], 0).unwrap();
            assert_eq!(out.scalars, vec![MIB]);
        })));
        tuned_mibs.push(pass(Box::new(|at| {
            let out = tuned.call(th, 1, &[at / 512, MIB / 512, 0], &[], 0).unwrap();
            assert_eq!(out.scalars, vec![MIB]);
        })));
        direct_mibs.push(pass(Box::new(|at| {
            assert_eq!(rustix::io::pread(&direct, &mut *buf, at).unwrap(), MIB as usize);
        })));
    }
    drop(tuned);
    let (b, t, d) = (
        median(&mut broker_mibs),
        median(&mut tuned_mibs),
        median(&mut direct_mibs),
    );
    println!("### Block: sequential 1 MiB reads of a 256 MiB loop device\n");
    println!("{} passes each, contenders alternating; medians\n", args.rounds);
    println!(
        "| contender | MiB/s | of direct |\n|---|---|---|\n| broker: ring `read_blocks` into mapped `dma`, client spinning {} µs | {t:.0} | **{:.0}%** |\n| broker: the same, default client options (spinning 50 µs) | {b:.0} | {:.0}% |\n| direct: `pread` `O_DIRECT` | {d:.0} | 100% |\n",
        LONG_SPIN.as_micros(),
        100.0 * t / d,
        100.0 * b / d
    );
    println!("ratio: **{:.0}%** of direct (target ≥ 90%)\n", 100.0 * t / d);

    // Random 4 KiB reads.
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng % (DISK / 4096)) * 4096
    };
    let four_k = aligned(&mut raw, 4096);
    let (mut broker_iops, mut direct_iops) = (Vec::new(), Vec::new());
    let n = args.iters * 4;
    for _ in 0..args.rounds {
        let start = Instant::now();
        for _ in 0..n {
            let at = next();
            assert_eq!(ring.call(h, 1, &[at / 512, 8, 0], &[], 0).unwrap().scalars, vec![4096]);
        }
        broker_iops.push(n as f64 / start.elapsed().as_secs_f64());
        let start = Instant::now();
        for _ in 0..n {
            let at = next();
            assert_eq!(rustix::io::pread(&direct, &mut *four_k, at).unwrap(), 4096);
        }
        direct_iops.push(n as f64 / start.elapsed().as_secs_f64());
    }
    let (b, d) = (median(&mut broker_iops), median(&mut direct_iops));
    println!("### Block: random 4 KiB reads, one client\n");
    println!("{} rounds × {n} reads each, alternating; medians\n", args.rounds);
    println!(
        "| contender | reads/s |\n|---|---|\n| broker: ring `read_blocks` | {b:.0} |\n| direct: `pread` `O_DIRECT` | {d:.0} |\n"
    );
    println!("ratio: **{:.0}%** of direct IOPS (target ≥ 60%)\n", 100.0 * b / d);
}

/// Echoes whatever arrives on the pty master, until told to stop.
fn echo_thread(master: OwnedFd, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 256];
        while !stop.load(Ordering::Relaxed) {
            let mut fds = [rustix::event::PollFd::new(&master, rustix::event::PollFlags::IN)];
            let tick = rustix::event::Timespec {
                tv_sec: 0,
                tv_nsec: 50_000_000,
            };
            if rustix::event::poll(&mut fds, Some(&tick)).unwrap_or(0) == 0 {
                continue;
            }
            if let Ok(n) = rustix::io::read(&master, &mut buf) {
                let mut put = 0;
                while put < n {
                    put += rustix::io::write(&master, &buf[put..n]).unwrap();
                }
            }
        }
    })
}

fn tty(args: &Args, devices: &Devices, broker: &Broker) {
    let stop = Arc::new(AtomicBool::new(false));
    let echo = echo_thread(devices.pty.0.try_clone().unwrap(), stop.clone());
    let message = [b'x'; 64];
    let per_round = (args.iters / 4).max(100);
    let (mut broker_rt, mut direct_rt) = (Vec::new(), Vec::new());
    for _ in 0..args.rounds {
        // Through the broker: a user client writes, then reads until the echo is whole.
        let (mut ring, h) = broker.ring("tty0", false);
        for _ in 0..per_round {
            let start = Instant::now();
            ring.call(h, 2, &[1000], &message, 0).unwrap();
            let mut got = 0;
            while got < 64 {
                got += ring.call(h, 3, &[64, 1000], &[], 64).unwrap().struct_out.len();
            }
            broker_rt.push(start.elapsed());
        }
        drop(ring);
        // Directly: the follower opened by the bench itself (the broker reads it only while a
        // call waits, and none does).
        let follower = rustix::fs::open(&devices.pty.1, OFlags::RDWR | OFlags::NOCTTY, Mode::empty()).unwrap();
        let mut buf = [0u8; 64];
        for _ in 0..per_round {
            let start = Instant::now();
            rustix::io::write(&follower, &message).unwrap();
            let mut got = 0;
            while got < 64 {
                got += rustix::io::read(&follower, &mut buf[got..]).unwrap();
            }
            direct_rt.push(start.elapsed());
        }
    }
    stop.store(true, Ordering::Relaxed);
    echo.join().unwrap();
    let (b, d) = (summarize(&mut broker_rt), summarize(&mut direct_rt));
    crate::print_table(
        "Tty: a 64-byte write and its echo through a pty",
        &Args {
            rounds: args.rounds,
            iters: per_round,
        },
        &[
            ("broker: ring `write` + `read`", &b),
            ("direct: `write` + `read` on the follower", &d),
        ],
        "target p50 ≤ 1.5×",
    );
}

/// The one's-complement checksum of an IPv4 header.
fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A 1,400-byte IPv4 UDP packet from `src` to `dst` (which the kernel forwards back out).
fn packet(src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
    let mut p = vec![0u8; 1400];
    p[..12].copy_from_slice(&[0x45, 0, 0x05, 0x78, 0, 1, 0x40, 0, 64, 17, 0, 0]);
    p[12..16].copy_from_slice(&src);
    p[16..20].copy_from_slice(&dst);
    let sum = checksum(&p[..20]);
    p[10..12].copy_from_slice(&sum.to_be_bytes());
    p[20..28].copy_from_slice(&[0x13, 0x88, 0x13, 0x89, 0x05, 0x64, 0, 0]);
    p
}

fn ip(args: &[&str]) {
    run_ok(Command::new("ip").args(args));
}

/// Whether `p` is one of the bench's packets, forwarded back (to `.3` of the subnet).
fn forwarded(p: &[u8]) -> bool {
    p.len() == 1400 && p[9] == 17 && p[19] == 3
}

fn net(args: &Args, _devices: &Devices, broker: &Broker) {
    const WINDOW: usize = 64;
    const BATCH: u64 = 64;
    // Where batches are received: two regions after the batch to send, in turn.
    const RECV_AT: [u64; 2] = [256 << 10, 640 << 10];
    const RECV_ROOM: u64 = 384 << 10;
    let n = args.iters * 4;
    for key in ["all", "default"] {
        std::fs::write(format!("/proc/sys/net/ipv6/conf/{key}/disable_ipv6"), "1").unwrap();
    }
    // The broker's interface, up, with an address: packets to another address of its subnet are
    // forwarded back out of it.
    ip(&["addr", "add", "198.51.100.1/24", "dev", "pcb0"]);
    ip(&["link", "set", "pcb0", "up"]);
    let (direct, _) = portcullis_broker::drivers::net::open_tun("pcd0").unwrap();
    rustix::fs::fcntl_setfl(&direct, OFlags::empty()).unwrap();
    ip(&["addr", "add", "192.0.2.1/24", "dev", "pcd0"]);
    ip(&["link", "set", "pcd0", "up"]);
    let to_broker = packet([198, 51, 100, 2], [198, 51, 100, 3]);
    let to_direct = packet([192, 0, 2, 2], [192, 0, 2, 3]);
    // Each contender's user client is open only for its own run: every user client of the
    // interface gets a copy of each packet, which the other contender would pay for.
    let (mut ring, h) = broker.ring("net0", false);
    let net0 = ring.find("net0").unwrap()[0].id;
    ring.close(h).unwrap();
    let (mut floor, sample) = broker.ring("sample0", false);
    // Batches: a ring of their own (the spinning client), the packets memory holding one batch
    // to send (the same packets every time, as the direct contender writes the same buffer).
    let spinning = RingOptions {
        wait: WaitMode::Adaptive,
        spin: LONG_SPIN,
        ..RingOptions::default()
    };
    let (mut batched, bh) = broker.ring_with("net0", false, spinning);
    batched.close(bh).unwrap();
    let mut batch = Vec::new();
    for _ in 0..BATCH {
        packet_records::push(&mut batch, &to_broker).unwrap();
    }
    let (mut broker_pps, mut batch_pps, mut floor_pps, mut direct_pps) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut records = vec![0u8; RECV_ROOM as usize];
    for _ in 0..args.rounds {
        // Through the broker: sends and receives pipelined on the ring, a window in flight.
        let h = ring.open(net0, false).unwrap();
        let start = Instant::now();
        let (mut sent, mut got) = (0usize, 0usize);
        let mut in_flight = std::collections::VecDeque::new();
        while got < n {
            while sent < n && sent - got < WINDOW {
                in_flight.push_back((false, ring.submit_call(h, 4, &[], &to_broker, 0).unwrap()));
                in_flight.push_back((true, ring.submit_call(h, 5, &[1000], &[], 2048).unwrap()));
                sent += 1;
            }
            let (receive, id) = in_flight.pop_front().unwrap();
            let r = ring.wait(id).unwrap();
            assert_eq!(r.status, 0, "{}", r.message);
            if receive {
                match r.body {
                    portcullis_proto::frame::Body::Call { struct_out, .. } if forwarded(&struct_out) => got += 1,
                    // Not one of ours: ask again.
                    _ => in_flight.push_back((true, ring.submit_call(h, 5, &[1000], &[], 2048).unwrap())),
                }
            }
        }
        broker_pps.push(n as f64 / start.elapsed().as_secs_f64());
        for (_, id) in in_flight.drain(..) {
            let _ = ring.wait(id);
        }
        ring.close(h).unwrap();
        // Through the broker in batches, pipelined as the per-packet contender is: sends of
        // BATCH packets from the packets memory keep WINDOW packets in flight, and one receive
        // is always pending, into one of two regions of the memory in turn, so that the next
        // one is asked for before the client reads the batch that came back.
        let bh = batched.open(net0, false).unwrap();
        let packets = batched.map_memory(bh, 0).unwrap();
        rustix::io::pwrite(&packets.fd, &batch, 0).unwrap();
        let start = Instant::now();
        let (mut sent, mut got, mut asked) = (0usize, 0usize, 0usize);
        let mut recv: Option<(u64, u64)> = None;
        let receive = |ring: &mut RingClient, at: u64| {
            let id = ring.submit_call(bh, 7, &[at, RECV_ROOM, BATCH, 1000], &[], 0).unwrap();
            (id, at)
        };
        while got < n {
            while sent < n && sent + BATCH as usize - got <= WINDOW {
                batched.submit_call(bh, 6, &[0, BATCH], &[], 0).unwrap();
                sent += BATCH as usize;
            }
            if recv.is_none() {
                recv = Some(receive(&mut batched, RECV_AT[0]));
            }
            let r = batched.next_response().unwrap();
            assert_eq!(r.status, 0, "{}", r.message);
            let scalars = call_scalars(&r.body);
            let Some((_, at)) = recv.filter(|(id, _)| *id == r.id) else {
                assert_eq!(scalars, vec![BATCH], "a whole batch sent");
                continue;
            };
            asked += scalars[0] as usize;
            // The next receive goes to the other region before this one is read.
            recv = (asked < sent).then(|| receive(&mut batched, RECV_AT[usize::from(at == RECV_AT[0])]));
            let bytes = scalars[1] as usize;
            rustix::io::pread(&packets.fd, &mut records[..bytes], at).unwrap();
            got += packet_records::parse(&records[..bytes])
                .unwrap()
                .into_iter()
                .filter(|p| forwarded(p))
                .count();
        }
        batch_pps.push(got as f64 / start.elapsed().as_secs_f64());
        batched.close(bh).unwrap();
        // The ring alone: two calls per packet carrying the same bytes, with no device behind
        // them — the sample device's `echo` of 1,400 bytes, and an empty `echo`.
        let start = Instant::now();
        let (mut sent, mut got) = (0usize, 0usize);
        let mut in_flight = std::collections::VecDeque::new();
        while got < n {
            while sent < n && sent - got < WINDOW {
                in_flight.push_back(floor.submit_call(sample, 1, &[], &to_broker, 2048).unwrap());
                in_flight.push_back(floor.submit_call(sample, 1, &[], &[], 0).unwrap());
                sent += 1;
            }
            let id = in_flight.pop_front().unwrap();
            let r = floor.wait(id).unwrap();
            assert_eq!(r.status, 0, "{}", r.message);
            if let portcullis_proto::frame::Body::Call { struct_out, .. } = r.body
                && struct_out.len() == 1400
            {
                got += 1;
            }
        }
        floor_pps.push(n as f64 / start.elapsed().as_secs_f64());
        for id in in_flight.drain(..) {
            let _ = floor.wait(id);
        }
        // Directly: the same window on a TUN descriptor of the bench's own.
        let start = Instant::now();
        let mut buf = vec![0u8; 2048];
        let (mut sent, mut got) = (0usize, 0usize);
        while got < n {
            while sent < n && sent - got < WINDOW {
                rustix::io::write(&direct, &to_direct).unwrap();
                sent += 1;
            }
            let len = rustix::io::read(&direct, &mut buf).unwrap();
            if forwarded(&buf[..len]) {
                got += 1;
            }
        }
        direct_pps.push(n as f64 / start.elapsed().as_secs_f64());
    }
    let (b, t, f, d) = (
        median(&mut broker_pps),
        median(&mut batch_pps),
        median(&mut floor_pps),
        median(&mut direct_pps),
    );
    println!("### Net: 1,400-byte packets through a TUN and back\n");
    println!(
        "{} rounds × {n} packets, {WINDOW} in flight, alternating; medians\n",
        args.rounds
    );
    println!(
        "| contender | packets/s | µs per packet | of direct |\n|---|---|---|---|\n| broker: ring `send_packets` + `recv_packets`, {BATCH} per call, through the `packets` memory | {t:.0} | {:.2} | **{:.0}%** |\n| broker: ring `send_packet` + `recv_packet`, a packet per call | {b:.0} | {:.2} | {:.0}% |\n| the ring alone: two calls carrying the same bytes to the sample device (`echo` of 1,400 bytes, empty `echo`) | {f:.0} | {:.2} | |\n| direct: `write` + `read` on a TUN descriptor | {d:.0} | {:.2} | 100% |\n",
        1e6 / t,
        100.0 * t / d,
        1e6 / b,
        100.0 * b / d,
        1e6 / f,
        1e6 / d
    );
    println!(
        "ratio: **{:.0}%** of direct in batches, {:.0}% a packet per call (target ≥ 70%)\n",
        100.0 * t / d,
        100.0 * b / d
    );
}

/// The scalars of a call's result.
fn call_scalars(body: &portcullis_proto::frame::Body) -> Vec<u64> {
    match body {
        portcullis_proto::frame::Body::Call { scalars, .. } => scalars.clone(),
        other => panic!("not a call's result: {other:?}"),
    }
}
