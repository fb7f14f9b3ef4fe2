//! Every transport in one table: the broker's ring (spinning, adaptive and sleeping), its
//! native socket and its gRPC session, each serving `add` with the full policy check and
//! dispatch; and the peers a user would pick instead: a raw Unix-socket ping-pong, a bare tonic
//! echo server and iceoryx2 request-response (`peers` feature), with a bare eventfd ping-pong as
//! the floor of any transport that sleeps on an eventfd. Contenders take turns round by round in
//! the same process, the client pinned to CPU 0 and every server thread to CPU 1.
//!
//! The table is measured twice: with the machine's idle policy as it comes, and latency-tuned —
//! the PM QoS CPU latency request held at 0 µs, as `cyclictest` does by default and `tuned`'s
//! latency-performance profile does, so that an idle CPU polls instead of halting. On a virtual
//! machine a halted vCPU costs tens of microseconds to wake, and that cost, the same for every
//! transport that sleeps, hides what the transports themselves cost.
//!
//! Then pipelined `add` throughput over one ring, `checksum_dma` over 1 MiB against an
//! in-process checksum, and a latency-distribution plot (PNG) of both tables.

use std::{
    io::{Read, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use portcullis_broker::{config::RingConfig, session::Core, transport::native};
use portcullis_client::{
    native::NativeSession,
    ring::{RingClient, RingOptions},
};
use portcullis_proto::{frame::Body, layout::AbiId, ring::WaitMode};

use crate::{Args, Summary, client_runtime, core, grpc, summarize};

const CLIENT_CPU: usize = 0;
const SERVER_CPU: usize = 1;

/// CPUs of the machine, counted before this process pins itself (the count follows the
/// affinity mask).
fn cpus() -> usize {
    static CPUS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CPUS.get_or_init(|| std::thread::available_parallelism().map_or(1, usize::from))
}

fn pin(cpu: usize) {
    if cpus() > cpu {
        native::pin_to(cpu);
    }
}

fn unpin() {
    let mut set = rustix::thread::CpuSet::new();
    for cpu in 0..cpus() {
        set.set(cpu);
    }
    let _ = rustix::thread::sched_setaffinity(None, &set);
}

/// A broker serving only its native socket (and rings), with this ring configuration.
struct RingBroker {
    dir: PathBuf,
    core: Arc<Core>,
    wait: WaitMode,
}

impl RingBroker {
    fn start(servers: &tokio::runtime::Runtime, dir: &Path, wait: WaitMode) -> RingBroker {
        std::fs::create_dir_all(dir).unwrap();
        let _guard = servers.enter();
        let listener = native::bind(&dir.join("native.sock")).unwrap();
        let core = core();
        servers.spawn(native::serve(
            core.clone(),
            listener,
            ring_config(wait),
            std::future::pending(),
        ));
        RingBroker {
            dir: dir.to_path_buf(),
            core,
            wait,
        }
    }

    /// Waits until the broker has ended every ring (a spinning ring thread left running would
    /// keep the server CPU awake, and flatter whatever is measured next).
    fn drained(&self) {
        let start = Instant::now();
        while self.core.stats().rings > 0 {
            assert!(start.elapsed() < Duration::from_secs(10), "a ring thread did not end");
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

fn ring_config(wait: WaitMode) -> RingConfig {
    RingConfig {
        wait,
        cpu: (cpus() > SERVER_CPU).then_some(SERVER_CPU),
        ..RingConfig::default()
    }
}

pub(crate) fn ring_client(run_dir: &Path, wait: WaitMode) -> (RingClient, u64) {
    let options = RingOptions {
        wait,
        ..RingOptions::default()
    };
    let mut ring = RingClient::connect(run_dir, options).unwrap();
    let sample = ring.find("sample0").unwrap()[0].id;
    let handle = ring.open(sample, false).unwrap();
    (ring, handle)
}

/// The client waits as its broker's ring thread does.
fn ring_round(broker: &RingBroker, iters: usize, samples: &mut Vec<Duration>) {
    // A ring per round: a spinning broker thread must not run while the others are measured.
    let (mut ring, h) = ring_client(&broker.dir, broker.wait);
    for i in 0..iters as u64 {
        let start = Instant::now();
        let out = ring.call(h, 0, &[i, 1], &[], 0).unwrap();
        samples.push(start.elapsed());
        assert_eq!(out.scalars, [i + 1]);
    }
    drop(ring);
    broker.drained();
}

/// A raw Unix-socket ping-pong: 16 bytes each way, a blocking server thread.
fn uds_round(iters: usize, samples: &mut Vec<Duration>) {
    let (mut client, mut server) = UnixStream::pair().unwrap();
    let echo = std::thread::spawn(move || {
        pin(SERVER_CPU);
        let mut buf = [0u8; 16];
        while server.read_exact(&mut buf).is_ok() {
            let v = u64::from_le_bytes(buf[..8].try_into().unwrap()) + 1;
            buf[..8].copy_from_slice(&v.to_le_bytes());
            if server.write_all(&buf).is_err() {
                break;
            }
        }
    });
    let mut buf = [0u8; 16];
    for i in 0..iters as u64 {
        let start = Instant::now();
        buf[..8].copy_from_slice(&i.to_le_bytes());
        client.write_all(&buf).unwrap();
        client.read_exact(&mut buf).unwrap();
        samples.push(start.elapsed());
        assert_eq!(u64::from_le_bytes(buf[..8].try_into().unwrap()), i + 1);
    }
    drop(client);
    echo.join().unwrap();
}

/// Two eventfds and blocking reads: what any transport that sleeps on an eventfd pays to
/// wake the other side and be woken, with nothing else done.
fn eventfd_round(iters: usize, samples: &mut Vec<Duration>) {
    use rustix::event::{EventfdFlags, eventfd};
    let there = eventfd(0, EventfdFlags::CLOEXEC).unwrap();
    let back = eventfd(0, EventfdFlags::CLOEXEC).unwrap();
    let (there_echo, back_echo) = (there.try_clone().unwrap(), back.try_clone().unwrap());
    let echo = std::thread::spawn(move || {
        pin(SERVER_CPU);
        let mut buf = [0u8; 8];
        for _ in 0..iters {
            rustix::io::read(&there_echo, &mut buf).unwrap();
            rustix::io::write(&back_echo, &1u64.to_ne_bytes()).unwrap();
        }
    });
    let mut buf = [0u8; 8];
    for _ in 0..iters {
        let start = Instant::now();
        rustix::io::write(&there, &1u64.to_ne_bytes()).unwrap();
        rustix::io::read(&back, &mut buf).unwrap();
        samples.push(start.elapsed());
        assert_eq!(u64::from_ne_bytes(buf), 1);
    }
    echo.join().unwrap();
}

/// iceoryx2 request-response as its own request benchmark (`benchmarks/request-response`)
/// drives it: two request-response services, each side a client of one and the server of the
/// other, both busy-polling; a round trip is a request there and a request back.
#[cfg(feature = "peers")]
fn iceoryx2_round(iters: usize, samples: &mut Vec<Duration>) {
    use std::sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    };

    use iceoryx2::prelude::*;
    let tag = std::process::id();
    let node = NodeBuilder::new().create::<ipc::Service>().unwrap();
    let service = |dir: &str| {
        node.service_builder(&format!("portcullis-bench-{tag}-{dir}").as_str().try_into().unwrap())
            .request_response::<u64, u64>()
            .open_or_create()
            .unwrap()
    };
    let (there, back) = (service("there"), service("back"));
    let stop = Arc::new(AtomicBool::new(false));
    let ready = Arc::new(AtomicBool::new(false));
    let echo = {
        let (stop, ready, there, back) = (stop.clone(), ready.clone(), there.clone(), back.clone());
        std::thread::spawn(move || {
            pin(SERVER_CPU);
            let server = there.server_builder().create().unwrap();
            let client = back.client_builder().create().unwrap();
            ready.store(true, Ordering::Release);
            while !stop.load(Ordering::Relaxed) {
                if let Some(request) = server.receive().unwrap() {
                    client.send_copy(*request + 1).unwrap();
                }
            }
        })
    };
    let client = there.client_builder().create().unwrap();
    let server = back.server_builder().create().unwrap();
    while !ready.load(Ordering::Acquire) {
        std::hint::spin_loop();
    }
    for i in 0..iters as u64 {
        let start = Instant::now();
        client.send_copy(i).unwrap();
        let answer = loop {
            if let Some(r) = server.receive().unwrap() {
                break *r;
            }
        };
        samples.push(start.elapsed());
        assert_eq!(answer, i + 1);
    }
    stop.store(true, Ordering::Relaxed);
    echo.join().unwrap();
}

/// FNV-1a 64, what `checksum_dma` computes.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

struct Contender {
    kind: Kind,
    name: &'static str,
    samples: Vec<Duration>,
}

/// What a contender is.
#[derive(Clone, Copy)]
enum Kind {
    RingSpin,
    RingAdaptive,
    RingSleep,
    Native,
    Grpc,
    RawUds,
    TonicEcho,
    #[cfg(feature = "peers")]
    Iceoryx2,
    EventfdFloor,
}

/// The contenders of the round-trip table, in the order they take turns. The ratios below the
/// table find them by these names' beginnings.
const CONTENDERS: &[(Kind, &str)] = &[
    (Kind::RingSpin, "ring, spinning (broker and client spin)"),
    (
        Kind::RingAdaptive,
        "ring, adaptive (the default: spin 50 µs, then sleep)",
    ),
    (Kind::RingSleep, "ring, sleeping (woken by socket and pipe)"),
    (Kind::Native, "native socket (SOCK_SEQPACKET)"),
    (Kind::Grpc, "gRPC session (Unix socket)"),
    (Kind::RawUds, "peer: raw Unix-socket ping-pong"),
    (Kind::TonicEcho, "peer: bare tonic echo (Unix socket)"),
    #[cfg(feature = "peers")]
    (Kind::Iceoryx2, "peer: iceoryx2 request-response (busy-poll)"),
    (Kind::EventfdFloor, "floor: bare eventfd ping-pong (no ring, no work)"),
];

/// Everything the round-trip table talks to, set up once.
struct Rig {
    spin: RingBroker,
    adaptive: RingBroker,
    sleep: RingBroker,
    client_rt: tokio::runtime::Runtime,
    native: (NativeSession, u64),
    grpc: (grpc::PingPong, u64),
    echo: grpc::PingPong,
}

impl Rig {
    fn round(&mut self, kind: Kind, iters: usize, samples: &mut Vec<Duration>) {
        match kind {
            Kind::RingSpin => ring_round(&self.spin, iters, samples),
            Kind::RingAdaptive => ring_round(&self.adaptive, iters, samples),
            Kind::RingSleep => ring_round(&self.sleep, iters, samples),
            Kind::Native => {
                let (session, handle) = &mut self.native;
                self.client_rt.block_on(async {
                    for i in 0..iters as u64 {
                        let start = Instant::now();
                        let out = session.call(*handle, 0, &[i, 1], &[], 0).await.unwrap();
                        samples.push(start.elapsed());
                        assert_eq!(out.scalars, [i + 1]);
                    }
                });
            }
            Kind::Grpc => {
                let (stream, handle) = &mut self.grpc;
                self.client_rt.block_on(grpc::measure(stream, *handle, iters, samples));
            }
            Kind::RawUds => uds_round(iters, samples),
            Kind::TonicEcho => self
                .client_rt
                .block_on(grpc::measure(&mut self.echo, 0, iters, samples)),
            #[cfg(feature = "peers")]
            Kind::Iceoryx2 => iceoryx2_round(iters, samples),
            Kind::EventfdFloor => eventfd_round(iters, samples),
        }
    }

    /// Every contender, taking turns: a warm-up round each, then `args.rounds` rounds.
    fn table(&mut self, args: &Args) -> Vec<Contender> {
        let mut contenders: Vec<Contender> = CONTENDERS
            .iter()
            .map(|&(kind, name)| Contender {
                kind,
                name,
                samples: Vec::new(),
            })
            .collect();
        for c in &contenders {
            self.round(c.kind, args.iters / 5, &mut Vec::new());
        }
        for _ in 0..args.rounds {
            for c in &mut contenders {
                self.round(c.kind, args.iters, &mut c.samples);
            }
        }
        contenders
    }
}

/// While alive, holds the PM QoS CPU latency request at 0 µs (`/dev/cpu_dma_latency`, root
/// only): idle CPUs poll instead of entering an idle state. The kernel drops the request when
/// the file is closed, so nothing outlives the bench.
struct LatencyTuned {
    _request: std::fs::File,
}

impl LatencyTuned {
    fn hold() -> std::io::Result<LatencyTuned> {
        let mut file = std::fs::OpenOptions::new().write(true).open("/dev/cpu_dma_latency")?;
        file.write_all(&0i32.to_ne_bytes())?;
        Ok(LatencyTuned { _request: file })
    }
}

pub(crate) fn run(args: &Args, plot: &Path) {
    cpus();
    let dir = tempfile::tempdir().unwrap();
    let servers = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_start(|| pin(SERVER_CPU))
        .build()
        .unwrap();
    let spin = RingBroker::start(&servers, &dir.path().join("spin"), WaitMode::Spin);
    let sleep = RingBroker::start(&servers, &dir.path().join("sleep"), WaitMode::Sleep);
    let adaptive = RingBroker::start(&servers, &dir.path().join("adaptive"), WaitMode::Adaptive);
    let (grpc_socket, echo_socket) = grpc::start(&servers, dir.path());
    pin(CLIENT_CPU);
    let client_rt = client_runtime();
    let native = client_rt.block_on(async {
        let mut s = NativeSession::connect(&sleep.dir, AbiId::native()).await.unwrap();
        let sample = s.find("sample0").await.unwrap()[0].id;
        let h = s.open(sample, false).await.unwrap();
        (s, h)
    });
    let grpc = client_rt.block_on(grpc::broker_stream(&grpc_socket));
    let echo = client_rt.block_on(grpc::echo_stream(&echo_socket));
    let mut rig = Rig {
        spin,
        adaptive,
        sleep,
        client_rt,
        native,
        grpc,
        echo,
    };

    let mut plotted = Vec::new();
    let as_it_comes = rig.table(args);
    print_round_trips("idle policy as the machine comes", &as_it_comes, args);
    plotted.push(("idle policy as the machine comes", as_it_comes));
    match LatencyTuned::hold() {
        Ok(tuned) => {
            let table = rig.table(args);
            drop(tuned);
            let title = "latency-tuned idle (PM QoS CPU latency 0 µs)";
            print_round_trips(title, &table, args);
            plotted.push((title, table));
        }
        Err(e) => println!("(no latency-tuned table: /dev/cpu_dma_latency: {e}; run as root)\n"),
    }
    throughput(&rig.spin, &rig.adaptive, args);
    checksum(&rig.adaptive, args);
    unpin();
    match plot_cdf(plot, &plotted) {
        Ok(()) => println!("Latency distribution plot: `{}`\n", plot.display()),
        Err(e) => println!("(no plot: {e})\n"),
    }
}

/// The round-trip table of one idle policy, and the ratios the targets are about.
fn print_round_trips(policy: &str, contenders: &[Contender], args: &Args) {
    let summaries: Vec<(&str, Summary)> = contenders
        .iter()
        .map(|c| (c.name, summarize(&mut c.samples.clone())))
        .collect();
    println!("### Every transport: `add` round trips, {policy} (client CPU {CLIENT_CPU}, servers CPU {SERVER_CPU})\n");
    println!(
        "{} rounds × {} sequential round trips per contender, contenders alternating; ours run the full\npolicy check and dispatch; the peers only echo\n",
        args.rounds, args.iters
    );
    println!("| contender | p50 µs | p99 µs | p99.9 µs | mean µs | calls/s (1 client, sequential) |");
    println!("|---|---|---|---|---|---|");
    for (name, s) in &summaries {
        println!(
            "| {name} | {:.2} | {:.2} | {:.2} | {:.2} | {:.0} |",
            s.p50.as_secs_f64() * 1e6,
            s.p99.as_secs_f64() * 1e6,
            s.p999.as_secs_f64() * 1e6,
            s.mean.as_secs_f64() * 1e6,
            1.0 / s.mean.as_secs_f64()
        );
    }
    let get = |prefix: &str| summaries.iter().find(|(n, _)| n.starts_with(prefix)).map(|(_, s)| s);
    let ratio = |a: &Summary, b: &Summary| {
        format!(
            "p50 {:.2}×, mean {:.2}×, p99 {:.2}×",
            a.p50.as_secs_f64() / b.p50.as_secs_f64(),
            a.mean.as_secs_f64() / b.mean.as_secs_f64(),
            a.p99.as_secs_f64() / b.p99.as_secs_f64()
        )
    };
    println!();
    let pairs: &[(&str, &str, &str)] = &[
        ("ring, spinning", "peer: iceoryx2", " (target ≤ 1.5×)"),
        ("ring, sleeping", "peer: raw Unix", " (target ≤ 1.0×)"),
        ("ring, adaptive", "peer: raw Unix", ""),
        ("ring, sleeping", "floor: bare eventfd", ""),
        ("floor: bare eventfd", "peer: raw Unix", ""),
        ("native socket", "peer: raw Unix", ""),
        ("gRPC", "peer: bare tonic", ""),
    ];
    for (ours, peer, target) in pairs {
        if let (Some(a), Some(b)) = (get(ours), get(peer)) {
            println!("- {ours} / {peer}: {}{target}", ratio(a, b));
        }
    }
    println!();
}

/// Pipelined `add` over one ring: a window of requests in flight, for a fixed number of calls,
/// repeated (the two modes alternating) so that a dip in the machine's speed does not decide
/// the figure: the median run is the result, the slowest and fastest are shown.
fn throughput(spin: &RingBroker, adaptive: &RingBroker, args: &Args) {
    const WINDOW: u64 = 4096;
    const RUNS: usize = 5;
    let calls = (args.iters as u64 * 80).max(100_000);
    println!(
        "### Pipelined `add` over one ring ({RUNS} runs × {calls} calls each, {WINDOW} in flight, policy checks on)\n"
    );
    let modes = [
        ("spinning / spinning", spin),
        ("adaptive (default) / adaptive", adaptive),
    ];
    let mut rates = vec![Vec::new(); modes.len()];
    for _ in 0..RUNS {
        for ((_, broker), rates) in modes.iter().zip(&mut rates) {
            let (mut ring, h) = ring_client(&broker.dir, broker.wait);
            let start = Instant::now();
            let (mut sent, mut answered) = (0u64, 0u64);
            let mut first = None;
            while answered < calls {
                while sent < calls && sent - answered < WINDOW {
                    let id = ring.submit_call(h, 0, &[sent, 1], &[], 0).unwrap();
                    first.get_or_insert(id);
                    sent += 1;
                }
                // Synchronous calls complete in order: the n-th answer is n + 1.
                let r = ring.next_response().unwrap();
                let n = r.id - first.unwrap();
                assert!(matches!(r.body, Body::Call { ref scalars, .. } if scalars[..] == [n + 1]));
                answered += 1;
            }
            rates.push(calls as f64 / start.elapsed().as_secs_f64());
            drop(ring);
            broker.drained();
        }
    }
    println!("| broker ring thread / client | calls/s (median) | slowest run | fastest run |");
    println!("|---|---|---|---|");
    for ((label, _), rates) in modes.iter().zip(&mut rates) {
        rates.sort_by(f64::total_cmp);
        println!(
            "| {label} | {:.0} | {:.0} | {:.0} |",
            rates[rates.len() / 2],
            rates[0],
            rates[rates.len() - 1]
        );
    }
    println!("\ntarget ≥ 2,000,000 calls/s\n");
}

/// `checksum_dma` over the whole 1 MiB dma buffer through the ring, against FNV-1a over the
/// same bytes in this process.
fn checksum(broker: &RingBroker, args: &Args) {
    let (mut ring, h) = ring_client(&broker.dir, broker.wait);
    let dma = ring.map_memory(h, 1).unwrap();
    let bytes: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    rustix::io::pwrite(&dma.fd, &bytes, 0).unwrap();
    let expected = fnv1a(&bytes);
    let n = (args.rounds * 20).max(50);
    let (mut over_ring, mut in_process) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let start = Instant::now();
        let out = ring.call(h, 8, &[0, 1 << 20], &[], 0).unwrap();
        over_ring.push(start.elapsed());
        assert_eq!(out.scalars, [expected]);
        let start = Instant::now();
        let sum = fnv1a(std::hint::black_box(&bytes));
        in_process.push(start.elapsed());
        assert_eq!(sum, expected);
    }
    let (r, p) = (summarize(&mut over_ring), summarize(&mut in_process));
    println!("### `checksum_dma` over 1 MiB ({n} calls, alternating)\n");
    println!("| | p50 µs | mean µs | GB/s (p50) |");
    println!("|---|---|---|---|");
    for (name, s) in [
        ("through the ring (broker sums the shared dma buffer)", &r),
        ("in-process FNV-1a over the same bytes", &p),
    ] {
        println!(
            "| {name} | {:.1} | {:.1} | {:.2} |",
            s.p50.as_secs_f64() * 1e6,
            s.mean.as_secs_f64() * 1e6,
            (1u64 << 20) as f64 / s.p50.as_secs_f64() / 1e9
        );
    }
    println!(
        "\nring reaches {:.0}% of the in-process rate (p50; target ≥ 50%)\n",
        100.0 * p.p50.as_secs_f64() / r.p50.as_secs_f64()
    );
}

/// Line colours, one per contender (Tableau 10: told apart easily, also in print).
const COLORS: [(u8, u8, u8); 10] = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
];

/// DejaVu Sans as the plots' "sans-serif" (Debian fonts-dejavu-core).
pub(crate) fn register_font() -> Result<(), Box<dyn std::error::Error>> {
    let font = std::fs::read("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
        .map_err(|e| format!("DejaVuSans.ttf (Debian fonts-dejavu-core): {e}"))?;
    plotters::style::register_font(
        "sans-serif",
        plotters::style::FontStyle::Normal,
        Box::leak(font.into_boxed_slice()),
    )
    .map_err(|_| "the font does not load")?;
    Ok(())
}

/// The latency distributions as CDFs on a log time axis, one panel per idle policy.
fn plot_cdf(path: &Path, tables: &[(&str, Vec<Contender>)]) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    register_font()?;
    let us = |d: &Duration| d.as_secs_f64() * 1e6;
    let height = 700 * u32::try_from(tables.len()).unwrap_or(1);
    let root = BitMapBackend::new(path, (1200, height)).into_drawing_area();
    root.fill(&WHITE)?;
    for ((policy, contenders), area) in tables.iter().zip(root.split_evenly((tables.len(), 1))) {
        let sorted: Vec<(&str, Vec<Duration>)> = contenders
            .iter()
            .filter(|c| !c.samples.is_empty())
            .map(|c| {
                let mut samples = c.samples.clone();
                samples.sort_unstable();
                (c.name, samples)
            })
            .collect();
        let lo = sorted.iter().map(|(_, s)| us(&s[0])).fold(f64::MAX, f64::min).max(0.05);
        let hi = sorted
            .iter()
            .map(|(_, s)| us(&s[s.len() * 999 / 1000]))
            .fold(0.0, f64::max);
        let mut chart = ChartBuilder::on(&area)
            .caption(
                format!("`add` round trip, cumulative to p99.9 — {policy}"),
                ("sans-serif", 24),
            )
            .margin(20)
            .x_label_area_size(50)
            .y_label_area_size(60)
            .build_cartesian_2d((lo * 0.8..hi * 1.2).log_scale(), 0.0..1.0)?;
        chart
            .configure_mesh()
            .x_desc("round trip (µs, log scale)")
            .y_desc("fraction of calls")
            .label_style(("sans-serif", 16))
            .draw()?;
        for (i, (name, samples)) in sorted.iter().enumerate() {
            let (r, g, b) = COLORS[i % COLORS.len()];
            let color = RGBColor(r, g, b).to_rgba();
            let n = samples.len();
            let points: Vec<(f64, f64)> = (0..=500)
                .map(|k| {
                    let at = ((n - 1) * k / 500).min(n * 999 / 1000);
                    (us(&samples[at]), at as f64 / (n - 1).max(1) as f64)
                })
                .collect();
            chart
                .draw_series(LineSeries::new(points, color.stroke_width(3)))?
                .label(*name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3)));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .label_font(("sans-serif", 15))
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .draw()?;
    }
    root.present()?;
    Ok(())
}
