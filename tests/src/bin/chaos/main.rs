//! `chaos`: what the broker survives — clients killed at random points, hostile rings, devices
//! removed in the middle of calls, the broker itself killed and started again, a thousand
//! clients at once, stalled and flooding clients — each against a real broker (`PORTCULLIS_BIN`)
//! and each ending with nothing lost and nothing leaked (`stats` back to its baseline).
//! `cargo xtask chaos` runs the full version (docs/RELIABILITY.md has its figures), and
//! `cargo xtask test` a short one.
//!
//! ```text
//! chaos [--short] [--only kill,ring,device,restart,load,stall] [--json FILE]
//! chaos client RUN_DIR KIND          a client the kill scenario kills (internal)
//! chaos load RUN_DIR N SECONDS       the load scenario's clients (internal, unprivileged)
//! chaos stall RUN_DIR SECONDS        the stall scenario's clients (internal, unprivileged)
//! ```

#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod client;
mod common;
mod devices;
mod kill;
mod load;
mod restart;
mod rings;

use std::time::{Duration, Instant};

/// How much of each scenario: the figures the issue names, or a short run for CI.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Scale {
    pub(crate) kills: usize,
    pub(crate) ring_corruptions: usize,
    pub(crate) device_rounds: usize,
    pub(crate) restarts: usize,
    pub(crate) load_clients: usize,
    pub(crate) load_seconds: u64,
    pub(crate) stall_seconds: u64,
    /// Whether latency ratios fail the run: in the full run, a benchmark; the short run (CI,
    /// on a machine doing other things) reports them only.
    pub(crate) gate_latency: bool,
}

const FULL: Scale = Scale {
    kills: 10_000,
    ring_corruptions: 10_000,
    device_rounds: 100,
    restarts: 20,
    load_clients: 1000,
    load_seconds: 60,
    stall_seconds: 30,
    gate_latency: true,
};

const SHORT: Scale = Scale {
    kills: 150,
    ring_corruptions: 200,
    device_rounds: 4,
    restarts: 2,
    load_clients: 100,
    load_seconds: 5,
    stall_seconds: 5,
    gate_latency: false,
};

/// What a scenario reports.
pub(crate) struct Outcome {
    pub(crate) summary: String,
    pub(crate) figures: serde_json::Value,
}

type Scenario = fn(Scale) -> Result<Outcome, String>;

const SCENARIOS: [(&str, Scenario); 6] = [
    ("kill", kill::run),
    ("ring", rings::run),
    ("device", devices::run),
    ("restart", restart::run),
    ("load", load::run),
    ("stall", load::run_stall),
];

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("client") => return client::main(&args[1..]),
        Some("load") => return load::child(&args[1..]),
        Some("stall") => return load::stall_child(&args[1..]),
        Some("peer") => return common::peer_main(&args[1..]),
        _ => {}
    }
    let mut scale = FULL;
    let mut only: Option<Vec<String>> = None;
    let mut json = None;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--short" => scale = SHORT,
            "--only" => only = it.next().map(|l| l.split(',').map(str::to_string).collect()),
            "--json" => json = it.next().cloned(),
            other => {
                eprintln!(
                    "chaos: unknown argument {other:?}\nusage: chaos [--short] [--only kill,ring,device,restart,load,stall] [--json FILE]"
                );
                return std::process::ExitCode::from(2);
            }
        }
    }
    // Nothing here may hang: a scenario stuck for this long is a failure of its own.
    let limit = Duration::from_secs(if scale.kills == FULL.kills { 3600 } else { 900 });
    std::thread::spawn(move || {
        std::thread::sleep(limit);
        eprintln!("chaos: still running after {} s: something hangs", limit.as_secs());
        std::process::exit(3);
    });
    let mut failed = Vec::new();
    let mut record = serde_json::Map::new();
    for (name, scenario) in SCENARIOS {
        if only.as_ref().is_some_and(|o| !o.iter().any(|n| n == name)) {
            continue;
        }
        eprintln!("chaos: {name} ...");
        let started = Instant::now();
        let outcome = scenario(scale);
        let seconds = started.elapsed().as_secs_f64();
        match outcome {
            Ok(o) => {
                println!("{name:<8} ok    {:>6.1} s  {}", seconds, o.summary);
                record.insert(
                    name.to_string(),
                    serde_json::json!({ "passed": true, "seconds": seconds, "figures": o.figures }),
                );
            }
            Err(e) => {
                println!("{name:<8} FAIL  {seconds:>6.1} s  {e}");
                record.insert(
                    name.to_string(),
                    serde_json::json!({ "passed": false, "seconds": seconds, "error": e }),
                );
                failed.push(name);
            }
        }
    }
    if let Some(path) = json {
        let text = serde_json::to_string_pretty(&serde_json::Value::Object(record)).unwrap();
        if let Err(e) = std::fs::write(&path, text) {
            eprintln!("chaos: {path}: {e}");
        }
    }
    if failed.is_empty() {
        println!("chaos: the broker survived everything");
        std::process::ExitCode::SUCCESS
    } else {
        println!("chaos: FAILED: {}", failed.join(", "));
        std::process::ExitCode::FAILURE
    }
}
