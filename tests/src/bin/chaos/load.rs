//! Load: a thousand clients at once, each calling in a loop, while a client at a normal pace
//! measures its latency against the idle broker's; and stalled clients (never reading their
//! events, never draining their ring) beside clients flooding at their limits. The crowd runs
//! as an unprivileged user in a process of its own (`chaos load` / `chaos stall`), as other
//! apps would; the measuring client is root's.

use std::{
    io::{BufRead, BufReader},
    process::{Command, ExitCode, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use portcullis_client::{
    Client, ClientError, OpenMode, Status,
    native::NativeSession,
    ring::{RingClient, RingOptions},
};
use portcullis_proto::{
    frame::{Body, Request},
    layout::AbiId,
};
use portcullis_tests::{Broker, BrokerSetup, NOBODY};

use crate::{Outcome, Scale, common};

/// Room for a thousand clients of one user (the defaults would refuse most of them, as they
/// should on a shared machine).
const CONFIG: &str = "max_connections = 4096\n[limits]\nmax_connections_per_uid = 4096\nmax_rings_per_uid = 16\n[ring]\nmax_rings = 64\n[[device]]\nname = \"sample0\"\ndriver = \"sample\"\n";

/// The crowd's process: `chaos MODE RUN_DIR ARGS...` as nobody, at idle priority
/// (`SCHED_IDLE`), so that on a two-core machine the load generator's own CPU does
/// not take the measuring client's (at nice 0 or 19 it does: docs/RELIABILITY.md has both).
/// Its stdout: `ready` once every client is connected, then its JSON report.
fn crowd(broker: &Broker, args: &[String]) -> Result<std::process::Child, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let copy = broker.copy_program(&exe, "chaos");
    let mut cmd = Command::new("chrt");
    cmd.args(["--idle", "0", "setpriv"]);
    cmd.args([
        format!("--reuid={NOBODY}"),
        format!("--regid={NOBODY}"),
        "--clear-groups".into(),
        "--".into(),
    ])
    .arg(copy)
    .args(args)
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit())
    .spawn()
    .map_err(|e| format!("the crowd: {e}"))
}

/// Measures the paced client while the crowd runs, and collects the crowd's report.
fn under(
    broker: &Broker,
    peer: &common::Peer,
    mut child: std::process::Child,
    seconds: u64,
) -> Result<(common::Paced, f64, serde_json::Value), String> {
    let mut lines = BufReader::new(child.stdout.take().ok_or("no stdout")?).lines();
    match lines.next() {
        Some(Ok(l)) if l == "ready" => {}
        other => return Err(format!("the crowd did not get ready: {other:?}")),
    }
    let stop = AtomicBool::new(false);
    let (paced, peak) = std::thread::scope(|scope| {
        let sampler = scope.spawn(|| {
            let mut peak = 0f64;
            while !stop.load(Ordering::Relaxed) {
                peak = peak.max(common::rss_mib(broker));
                std::thread::sleep(Duration::from_millis(500));
            }
            peak
        });
        let paced = common::paced(broker, measured_for(seconds), Duration::from_millis(5), Some(peer));
        stop.store(true, Ordering::Relaxed);
        (paced, sampler.join().unwrap_or(0.0))
    });
    let report = lines.next().and_then(Result::ok).ok_or("the crowd gave no report")?;
    let status = child.wait().map_err(|e| e.to_string())?;
    if !status.success() {
        return Err(format!("the crowd ended {status}: {report}"));
    }
    let report: serde_json::Value = serde_json::from_str(&report).map_err(|e| format!("the crowd's report: {e}"))?;
    Ok((paced?, peak, report))
}

/// How long the paced client is measured, idle and under a crowd that runs for `seconds`:
/// inside the crowd's run (it ends a second after this), and as long idle, so that both p99s
/// are read from as many samples (from 2,000 idle against 6,000 loaded, the idle p99 of one
/// broker moved from 66 to 132 µs between runs).
fn measured_for(seconds: u64) -> Duration {
    Duration::from_secs(seconds.saturating_sub(1).max(1))
}

