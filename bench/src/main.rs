//! Portcullis benchmarks, side by side with the peers a user would pick instead. Each
//! comparison runs its contenders in the same process run, taking turns round by round so that
//! drift in machine load falls on all of them, and prints a Markdown table with ratios.
//!
//! usage: portcullis-bench [--quick] [--rounds N] [--iters N] [--plot PNG] [transports] [grpc] [native] [translate] [policy] [devices] [hotplug] [flood] [sandbox] [scale [--scale-only PART,...] [--scale-plot PNG]]
//! (no names: all of them)

#![forbid(unsafe_code)]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    missing_debug_implementations
)]

#[cfg(feature = "peers")]
mod cedar;
mod clients;
mod devices;
mod flood;
mod grpc;
mod hotplug;
mod native;
mod policy;
mod process;
mod sandbox;
mod scale;
mod translate;
mod transports;

use std::{sync::Arc, time::Duration};

use portcullis_broker::{config::Config, server, session::Core};

/// Command-line settings.
pub(crate) struct Args {
    rounds: usize,
    iters: usize,
}

/// Latency percentiles of one contender.
pub(crate) struct Summary {
    pub(crate) p50: Duration,
    pub(crate) p99: Duration,
    pub(crate) p999: Duration,
    pub(crate) mean: Duration,
}

pub(crate) fn summarize(samples: &mut [Duration]) -> Summary {
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
    let total: Duration = samples.iter().sum();
    Summary {
        p50: at(0.50),
        p99: at(0.99),
        p999: at(0.999),
        mean: total / samples.len() as u32,
    }
}

fn us(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e6)
}

/// A latency table, and the first contender's ratio to the second.
pub(crate) fn print_table(title: &str, args: &Args, rows: &[(&str, &Summary)], target: &str) {
    println!("### {title}\n");
    println!(
        "{} rounds × {} sequential round trips per contender, contenders alternating\n",
        args.rounds, args.iters
    );
    println!("| contender | p50 µs | p99 µs | p99.9 µs | mean µs | calls/s (1 client) |");
    println!("|---|---|---|---|---|---|");
    for (name, s) in rows {
        println!(
            "| {name} | {} | {} | {} | {} | {:.0} |",
            us(s.p50),
            us(s.p99),
            us(s.p999),
            us(s.mean),
            1.0 / s.mean.as_secs_f64()
        );
    }
    if let [(_, ours), (_, peer), ..] = rows {
        println!(
            "\nratio: p50 {:.2}×, mean {:.2}×, p99 {:.2}× ({target})\n",
            ours.p50.as_secs_f64() / peer.p50.as_secs_f64(),
            ours.mean.as_secs_f64() / peer.mean.as_secs_f64(),
            ours.p99.as_secs_f64() / peer.p99.as_secs_f64()
        );
    }
}

/// The real broker core: embedded default config and policy.
pub(crate) fn core() -> Arc<Core> {
    server::build_core(&Config::load(None).unwrap(), None).unwrap()
}

/// The runtime servers run on: the broker's own (a worker per core).
pub(crate) fn server_runtime() -> tokio::runtime::Runtime {
    server::runtime().unwrap()
}

/// A temporary directory that other users may enter (the clients of some benchmarks run as
/// uids of their own), removed when dropped.
pub(crate) fn shared_tempdir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .tempdir()
        .unwrap()
}

