//! Cost at scale: what one operation costs as the things it should not depend on grow —
//! pending waiters, idle sessions, policy rules — and what each idle session and each rule
//! costs in memory. Every row is measured against its own baseline (the smallest count) in
//! the same run; a line that stays flat is the result. `cargo xtask bench scale` (also writes
//! `docs/bench-scale.png`, each cost over its count, relative to the baseline).

use std::{
    collections::BTreeMap,
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use portcullis_broker::{
    config::Config,
    registry::{Matching, OpenMode},
    server,
    session::{CallStarted, Core, PeerIdentity, Session},
};
use portcullis_client::{Client, native::NativeSession, ring::RingClient};
use portcullis_policy::{Policy, Source};
use portcullis_proto::{layout::AbiId, ring::WaitMode};

use crate::{client_runtime, policy::median, process::Broker};

/// One series of the plot: a cost over a count, as ratios to the first point.
struct Series {
    name: &'static str,
    points: Vec<(f64, f64)>,
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn p99(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * 0.99).round() as usize]
}

/// The parts of the scale benchmark, for `--scale-only`.
pub(crate) const PARTS: &[&str] = &[
    "waiters",
    "rules",
    "events",
    "rings",
    "sessions",
    "rule-memory",
    "clients",
];

pub(crate) fn run(quick: bool, plot: &Path, only: &[&str]) {
    println!("## Cost at scale\n");
    let wants = |part: &str| only.is_empty() || only.contains(&part);
    let mut series = Vec::new();
    if wants("waiters") {
        series.push(waiters(quick));
    }
    if wants("rules") {
        series.extend(rules(quick));
    }
    if wants("events") {
        series.push(events(quick));
    }
    if wants("rings") {
        series.push(rings(quick));
        spin_against_baseline(quick);
    }
    if wants("sessions") {
        sessions(quick);
    }
    if wants("rule-memory") {
        rule_memory(quick);
    }
    if wants("clients") {
        let figures = crate::clients::run(quick);
        series.push(Series {
            name: "many clients: p99 / the peer's p99",
            points: figures.iter().map(|f| (f.clients as f64, f.p99_ratio)).collect(),
        });
        series.push(Series {
            name: "many clients: Jain's fairness index (1 is fair)",
            points: figures.iter().map(|f| (f.clients as f64, f.jain)).collect(),
        });
    }
    if series.is_empty() {
        return;
    }
    if let Err(e) = plot_series(plot, &series) {
        println!("(no plot: {e})\n");
    } else {
        println!("Plot: `{}`\n", plot.display());
    }
}

/// An in-process core on the embedded policy, with room for many pending calls.
fn core_for_waiters() -> Arc<Core> {
    let config =
        "[limits]\nmax_pending_calls_per_uid = 1000000\n\n[[device]]\nname = \"sample0\"\ndriver = \"sample\"\n";
    server::build_core(&Config::parse("bench", config).unwrap(), None).unwrap()
}

fn sample_session(core: &Arc<Core>, peer: &Arc<PeerIdentity>) -> (Session, u64) {
    let mut s = Session::new(core.clone(), peer.clone(), AbiId::native());
    let id = s.find_services(&Matching::name("sample0"))[0].id();
    let (handle, _, _) = s.open_user_client(id, OpenMode::Shared).unwrap();
    (s, handle)
}

