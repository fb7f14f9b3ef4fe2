//! What the sandbox costs on the call path: `add` round trips over the ring (adaptive wait, as
//! shipped) and over gRPC, against two real brokers of the same release build started as root
//! — one with the sandbox (helper split, service user, no capabilities, Landlock, seccomp
//! filters on every thread) and one with `[sandbox] enabled = false` — measured in alternating
//! rounds of the same run. Target: on/off ≤ 1.05×.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use portcullis_client::{
    Client, OpenMode, matching,
    ring::{RingClient, RingOptions},
};

use crate::{Args, client_runtime, process::Broker, summarize};

fn start(dir: &Path, name: &str, sandbox: bool) -> Broker {
    Broker::start(
        dir,
        name,
        &format!(
            "discovery = false\n\n[sandbox]\nenabled = {sandbox}\n\n[[device]]\nname = \"sample0\"\ndriver = \"sample\"\n"
        ),
    )
}

fn ring_round(broker: &Broker, iters: usize, samples: &mut Vec<Duration>) {
    let mut ring = RingClient::connect(&broker.run_dir, RingOptions::default()).unwrap();
    let sample = ring.find("sample0").unwrap()[0].id;
    let h = ring.open(sample, false).unwrap();
    for i in 0..iters as u64 {
        let start = Instant::now();
        let out = ring.call(h, 0, &[i, 1], &[], 0).unwrap();
        samples.push(start.elapsed());
        assert_eq!(out.scalars, [i + 1]);
    }
}

fn grpc_round(runtime: &tokio::runtime::Runtime, broker: &Broker, iters: usize, samples: &mut Vec<Duration>) {
    runtime.block_on(async {
        let client = Client::connect(&broker.run_dir).await.unwrap();
        let session = client.session().await.unwrap();
        let info = session.find_one(matching::by_name("sample0")).await.unwrap();
        let uc = session.open(info.id, OpenMode::Shared).await.unwrap();
        for i in 0..iters as u64 {
            let start = Instant::now();
            let out = session.call_named(&uc, "add", &[i, 1], &[]).await.unwrap();
            samples.push(start.elapsed());
            assert_eq!(out.scalars, [i + 1]);
        }
    });
}

pub(crate) fn run(args: &Args) {
    println!("### The sandbox's cost on the call path\n");
    let dir = crate::shared_tempdir("portcullis-bench-sandbox-");
    let on = start(dir.path(), "on", true);
    let off = start(dir.path(), "off", false);
    // Many short rounds, alternating: the machine's drift over the run falls on both alike.
    let (rounds, iters) = (args.rounds * 4, (args.iters * 2 / 5).max(100));
    let runtime = client_runtime();
    let (mut ring_on, mut ring_off, mut grpc_on, mut grpc_off) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        // Alternate which goes first, so that neither always follows the other.
        let order = if round % 2 == 0 { [true, false] } else { [false, true] };
        for sandboxed in order {
            let (broker, ring, grpc) = if sandboxed {
                (&on, &mut ring_on, &mut grpc_on)
            } else {
                (&off, &mut ring_off, &mut grpc_off)
            };
            ring_round(broker, iters, ring);
            grpc_round(&runtime, broker, iters, grpc);
        }
    }
    println!(
        "{} rounds × {} sequential `add` round trips per transport and broker, alternating (release build, both brokers started as root; `[sandbox] enabled = false` for off)\n",
        rounds, iters
    );
    println!("| transport | sandbox | p50 µs | p99 µs | p99.9 µs | mean µs | on/off p50 | on/off mean |");
    println!("|---|---|---|---|---|---|---|---|");
    for (name, on, off) in [
        ("ring (adaptive)", &mut ring_on, &mut ring_off),
        ("gRPC", &mut grpc_on, &mut grpc_off),
    ] {
        let (a, b) = (summarize(on), summarize(off));
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        let ratio = |x: Duration, y: Duration| x.as_secs_f64() / y.as_secs_f64();
        for (label, s) in [("off", &b), ("on", &a)] {
            let ratios = if label == "on" {
                format!("{:.3}× | {:.3}×", ratio(a.p50, b.p50), ratio(a.mean, b.mean))
            } else {
                " | ".to_string()
            };
            println!(
                "| {name} | {label} | {:.2} | {:.2} | {:.2} | {:.2} | {ratios} |",
                us(s.p50),
                us(s.p99),
                us(s.p999),
                us(s.mean)
            );
        }
    }
    println!();
}