/// The runtime clients run on.
pub(crate) fn client_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    // The flood benchmark's other user: this program, re-executed as another uid.
    if let Some(dir) = argv
        .iter()
        .position(|a| a == "--flood-as-client")
        .and_then(|i| argv.get(i + 1))
    {
        flood::client(std::path::Path::new(dir));
        return;
    }
    // The many-clients benchmark's clients: this program, re-executed as a uid of their own.
    if let Some(dir) = argv
        .iter()
        .position(|a| a == "--many-clients-client")
        .and_then(|i| argv.get(i + 1))
    {
        clients::client(std::path::Path::new(dir));
        return;
    }
    // The many-rings benchmark's clients: this program, holding idle rings in its own process
    // (a process's descriptors would not hold thousands).
    if let Some(i) = argv.iter().position(|a| a == "--hold-rings") {
        let (Some(dir), Some(count)) = (argv.get(i + 1), argv.get(i + 2).and_then(|n| n.parse().ok())) else {
            eprintln!("usage: portcullis-bench --hold-rings RUN_DIR COUNT");
            std::process::exit(2);
        };
        scale::hold_rings(std::path::Path::new(dir), count);
        return;
    }
    // The scale benchmark's gRPC peer: a bare tonic server in a process of its own.
    if let Some(i) = argv.iter().position(|a| a == "--echo-grpc") {
        let Some(socket) = argv.get(i + 1) else {
            eprintln!("usage: portcullis-bench --echo-grpc SOCKET");
            std::process::exit(2);
        };
        grpc::serve_echo(std::path::Path::new(socket));
        return;
    }
    let quick = argv.iter().any(|a| a == "--quick");
    let value = |name: &str, default: usize| {
        argv.iter()
            .position(|a| a == name)
            .and_then(|i| argv.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let args = Args {
        rounds: value("--rounds", if quick { 3 } else { 10 }),
        iters: value("--iters", if quick { 1_000 } else { 5_000 }),
    };
    let names: Vec<&str> = argv
        .iter()
        .map(String::as_str)
        .filter(|a| {
            [
                "transports",
                "grpc",
                "native",
                "translate",
                "policy",
                "devices",
                "hotplug",
                "flood",
                "sandbox",
                "scale",
            ]
            .contains(a)
        })
        .collect();
    let wants = |name: &str| names.is_empty() || names.contains(&name);
    // The path after `flag`, or `docs/<default>` in the repository.
    let plot_path = |flag: &str, default: &str| {
        argv.iter()
            .position(|a| a == flag)
            .and_then(|i| argv.get(i + 1))
            .map_or_else(
                || {
                    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                        .join("../docs")
                        .join(default)
                },
                std::path::PathBuf::from,
            )
    };
    if wants("transports") {
        transports::run(&args, &plot_path("--plot", "bench-latency.png"));
    }
    if wants("grpc") {
        grpc::run(&args);
    }
    if wants("native") {
        native::run(&args);
    }
    if wants("translate") {
        translate::run(quick);
    }
    if wants("policy") {
        policy::run(quick);
    }
    if wants("flood") {
        flood::run(&args);
    }
    if wants("sandbox") {
        sandbox::run(&args);
    }
    if wants("scale") {
        let only: Vec<&str> = argv
            .iter()
            .position(|a| a == "--scale-only")
            .and_then(|i| argv.get(i + 1))
            .map(|list| list.split(',').collect())
            .unwrap_or_default();
        // The plot in docs/ is drawn by a run of every part: a run of some parts draws theirs
        // elsewhere unless told where.
        let plot = if only.is_empty() || argv.iter().any(|a| a == "--scale-plot") {
            plot_path("--scale-plot", "bench-scale.png")
        } else {
            std::env::temp_dir().join("portcullis-bench-scale-parts.png")
        };
        if let Some(unknown) = only.iter().find(|p| !scale::PARTS.contains(p)) {
            eprintln!("--scale-only: no part {unknown:?} (parts: {})", scale::PARTS.join(","));
            std::process::exit(2);
        }
        scale::run(quick, &plot, &only);
    }
    if wants("hotplug") {
        hotplug::run(quick);
    }
    if wants("devices") {
        // Re-executed in a network namespace of its own, with the same settings.
        let settings: Vec<String> = argv.iter().filter(|a| !names.contains(&a.as_str())).cloned().collect();
        devices::run(&args, &settings);
    }
}