/// Registering a `wait_event` with 0 … 100,000 others pending on the same device.
fn waiters(quick: bool) -> Series {
    println!("### Registering a `wait_event` with others pending on the device\n");
    let runtime = crate::server_runtime();
    let _guard = runtime.enter();
    let core = core_for_waiters();
    let peer = Arc::new(PeerIdentity::of_self().unwrap());
    let levels: &[usize] = if quick {
        &[0, 1_000, 10_000]
    } else {
        &[0, 1_000, 10_000, 100_000]
    };
    let samples = if quick { 500 } else { 3_000 };
    let (mut probe, probe_handle) = sample_session(&core, &peer);
    // Waiters held: 1,000 per session (a session may have 1,024 pending).
    let mut holders: Vec<(Session, u64, Vec<CallStarted>)> = Vec::new();
    let mut held = 0;
    let mut measure = |held: usize| {
        let mut took = Vec::with_capacity(samples);
        for _ in 0..samples {
            let t = Instant::now();
            let started = probe.call(probe_handle, 3, vec![60_000], vec![], 0).unwrap();
            // Registered; the cancelled call leaves the device as it goes.
            drop(started);
            took.push(us(t.elapsed()));
        }
        (held, median(took.clone()), p99(took))
    };
    let mut rows = vec![measure(0)];
    for &level in levels.iter().skip(1) {
        while held < level {
            if holders.last().is_none_or(|(_, _, calls)| calls.len() >= 1_000) {
                let (s, h) = sample_session(&core, &peer);
                holders.push((s, h, Vec::new()));
            }
            let (s, handle, calls) = holders.last_mut().unwrap();
            calls.push(s.call(*handle, 3, vec![60_000], vec![], 0).unwrap());
            held += 1;
        }
        rows.push(measure(held));
    }
    drop(holders);
    rows.push(measure(0));
    println!("| pending waiters | register + cancel p50 µs | p99 µs | p50 vs none |");
    println!("|---|---|---|---|");
    let base = rows[0].1;
    for (i, (n, p50, p99)) in rows.iter().enumerate() {
        let label = if i + 1 == rows.len() {
            format!("{n} (again, after)")
        } else {
            n.to_string()
        };
        println!("| {label} | {p50:.2} | {p99:.2} | {:.2}× |", p50 / base);
    }
    let worst = rows.iter().map(|r| r.1 / base).fold(0.0, f64::max);
    println!("\nworst ratio to none pending: **{worst:.2}×** (target ≤ 1.2× up to 100,000)\n");
    Series {
        name: "wait_event register (waiters)",
        points: rows[..rows.len() - 1]
            .iter()
            .map(|r| (r.0.max(1) as f64, r.1 / base))
            .collect(),
    }
}

/// A policy of `rules` rules beside the embedded one: rules for other users' principals
/// (one uid each) about other services, as a big site's policy is — per-app, per-user rules —
/// so that what applies to the measured task stays the same while the policy grows.
pub(crate) fn big_policy(rules: usize) -> String {
    let mut text = include_str!("../../broker/src/default_policy.toml").to_string();
    let principals = (rules / 10).max(1);
    for p in 0..principals {
        text.push_str(&format!(
            "\n[[principal]]\nname = \"user{p}\"\nuid = [{}]\n",
            10_000 + p
        ));
    }
    for r in 0..rules {
        // A third about the whole class (every sample device), the rest about one device each.
        let service = if r % 3 == 0 {
            "class = \"SampleDevice\"".to_string()
        } else {
            format!("class = \"SampleDevice\", name = \"dev{}\"", r % 5_000)
        };
        text.push_str(&format!(
            "\n[[rule]]\nid = \"r{r}\"\neffect = \"{}\"\nprincipals = [\"user{}\"]\nservice = {{ {service} }}\nmethods = [\"add\", \"echo\"]\n",
            if r % 97 == 5 { "forbid" } else { "allow" },
            r % principals,
        ));
    }
    text
}

fn parse(text: &str) -> Policy {
    Policy::parse(&[Source {
        origin: "big.toml",
        text,
    }])
    .unwrap()
}

