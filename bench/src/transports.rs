//! Every transport in one table: the broker's ring (spinning and sleeping), its native socket
//! and its gRPC session, each serving `add` with the full policy check and dispatch; and the
//! peers a user would pick instead: a raw Unix-socket ping-pong, a bare tonic echo server and
//! iceoryx2 request-response (`peers` feature). Contenders take turns round by round in the same
//! process, the client pinned to CPU 0 and every server thread to CPU 1. Then pipelined `add`
//! throughput over one ring, `checksum_dma` over 1 MiB against an in-process checksum, and a
//! latency-distribution plot (PNG).

use std::{
    io::{Read, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use portcullis_broker::{config::RingConfig, transport::native};
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

/// A broker serving only its native socket (and rings) in `dir`, with this ring configuration.
fn native_broker(servers: &tokio::runtime::Runtime, dir: &Path, ring: RingConfig) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let _guard = servers.enter();
    let listener = native::bind(&dir.join("native.sock")).unwrap();
    servers.spawn(native::serve(core(), listener, ring, std::future::pending()));
    dir.to_path_buf()
}

fn ring_config(wait: WaitMode) -> RingConfig {
    RingConfig {
        wait,
        cpu: (cpus() > SERVER_CPU).then_some(SERVER_CPU),
        ..RingConfig::default()
    }
}

fn ring_client(run_dir: &Path, wait: WaitMode) -> (RingClient, u64) {
    let options = RingOptions {
        wait,
        ..RingOptions::default()
    };
    let mut ring = RingClient::connect(run_dir, options).unwrap();
    let sample = ring.find("sample0").unwrap()[0].id;
    let handle = ring.open(sample, false).unwrap();
    (ring, handle)
}

fn ring_round(run_dir: &Path, wait: WaitMode, iters: usize, samples: &mut Vec<Duration>) {
    // A ring per round: a spinning broker thread must not run while the others are measured.
    let (mut ring, h) = ring_client(run_dir, wait);
    for i in 0..iters as u64 {
        let start = Instant::now();
        let out = ring.call(h, 0, &[i, 1], &[], 0).unwrap();
        samples.push(start.elapsed());
        assert_eq!(out.scalars, [i + 1]);
    }
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
    name: &'static str,
    samples: Vec<Duration>,
}

pub(crate) fn run(args: &Args, plot: &Path) {
    cpus();
    let dir = tempfile::tempdir().unwrap();
    let servers = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_start(|| pin(SERVER_CPU))
        .build()
        .unwrap();
    let spin_dir = native_broker(&servers, &dir.path().join("spin"), ring_config(WaitMode::Spin));
    let sleep_dir = native_broker(&servers, &dir.path().join("sleep"), ring_config(WaitMode::Sleep));
    let adaptive_dir = native_broker(&servers, &dir.path().join("adaptive"), ring_config(WaitMode::Adaptive));
    let (grpc_socket, echo_socket) = grpc::start(&servers, dir.path());
    pin(CLIENT_CPU);
    let client_rt = client_runtime();
    let (mut native_session, native_handle) = client_rt.block_on(async {
        let mut s = NativeSession::connect(&sleep_dir, AbiId::native()).await.unwrap();
        let sample = s.find("sample0").await.unwrap()[0].id;
        let h = s.open(sample, false).await.unwrap();
        (s, h)
    });
    let (mut grpc_stream, grpc_handle) = client_rt.block_on(grpc::broker_stream(&grpc_socket));
    let mut echo_stream = client_rt.block_on(grpc::echo_stream(&echo_socket));

    let mut contenders: Vec<Contender> = [
        "ring, spinning (broker and client spin)",
        "ring, sleeping (eventfd wake-ups)",
        "native socket (SOCK_SEQPACKET)",
        "gRPC session (Unix socket)",
        "peer: raw Unix-socket ping-pong",
        "peer: bare tonic echo (Unix socket)",
        #[cfg(feature = "peers")]
        "peer: iceoryx2 request-response (busy-poll)",
    ]
    .into_iter()
    .map(|name| Contender {
        name,
        samples: Vec::new(),
    })
    .collect();
    let mut one_round = |index: usize, iters: usize, samples: &mut Vec<Duration>| match index {
        0 => ring_round(&spin_dir, WaitMode::Spin, iters, samples),
        1 => ring_round(&sleep_dir, WaitMode::Sleep, iters, samples),
        2 => client_rt.block_on(async {
            for i in 0..iters as u64 {
                let start = Instant::now();
                let out = native_session.call(native_handle, 0, &[i, 1], &[], 0).await.unwrap();
                samples.push(start.elapsed());
                assert_eq!(out.scalars, [i + 1]);
            }
        }),
        3 => client_rt.block_on(grpc::measure(&mut grpc_stream, grpc_handle, iters, samples)),
        4 => uds_round(iters, samples),
        5 => client_rt.block_on(grpc::measure(&mut echo_stream, 0, iters, samples)),
        #[cfg(feature = "peers")]
        6 => iceoryx2_round(iters, samples),
        _ => unreachable!(),
    };
    for index in 0..contenders.len() {
        one_round(index, args.iters / 5, &mut Vec::new()); // warm-up
    }
    for _ in 0..args.rounds {
        for (index, contender) in contenders.iter_mut().enumerate() {
            one_round(index, args.iters, &mut contender.samples);
        }
    }
    let summaries: Vec<(&str, Summary)> = contenders
        .iter_mut()
        .map(|c| (c.name, summarize(&mut c.samples)))
        .collect();
    println!("### Every transport: `add` round trips (client CPU {CLIENT_CPU}, servers CPU {SERVER_CPU})\n");
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
    if let (Some(ring), Some(peer)) = (get("ring, spinning"), get("peer: iceoryx2")) {
        println!(
            "- ring (spin) / iceoryx2 request-response: {} (target ≤ 1.5×)",
            ratio(ring, peer)
        );
    }
    if let (Some(ring), Some(peer)) = (get("ring, sleeping"), get("peer: raw Unix")) {
        println!(
            "- ring (event) / raw Unix-socket ping-pong: {} (target ≤ 1.0×)",
            ratio(ring, peer)
        );
    }
    if let (Some(ours), Some(peer)) = (get("native socket"), get("peer: raw Unix")) {
        println!("- native socket / raw Unix-socket ping-pong: {}", ratio(ours, peer));
    }
    if let (Some(ours), Some(peer)) = (get("gRPC"), get("peer: bare tonic")) {
        println!("- gRPC session / bare tonic echo: {}", ratio(ours, peer));
    }
    println!();
    throughput(&spin_dir, &adaptive_dir, args);
    checksum(&adaptive_dir, args);
    unpin();
    match plot_cdf(plot, &contenders) {
        Ok(()) => println!("Latency distribution plot: `{}`\n", plot.display()),
        Err(e) => println!("(no plot: {e})\n"),
    }
}

/// Pipelined `add` over one ring: a window of requests in flight, for a fixed number of calls.
fn throughput(spin_dir: &Path, adaptive_dir: &Path, args: &Args) {
    const WINDOW: u64 = 4096;
    let calls = (args.iters as u64 * 400).max(200_000);
    println!("### Pipelined `add` over one ring ({calls} calls, {WINDOW} in flight, policy checks on)\n");
    println!("| broker ring thread / client | calls/s |");
    println!("|---|---|");
    for (label, run_dir, wait) in [
        ("spinning / spinning", spin_dir, WaitMode::Spin),
        ("adaptive (default) / adaptive", adaptive_dir, WaitMode::Adaptive),
    ] {
        let (mut ring, h) = ring_client(run_dir, wait);
        let start = Instant::now();
        let (mut sent, mut answered) = (0u64, 0u64);
        while answered < calls {
            while sent < calls && sent - answered < WINDOW {
                ring.submit_call(h, 0, &[sent, 1], &[], 0).unwrap();
                sent += 1;
            }
            let r = ring.next_response().unwrap();
            assert!(matches!(r.body, Body::Call { ref scalars, .. } if scalars.len() == 1));
            answered += 1;
        }
        let rate = calls as f64 / start.elapsed().as_secs_f64();
        println!("| {label} | {rate:.0} |");
    }
    println!("\ntarget ≥ 2,000,000 calls/s\n");
}

/// `checksum_dma` over the whole 1 MiB dma buffer through the ring, against FNV-1a over the
/// same bytes in this process.
fn checksum(run_dir: &Path, args: &Args) {
    let (mut ring, h) = ring_client(run_dir, WaitMode::Adaptive);
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

/// The latency distributions as CDFs on a log time axis.
fn plot_cdf(path: &Path, contenders: &[Contender]) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    let font = std::fs::read("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
        .map_err(|e| format!("DejaVuSans.ttf (Debian fonts-dejavu-core): {e}"))?;
    plotters::style::register_font("sans-serif", FontStyle::Normal, Box::leak(font.into_boxed_slice()))
        .map_err(|_| "the font does not load")?;
    let us = |d: &Duration| d.as_secs_f64() * 1e6;
    let lo = contenders
        .iter()
        .filter_map(|c| c.samples.first())
        .map(us)
        .fold(f64::MAX, f64::min)
        .max(0.05);
    let hi = contenders
        .iter()
        .filter_map(|c| c.samples.get(c.samples.len() * 999 / 1000))
        .map(us)
        .fold(0.0, f64::max);
    let root = BitMapBackend::new(path, (1200, 700)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("`add` round-trip latency, cumulative (to p99.9)", ("sans-serif", 26))
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
    for (i, c) in contenders.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let n = c.samples.len();
        let points: Vec<(f64, f64)> = (0..=500)
            .map(|k| {
                let at = ((n - 1) * k / 500).min(n * 999 / 1000);
                (us(&c.samples[at]), at as f64 / (n - 1) as f64)
            })
            .collect();
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(3)))?
            .label(c.name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .label_font(("sans-serif", 16))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