/// A broker, a paced client's latencies on it (and on the echo peer beside it) idle, then under
/// a crowd (`chaos MODE ARGS...`) for `seconds`, and what the crowd reported.
struct Measured {
    broker: Broker,
    baseline: u64,
    idle: common::Paced,
    loaded: common::Paced,
    rss_idle: f64,
    rss_peak: f64,
    report: serde_json::Value,
}

fn measured(config: &str, mode: &str, args: &[String], seconds: u64) -> Result<Measured, String> {
    let broker = Broker::with(BrokerSetup {
        config: Some(config),
        log_level: Some("warn"),
        ..BrokerSetup::default()
    });
    let baseline = broker.baseline_fds();
    let peer_dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let peer = common::Peer::start(peer_dir.path())?;
    let idle = common::paced(&broker, measured_for(seconds), Duration::from_millis(5), Some(&peer))?;
    let rss_idle = common::rss_mib(&broker);
    let mut argv = vec![mode.to_string(), broker.run_dir().display().to_string()];
    argv.extend_from_slice(args);
    let child = crowd(&broker, &argv)?;
    let (loaded, rss_peak, report) = under(&broker, &peer, child, seconds)?;
    Ok(Measured {
        broker,
        baseline,
        idle,
        loaded,
        rss_idle,
        rss_peak,
        report,
    })
}

pub(crate) fn run(scale: Scale) -> Result<Outcome, String> {
    let Measured {
        broker,
        baseline,
        idle,
        loaded,
        rss_idle,
        rss_peak,
        report,
    } = measured(
        CONFIG,
        "load",
        &[scale.load_clients.to_string(), scale.load_seconds.to_string()],
        scale.load_seconds,
    )?;
    let errors = report["errors"].as_u64().unwrap_or(u64::MAX);
    let (p50_idle, p99_idle) = (
        common::quantile_us(&idle.broker, 0.5),
        common::quantile_us(&idle.broker, 0.99),
    );
    let (p50, p99) = (
        common::quantile_us(&loaded.broker, 0.5),
        common::quantile_us(&loaded.broker, 0.99),
    );
    let ratio = p99 / p99_idle;
    let peer = PeerP99::of(&idle, &loaded);
    common::no_leaks(&broker, baseline)?;
    let summary = format!(
        "{} clients calling in a loop for {} s: {} calls, {errors} errors, Jain {:.3}; the paced client's p50 {p50:.0} us, p99 {p99:.0} us vs {p50_idle:.0} / {p99_idle:.0} us idle ({ratio:.2}x){peer}; RSS {rss_idle:.1} MiB idle, {rss_peak:.1} MiB peak",
        scale.load_clients,
        scale.load_seconds,
        report["calls"],
        report["jain"].as_f64().unwrap_or(0.0)
    );
    if errors != 0 {
        return Err(format!("{summary}; first error: {}", report["first_error"]));
    }
    if ratio > 2.0 && scale.gate_latency {
        return Err(format!("{summary}: the paced client's p99 is over 2x idle"));
    }
    if rss_peak > 512.0 {
        return Err(format!("{summary}: RSS over 512 MiB"));
    }
    Ok(Outcome {
        summary,
        figures: serde_json::json!({
            "clients": scale.load_clients, "seconds": scale.load_seconds, "crowd": report,
            "paced_p50_us": p50, "paced_p99_us": p99, "idle_p50_us": p50_idle, "idle_p99_us": p99_idle,
            "p99_ratio": ratio, "rss_idle_mib": rss_idle, "rss_peak_mib": rss_peak, "echo_peer": peer.json(),
        }),
    })
}