/// Admission (open + close) and discovery as the policy grows from 10 to 50,000 rules.
fn rules(quick: bool) -> Vec<Series> {
    println!("### Admission and discovery as the policy grows\n");
    let runtime = crate::server_runtime();
    let _guard = runtime.enter();
    let config =
        "[[device]]\nname = \"sample0\"\ndriver = \"sample\"\n\n[[device]]\nname = \"sample1\"\ndriver = \"sample\"\n";
    let core = server::build_core(&Config::parse("bench", config).unwrap(), None).unwrap();
    let peer = Arc::new(PeerIdentity::of_self().unwrap());
    let iters = if quick { 200 } else { 1_000 };
    let mut rows = Vec::new();
    for rules in [10, 1_000, 10_000, 50_000] {
        core.replace_policy(parse(&big_policy(rules)));
        let mut s = Session::new(core.clone(), peer.clone(), AbiId::native());
        let id = s.find_services(&Matching::name("sample0"))[0].id();
        let (mut open, mut find) = (Vec::new(), Vec::new());
        for _ in 0..iters {
            let t = Instant::now();
            let (handle, _, _) = s.open_user_client(id, OpenMode::Shared).unwrap();
            s.close_user_client(handle).unwrap();
            open.push(us(t.elapsed()));
            let t = Instant::now();
            let found = s.find_services(&Matching::default());
            find.push(us(t.elapsed()));
            assert!(found.len() >= 3, "the samples and the power domain are visible");
        }
        rows.push((rules, median(open), median(find)));
    }
    println!(
        "| rules | open + close p50 µs | FindServices (every service) p50 µs | open vs 10 rules | find vs 10 rules |"
    );
    println!("|---|---|---|---|---|");
    let (o0, f0) = (rows[0].1, rows[0].2);
    for (n, o, f) in &rows {
        println!("| {n} | {o:.2} | {f:.2} | {:.2}× | {:.2}× |", o / o0, f / f0);
    }
    let last = rows.last().unwrap();
    println!(
        "\nat 50,000 rules: open {:.1} µs, FindServices {:.1} µs (target ≤ 50 µs each)\n",
        last.1, last.2
    );
    vec![
        Series {
            name: "open (rules)",
            points: rows.iter().map(|r| (r.0 as f64, r.1 / o0)).collect(),
        },
        Series {
            name: "FindServices (rules)",
            points: rows.iter().map(|r| (r.0 as f64, r.2 / f0)).collect(),
        },
    ]
}

const SCALE_CONFIG: &str = "discovery = false\nmax_connections = 30000\n\n[limits]\nmax_connections_per_uid = 30000\nmax_rings_per_uid = 2000\nidle_timeout_ms = 0\n\n[ring]\nmax_rings = 2000\n\n[[device]]\nname = \"sample0\"\ndriver = \"sample\"\n";

fn scale_dir() -> tempfile::TempDir {
    crate::shared_tempdir("portcullis-bench-scale-")
}

/// `fire_event` (a notification nobody subscribed to) with 0 … 4,000 idle sessions connected:
/// the round trip, and the broker's CPU time per event.
fn events(quick: bool) -> Series {
    println!("### An event with many idle sessions\n");
    let dir = scale_dir();
    let broker = Broker::start(dir.path(), "events", SCALE_CONFIG);
    let rt = client_runtime();
    let levels: &[usize] = if quick { &[0, 500, 2_000] } else { &[0, 1_000, 4_000] };
    let events = if quick { 1_000 } else { 5_000 };
    let mut idle = Vec::new();
    let mut rows = Vec::new();
    rt.block_on(async {
        let mut firing = NativeSession::connect(&broker.run_dir, AbiId::native()).await.unwrap();
        let id = firing.find("sample0").await.unwrap()[0].id;
        let h = firing.open(id, false).await.unwrap();
        for &level in levels {
            while idle.len() < level {
                idle.push(NativeSession::connect(&broker.run_dir, AbiId::native()).await.unwrap());
            }
            // Settled: the connections' own work is done before the clock starts.
            firing.call(h, 0, &[1, 2], &[], 0).await.unwrap();
            let cpu = broker.cpu();
            let mut took = Vec::with_capacity(events);
            for i in 0..events as u64 {
                let t = Instant::now();
                firing.call(h, 4, &[i], &[], 0).await.unwrap();
                took.push(us(t.elapsed()));
            }
            let per_event = us(broker.cpu().saturating_sub(cpu)) / events as f64;
            rows.push((level, median(took), per_event));
        }
    });
    drop(idle);
    println!("| idle sessions | fire_event round trip p50 µs | broker CPU per event µs | CPU vs none |");
    println!("|---|---|---|---|");
    let base = rows[0].2;
    for (n, rt, cpu) in &rows {
        println!("| {n} | {rt:.2} | {cpu:.2} | {:.2}× |", cpu / base);
    }
    println!(
        "\nAn event reaches only the sessions subscribed to its service (the test `a_notification_reaches_only_the_sessions_that_subscribed` asserts it); the broker's CPU per event with {} idle sessions is **{:.2}×** its cost with none.\n",
        rows.last().unwrap().0,
        rows.last().unwrap().2 / base
    );
    Series {
        name: "event CPU (idle sessions)",
        points: rows.iter().map(|r| (r.0.max(1) as f64, r.2 / base)).collect(),
    }
}

/// A broker for many rings, whose rings wait as `wait` says (pinned to `cpu`, if any).
fn rings_config(wait: &str, cpu: Option<usize>) -> String {
    let pin = cpu.map_or(String::new(), |cpu| format!("cpu = {cpu}\n"));
    format!(
        "discovery = false\nmax_connections = 30000\n\n[limits]\nmax_connections_per_uid = 30000\nmax_rings_per_uid = 12000\nidle_timeout_ms = 0\n\n[ring]\nmax_rings = 12000\nwait = \"{wait}\"\n{pin}\n[[device]]\nname = \"sample0\"\ndriver = \"sample\"\n"
    )
}

/// Most idle rings one holder process keeps (six descriptors each on the client's side).
const RINGS_PER_HOLDER: usize = 2_500;

/// `portcullis-bench --hold-rings RUN_DIR COUNT`: connects `count` rings that sleep (each used
/// once), says `ready`, and keeps them until its standard input closes.
pub(crate) fn hold_rings(run_dir: &Path, count: usize) {
    portcullis_broker::raise_descriptor_limit();
    let rings: Vec<_> = (0..count)
        .map(|_| {
            let (mut ring, h) = crate::transports::ring_client(run_dir, WaitMode::Sleep);
            ring.close(h).unwrap();
            ring
        })
        .collect();
    println!("ready");
    let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut Vec::new());
    drop(rings);
}

/// Processes holding idle rings on a broker, let go when dropped.
struct Holders {
    children: Vec<std::process::Child>,
    held: usize,
}

impl Holders {
    /// Grows the idle rings held to `total`.
    fn grow_to(&mut self, run_dir: &Path, total: usize) {
        use std::io::BufRead;
        while self.held < total {
            let count = (total - self.held).min(RINGS_PER_HOLDER);
            let mut child = std::process::Command::new(std::env::current_exe().unwrap())
                .arg("--hold-rings")
                .arg(run_dir)
                .arg(count.to_string())
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            let mut line = String::new();
            std::io::BufReader::new(child.stdout.take().unwrap())
                .read_line(&mut line)
                .unwrap();
            assert_eq!(line.trim(), "ready", "a ring holder failed");
            self.children.push(child);
            self.held += count;
        }
    }
}

impl Drop for Holders {
    fn drop(&mut self) {
        for child in &mut self.children {
            drop(child.stdin.take());
            let _ = child.wait();
        }
    }
}

/// `calls` round trips of `add` on a ring: the latencies in µs.
fn ring_latencies(ring: &mut RingClient, handle: u64, calls: usize) -> Vec<f64> {
    (0..calls as u64)
        .map(|i| {
            let t = Instant::now();
            let out = ring.call(handle, 0, &[i, 1], &[], 0).unwrap();
            assert_eq!(out.scalars, [i + 1]);
            us(t.elapsed())
        })
        .collect()
}