pub(crate) fn run_stall(scale: Scale) -> Result<Outcome, String> {
    let Measured {
        broker,
        baseline,
        idle,
        loaded,
        report,
        ..
    } = measured(
        // The default limits, which the flooders run into.
        "[[device]]\nname = \"sample0\"\ndriver = \"sample\"\n",
        "stall",
        &[scale.stall_seconds.to_string()],
        scale.stall_seconds,
    )?;
    let p99_idle = common::quantile_us(&idle.broker, 0.99);
    let p99 = common::quantile_us(&loaded.broker, 0.99);
    let ratio = p99 / p99_idle;
    let peer = PeerP99::of(&idle, &loaded);
    common::no_leaks(&broker, baseline)?;
    common::served(&broker)?;
    let summary = format!(
        "{} stalled clients (events never read, rings never drained) and {} flooding at their limits ({} calls, {} refused at a limit) for {} s: the paced client's p99 {p99:.0} us vs {p99_idle:.0} us idle ({ratio:.2}x){peer}",
        report["stalled"], report["flooders"], report["flood_calls"], report["flood_refused"], scale.stall_seconds
    );
    if report["errors"].as_u64() != Some(0) {
        return Err(format!("{summary}; the crowd met errors: {}", report["first_error"]));
    }
    if ratio > 2.0 && scale.gate_latency {
        return Err(format!("{summary}: over 2x idle"));
    }
    Ok(Outcome {
        summary,
        figures: serde_json::json!({ "seconds": scale.stall_seconds, "crowd": report, "paced_p99_us": p99, "idle_p99_us": p99_idle, "p99_ratio": ratio, "echo_peer": peer.json() }),
    })
}

/// The echo peer's p99, idle and under the crowd: what the machine adds to a client's wait
/// whatever serves it (the target is the broker's own ratio; this one is reported beside it).
struct PeerP99 {
    idle: f64,
    loaded: f64,
}

impl PeerP99 {
    fn of(idle: &common::Paced, loaded: &common::Paced) -> PeerP99 {
        PeerP99 {
            idle: common::quantile_us(&idle.peer, 0.99),
            loaded: common::quantile_us(&loaded.peer, 0.99),
        }
    }

    fn ratio(&self) -> f64 {
        self.loaded / self.idle
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({ "paced_p99_us": self.loaded, "idle_p99_us": self.idle, "p99_ratio": self.ratio() })
    }
}

impl std::fmt::Display for PeerP99 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "; an echo peer beside it: p99 {:.0} us vs {:.0} us idle ({:.2}x)",
            self.loaded,
            self.idle,
            self.ratio()
        )
    }
}

fn args_of(args: &[String], n: usize) -> Option<Vec<String>> {
    (args.len() == n).then(|| args.to_vec())
}

/// A client of the crowd: a connection, the sample device opened shared.
enum Member {
    /// The client (kept for its connection's sake), the session, the user client.
    Grpc(Box<(Client, portcullis_client::Session, portcullis_client::UserClient)>),
    Native(NativeSession, u64),
}

async fn join(run_dir: &str, grpc: bool) -> Result<Member, ClientError> {
    if grpc {
        let client = Client::connect(run_dir).await?;
        let session = client.session().await?;
        let id = session
            .find_one(portcullis_client::matching::by_name("sample0"))
            .await?
            .id;
        let uc = session.open(id, OpenMode::Shared).await?;
        Ok(Member::Grpc(Box::new((client, session, uc))))
    } else {
        let mut s = NativeSession::connect(run_dir, AbiId::native()).await?;
        let id = s.find("sample0").await?.first().map(|s| s.id).unwrap_or(0);
        let h = s.open(id, false).await?;
        Ok(Member::Native(s, h))
    }
}

impl Member {
    async fn call(&mut self, a: u64) -> Result<(), ClientError> {
        let out = match self {
            Member::Grpc(g) => g.1.call_named(&g.2, "add", &[a, 1], &[]).await?,
            Member::Native(s, h) => s.call(*h, 0, &[a, 1], &[], 0).await?,
        };
        if out.scalars != [a + 1] {
            return Err(ClientError::Protocol(format!("add({a}, 1) answered {:?}", out.scalars)));
        }
        Ok(())
    }
}

fn report(line: serde_json::Value) {
    println!("{line}");
}

/// `chaos load RUN_DIR N SECONDS`: N clients (one in four over gRPC, the rest native) connect,
/// say `ready`, call `add` in a loop for SECONDS, and report.
pub(crate) fn child(args: &[String]) -> ExitCode {
    let Some(args) = args_of(args, 3) else {
        return ExitCode::from(2);
    };
    let (run_dir, n, seconds) = (
        args[0].clone(),
        args[1].parse::<usize>().unwrap_or(0),
        args[2].parse::<u64>().unwrap_or(0),
    );
    // One thread, as one app's process: the crowd can take a core, not the machine.
    let rt = common::runtime();
    rt.block_on(async move {
        let mut members = Vec::with_capacity(n);
        for i in 0..n {
            match join(&run_dir, i % 4 == 0).await {
                Ok(m) => members.push(m),
                Err(e) => {
                    report(
                        serde_json::json!({ "errors": 1, "first_error": format!("client {i} could not join: {e}") }),
                    );
                    println!("ready");
                    return ExitCode::FAILURE;
                }
            }
        }
        println!("ready");
        let deadline = Instant::now() + Duration::from_secs(seconds);
        let tasks: Vec<_> = members
            .into_iter()
            .map(|mut m| {
                tokio::spawn(async move {
                    let (mut calls, mut first_error) = (0u64, None);
                    while Instant::now() < deadline {
                        match m.call(calls).await {
                            Ok(()) => calls += 1,
                            Err(e) => {
                                first_error = Some(e.to_string());
                                break;
                            }
                        }
                    }
                    (calls, first_error)
                })
            })
            .collect();
        let mut counts = Vec::new();
        let (mut errors, mut first) = (0u64, None::<String>);
        for t in tasks {
            match t.await {
                Ok((calls, e)) => {
                    counts.push(calls as f64);
                    if let Some(e) = e {
                        errors += 1;
                        first.get_or_insert(e);
                    }
                }
                Err(e) => {
                    errors += 1;
                    first.get_or_insert(e.to_string());
                }
            }
        }
        let sum: f64 = counts.iter().sum();
        let squares: f64 = counts.iter().map(|c| c * c).sum();
        let jain = if squares > 0.0 {
            sum * sum / (counts.len() as f64 * squares)
        } else {
            0.0
        };
        let min = counts.iter().copied().fold(f64::INFINITY, f64::min);
        let max = counts.iter().copied().fold(0.0, f64::max);
        report(serde_json::json!({
            "clients": n, "calls": sum as u64, "errors": errors, "first_error": first,
            "per_client_min": min, "per_client_max": max, "jain": jain,
        }));
        ExitCode::SUCCESS
    })
}

/// Connections the stall scenario's flooders try to open (a user may hold 64 by default).
const FLOOD_CONNECTIONS: u64 = 80;

/// A refusal at a limit a flooding client runs into by design.
fn at_a_limit(e: &ClientError) -> bool {
    matches!(e.status(), Some(Status::NoMemory | Status::RateLimited))
}