/// 0 … 10,000 idle rings (each used once) on one broker: its threads and descriptors, the CPU
/// it burns while they sit idle, and an active ring's latency beside them.
fn rings(quick: bool) -> Series {
    println!("### Many rings on one broker\n");
    let dir = scale_dir();
    let broker = Broker::start(dir.path(), "rings", &rings_config("adaptive", None));
    let limit = broker.fd_limit();
    // 3 descriptors per ring session (a holder process's rings share its pidfd): a broker whose
    // descriptor limit is 20,000 holds ~6,630.
    let room = (limit.saturating_sub(100) / 3) as usize;
    let most = if quick { 3_000 } else { 10_000 }.min(room / 500 * 500);
    let levels = [0, 1_000, most];
    let calls = if quick { 3_000 } else { 20_000 };
    let window = Duration::from_secs(if quick { 1 } else { 3 });
    let (mut active, handle) = crate::transports::ring_client(&broker.run_dir, WaitMode::Adaptive);
    let mut idle = Holders {
        children: Vec::new(),
        held: 0,
    };
    let mut rows = Vec::new();
    for level in levels {
        idle.grow_to(&broker.run_dir, level);
        ring_latencies(&mut active, handle, 200);
        // Idle: nothing calls while the broker's CPU time is read over the window.
        let cpu = broker.cpu();
        std::thread::sleep(window);
        let idle_cpu = broker.cpu().saturating_sub(cpu).as_secs_f64() / window.as_secs_f64() * 100.0;
        let (threads, fds) = (broker.threads(), broker.fds());
        let took = ring_latencies(&mut active, handle, calls);
        rows.push((level, threads, fds, idle_cpu, median(took.clone()), p99(took)));
    }
    drop(idle);
    println!(
        "| idle rings | broker threads | broker descriptors | broker CPU while idle (% of a core) | active ring p50 µs | p99 µs | p50 vs none |"
    );
    println!("|---|---|---|---|---|---|---|");
    let base = rows[0].4;
    for (n, threads, fds, cpu, p50, p99) in &rows {
        println!(
            "| {n} | {threads} | {fds} | {cpu:.2} | {p50:.2} | {p99:.2} | {:.2}× |",
            p50 / base
        );
    }
    let (first, last) = (&rows[0], rows.last().unwrap());
    let per_ring = (last.2 - first.2) as f64 / (last.0 - first.0).max(1) as f64;
    println!(
        "\n{} rings on one broker (descriptor limit {limit}): {} threads with none, {} with them; {per_ring:.1} descriptors per ring; idle CPU {:.2}% of a core; an active ring's p50 is **{:.2}×** its latency beside none.\n",
        last.0,
        first.1,
        last.1,
        last.3,
        last.4 / base
    );
    Series {
        name: "ring p50 (idle rings)",
        points: rows.iter().map(|r| (r.0.max(1) as f64, r.4 / base)).collect(),
    }
}

/// Spin-mode latency on this build and on an earlier one (`PORTCULLIS_BASELINE_BIN`), in
/// alternating rounds of the same run, the ring thread pinned to CPU 1 and the client to 0.
fn spin_against_baseline(quick: bool) {
    println!("### Spin-mode ring latency against an earlier build\n");
    let Some(baseline) = std::env::var_os("PORTCULLIS_BASELINE_BIN").map(std::path::PathBuf::from) else {
        println!(
            "Not measured: set `PORTCULLIS_BASELINE_BIN` to an earlier build of the broker (`git worktree add /tmp/before <rev> && cargo build --release -p portcullis-cli` there).\n"
        );
        return;
    };
    let dir = scale_dir();
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let server_cpu = (cpus > 1).then_some(1);
    let rounds = if quick { 3 } else { 7 };
    let calls = if quick { 20_000 } else { 100_000 };
    let builds = [("this build", crate::process::binary()), ("baseline", baseline)];
    let mut p50s: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let mut p99s: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for round in 0..rounds {
        for (which, (name, binary)) in builds.iter().enumerate() {
            let broker = Broker::start_binary(
                binary,
                dir.path(),
                &format!("spin-{which}-{round}"),
                &rings_config("spin", server_cpu),
            );
            let run_dir = broker.run_dir.clone();
            let took = std::thread::spawn(move || {
                if cpus > 1 {
                    portcullis_broker::transport::native::pin_to(0);
                }
                let (mut ring, handle) = crate::transports::ring_client(&run_dir, WaitMode::Spin);
                ring_latencies(&mut ring, handle, calls / 10);
                ring_latencies(&mut ring, handle, calls)
            })
            .join()
            .unwrap_or_else(|_| panic!("the {name} round failed"));
            p50s[which].push(median(took.clone()));
            p99s[which].push(p99(took));
        }
    }
    println!("| build | p50 µs (median of {rounds} rounds) | p99 µs (median) |");
    println!("|---|---|---|");
    for (which, (name, _)) in builds.iter().enumerate() {
        println!(
            "| {name} | {:.3} | {:.3} |",
            median(p50s[which].clone()),
            median(p99s[which].clone())
        );
    }
    println!(
        "\nSpin-mode p50, this build over the baseline: **{:.3}×** (target ≤ 1.05×).\n",
        median(p50s[0].clone()) / median(p50s[1].clone())
    );
}