/// `chaos stall RUN_DIR SECONDS`: stalled clients — gRPC and native sessions subscribed to the
/// sample device's notifications that never read them, rings whose completions are never
/// drained — and clients flooding `fire_event` (a notification to every stalled subscriber)
/// and `echo` at their limits.
pub(crate) fn stall_child(args: &[String]) -> ExitCode {
    let Some(args) = args_of(args, 2) else {
        return ExitCode::from(2);
    };
    let (run_dir, seconds) = (args[0].clone(), args[1].parse::<u64>().unwrap_or(0));
    // One thread, as one app's process: the crowd can take a core, not the machine.
    let rt = common::runtime();
    let errors = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let (calls, refused) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let result: Result<(usize, usize), String> = rt.block_on(async {
        let mut stalled = Vec::new();
        for _ in 0..8 {
            let client = Client::connect(&run_dir).await.map_err(|e| e.to_string())?;
            let session = client.session().await.map_err(|e| e.to_string())?;
            session.subscribe(&[]).await.map_err(|e| e.to_string())?;
            stalled.push((client, session));
        }
        let mut natives = Vec::new();
        for _ in 0..8 {
            let mut s = NativeSession::connect(&run_dir, AbiId::native())
                .await
                .map_err(|e| e.to_string())?;
            match s
                .request(Request::Subscribe { services: vec![] })
                .await
                .map_err(|e| e.to_string())?
            {
                Body::None => {}
                other => return Err(format!("subscribe answered {other:?}")),
            }
            natives.push(s);
        }
        let deadline = Instant::now() + Duration::from_secs(seconds);
        // Rings whose completions nobody reads: submitted until full, then left.
        let rings: Vec<_> = (0..4)
            .map(|_| {
                let run_dir = run_dir.clone();
                std::thread::spawn(move || -> Result<(), String> {
                    let mut ring = RingClient::connect(&run_dir, RingOptions::default()).map_err(|e| e.to_string())?;
                    let id = ring
                        .find("sample0")
                        .map_err(|e| e.to_string())?
                        .first()
                        .map(|s| s.id)
                        .unwrap_or(0);
                    let h = ring.open(id, false).map_err(|e| e.to_string())?;
                    let echo = Request::Call {
                        handle: h,
                        selector: 1,
                        scalars: vec![],
                        struct_in: vec![0x77; 4000],
                        struct_out_len: 4096,
                    };
                    while ring.try_submit(echo.clone()).map_err(|e| e.to_string())?.is_some() {}
                    ring.flush().map_err(|e| e.to_string())?;
                    std::thread::sleep(deadline.saturating_duration_since(Instant::now()));
                    Ok(())
                })
            })
            .collect();
        let mut flooders = Vec::new();
        // More connections than the user may hold (64 by default): the rest are refused.
        for i in 0..FLOOD_CONNECTIONS {
            let mut s = match NativeSession::connect(&run_dir, AbiId::native()).await {
                Ok(s) => s,
                Err(e) if matches!(e, ClientError::Busy(_)) || at_a_limit(&e) => {
                    refused.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                Err(e) => return Err(e.to_string()),
            };
            let id = s
                .find("sample0")
                .await
                .map_err(|e| e.to_string())?
                .first()
                .map(|s| s.id)
                .unwrap_or(0);
            let h = s.open(id, false).await.map_err(|e| e.to_string())?;
            let (calls, refused, errors) = (calls.clone(), refused.clone(), errors.clone());
            flooders.push(tokio::spawn(async move {
                while Instant::now() < deadline {
                    let result = if i % 2 == 0 {
                        s.call(h, 4, &[i], &[], 0).await
                    } else {
                        s.call(h, 1, &[], &[0x33; 4000], 4096).await
                    };
                    match result {
                        Ok(_) => calls.fetch_add(1, Ordering::Relaxed),
                        Err(e) if at_a_limit(&e) => refused.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            errors.lock().unwrap().push(e.to_string());
                            return;
                        }
                    };
                }
            }));
        }
        println!("ready");
        for f in flooders {
            let _ = f.await;
        }
        for r in rings {
            match r.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => errors.lock().unwrap().push(e),
                Err(_) => errors.lock().unwrap().push("a ring thread panicked".into()),
            }
        }
        Ok((stalled.len() + natives.len() + 4, FLOOD_CONNECTIONS as usize))
    });
    let (stalled, flooders) = match result {
        Ok(n) => n,
        Err(e) => {
            println!("ready");
            report(serde_json::json!({ "errors": 1, "first_error": e }));
            return ExitCode::FAILURE;
        }
    };
    let errors = errors.lock().unwrap().clone();
    report(serde_json::json!({
        "stalled": stalled, "flooders": flooders, "flood_calls": calls.load(Ordering::Relaxed),
        "flood_refused": refused.load(Ordering::Relaxed), "errors": errors.len(), "first_error": errors.first(),
    }));
    ExitCode::SUCCESS
}