/// A broker's RSS once it has stopped falling (it hands freed memory back on a blocking thread,
/// after what freed it).
fn settled_rss(b: &Broker) -> u64 {
    let mut last = b.rss();
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(100));
        let now = b.rss();
        if now >= last {
            return now;
        }
        last = now;
    }
    last
}

/// Memory per idle session, per transport, and what is left after they close; and, in the
/// same run, what a bare tonic server (the gRPC peer, in a process of its own) holds per idle
/// connection, and what a gRPC session costs when an app's sessions share a connection.
fn sessions(quick: bool) {
    println!("### Memory per idle session\n");
    // This process holds every session's socket too.
    portcullis_broker::raise_descriptor_limit();
    let dir = scale_dir();
    // 10,000 native sessions: their broker holds a descriptor each (the bench's one pidfd
    // besides), within a limit of 20,000. gRPC at 2,000: its memory is known to be above target.
    let n = if quick { 500 } else { 2_000 };
    let native = if quick { 1_000 } else { 10_000 };
    let rings = if quick { 100 } else { 500 };
    let rt = client_runtime();
    println!(
        "| transport | sessions | broker RSS before MiB | with them MiB | per session KiB | of it, the ring's shared pages KiB | descriptors per session | threads with them | after they close MiB |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    let mut per_session = BTreeMap::new();
    for (row, transport) in ["native", "gRPC", SHARED_GRPC, "ring", ECHO_PEER]
        .into_iter()
        .enumerate()
    {
        let name = format!("sessions-{row}");
        let (broker, echo) = if transport == ECHO_PEER {
            let (peer, socket) = Broker::echo_peer(dir.path(), &name);
            (peer, Some(socket))
        } else {
            (Broker::start(dir.path(), &name, SCALE_CONFIG), None)
        };
        let settle = || std::thread::sleep(Duration::from_millis(300));
        // Asks, after the sessions are dropped, when the broker has seen them all go.
        let admin = match echo {
            None => Some(rt.block_on(Client::connect(&broker.run_dir)).unwrap()),
            Some(_) => None,
        };
        settle();
        let (before, shared_before, fds_before) = (broker.rss(), broker.shared_rss(), broker.fds());
        let count = match transport {
            "native" => native,
            "ring" => rings,
            _ => n,
        };
        let (with, shared, fds, threads) = rt.block_on(async {
            let mut natives = Vec::new();
            let mut grpcs = Vec::new();
            let mut shared = Vec::new();
            let mut ringed = Vec::new();
            let mut echoes = Vec::new();
            for i in 0..count {
                match transport {
                    "native" => natives.push(NativeSession::connect(&broker.run_dir, AbiId::native()).await.unwrap()),
                    "gRPC" => {
                        let c = Client::connect(&broker.run_dir).await.unwrap();
                        let s = c.session().await.unwrap();
                        grpcs.push((c, s));
                    }
                    SHARED_GRPC => {
                        if i % SESSIONS_PER_CONNECTION == 0 {
                            shared.push((Client::connect(&broker.run_dir).await.unwrap(), Vec::new()));
                        }
                        let (c, sessions) = shared.last_mut().unwrap();
                        sessions.push(c.session().await.unwrap());
                    }
                    ECHO_PEER => {
                        echoes.push(crate::grpc::echo_stream(echo.as_deref().unwrap()).await);
                    }
                    _ => {
                        let mut r = portcullis_client::ring::RingClient::connect(
                            &broker.run_dir,
                            portcullis_client::ring::RingOptions::default(),
                        )
                        .unwrap();
                        // Used once: its pages are touched.
                        let id = r.find("sample0").unwrap()[0].id;
                        let h = r.open(id, false).unwrap();
                        r.call(h, 0, &[1, 2], &[], 0).unwrap();
                        r.close(h).unwrap();
                        ringed.push(r);
                    }
                }
            }
            settle();
            let with = (broker.rss(), broker.shared_rss(), broker.fds(), broker.threads());
            drop((natives, grpcs, shared, ringed, echoes));
            // Within this runtime, which closes the dropped gRPC channels' connections.
            loop {
                let gone = match &admin {
                    Some(admin) => {
                        let stats = admin.stats().await.unwrap();
                        stats.sessions == 0 && stats.connections <= 1
                    }
                    // The peer has no stats: its descriptors tell when it has let them go.
                    None => broker.fds() <= fds_before,
                };
                if gone {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            with
        });
        let after = settled_rss(&broker);
        let kib_each = |with: u64, without: u64| with.saturating_sub(without) as f64 / count as f64 / 1024.0;
        per_session.insert(transport, kib_each(with, before));
        println!(
            "| {transport} | {count} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {threads} | {:.1} |",
            mib(before),
            mib(with),
            kib_each(with, before),
            kib_each(shared, shared_before),
            fds.saturating_sub(fds_before) as f64 / count as f64,
            mib(after)
        );
    }
    println!(
        "\nTarget: ≤ 8 KiB per idle session; 10,000 idle sessions ≤ 100 MiB; RSS back within 2× of idle after they close.\n"
    );
    println!(
        "gRPC, a connection per session, against the bare tonic server's idle connection: **{:.2}×** ({:.1} against {:.1} KiB).\n",
        per_session["gRPC"] / per_session[ECHO_PEER],
        per_session["gRPC"],
        per_session[ECHO_PEER]
    );
}

/// The gRPC row whose sessions share connections, as an app's sessions over one `Client` do.
const SHARED_GRPC: &str = "gRPC, 50 sessions per connection";
const SESSIONS_PER_CONNECTION: usize = 50;
/// The peer's row: a bare tonic server holding an idle connection and stream per client.
const ECHO_PEER: &str = "peer: bare tonic, a connection and stream each";

/// RSS per policy rule: a broker loaded with 50,000 rules, then after 10 reloads, against one
/// with the embedded policy, in the same run.
fn rule_memory(quick: bool) {
    println!("### Memory per policy rule\n");
    let dir = scale_dir();
    let rules = if quick { 10_000 } else { 50_000 };
    let policy = dir.path().join("big-policy.toml");
    std::fs::write(&policy, big_policy(rules)).unwrap();
    let small = Broker::start(dir.path(), "rules-small", SCALE_CONFIG);
    let big = Broker::start(
        dir.path(),
        "rules-big",
        &format!("policy = \"{}\"\n{SCALE_CONFIG}", policy.display()),
    );
    let rt = client_runtime();
    // The broker hands freed memory back on a blocking thread after a reload answers.
    let kib_per_rule = |b: &Broker| (settled_rss(b).saturating_sub(small.rss())) as f64 / rules as f64 / 1024.0;
    let loaded = kib_per_rule(&big);
    let mut after: BTreeMap<usize, f64> = BTreeMap::new();
    rt.block_on(async {
        let client = Client::connect(&big.run_dir).await.unwrap();
        for i in 1..=10 {
            client.reload_policy().await.unwrap();
            if i == 1 || i == 5 || i == 10 {
                after.insert(i, kib_per_rule(&big));
            }
        }
    });
    // What a parsed policy keeps, in this process: the allocator's bytes in use around a parse.
    let text = big_policy(rules);
    let in_use = || portcullis_broker::heap_in_use() as f64;
    let before = in_use();
    let parsed = parse(&text);
    let heap = (in_use() - before) / rules as f64 / 1024.0;
    drop(parsed);
    println!("| {rules} rules | RSS per rule KiB (over the embedded policy's broker) |");
    println!("|---|---|");
    println!("| heap in use per parsed rule (this process, `mallinfo2`) | {heap:.2} |");
    println!("| loaded | {loaded:.2} |");
    for (i, v) in &after {
        println!("| after {i} reload(s) | {v:.2} |");
    }
    println!("\nTarget: ≤ 2.5 KiB RSS per rule after 10 reloads.\n");
}

fn plot_series(path: &Path, series: &[Series]) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    crate::transports::register_font()?;
    let root = BitMapBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let max_y = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .fold(2.0, f64::max)
        * 1.1;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Cost against count (ratio to the smallest count; flat is the result)",
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d((1f64..200_000f64).log_scale(), 0f64..max_y)?;
    chart
        .configure_mesh()
        .x_desc("count (waiters, rules, idle sessions, rings, clients)")
        .y_desc("cost / cost at the smallest count")
        .draw()?;
    for (i, s) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(s.points.iter().copied(), color.stroke_width(2)))?
            .label(s.name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
