//! Clients killed with `SIGKILL` at random points — mid-call, holding exclusive opens, with
//! memory mapped, with rings live, half-way through a handshake — over every transport: the
//! broker releases all they held.

use std::{
    collections::BTreeMap,
    io::Read,
    process::{Command, Stdio},
    sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use portcullis_tests::{Broker, BrokerSetup};

use crate::{Outcome, Scale, client::KINDS, common};

/// The stages a client of `kind` passes through (see `client`).
fn stages_of(kind: &str) -> &'static [char] {
    match kind {
        "grpc-calls" => &['c', 'o', 'l'],
        "grpc-pending" => &['c', 'o', 'w'],
        "native-exclusive-mapped" => &['c', 'o', 'm', 'l'],
        "native-pending" => &['c', 'o', 'm', 'w'],
        "ring-live" => &['r', 'o', 'l'],
        _ => &['c', 'p'],
    }
}

/// Reads the client's stage bytes until `stage` (or `bound`, or its end); returns what came.
fn read_until(stdout: &mut std::process::ChildStdout, stage: char, bound: Duration) -> String {
    use rustix::event::{PollFd, PollFlags, poll};
    let deadline = std::time::Instant::now() + bound;
    let mut seen = String::new();
    while !seen.contains(stage) && !seen.contains('!') {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            break;
        }
        let timeout = rustix::event::Timespec::try_from(left).ok();
        let mut fds = [PollFd::new(&*stdout, PollFlags::IN)];
        if !matches!(poll(&mut fds, timeout.as_ref()), Ok(n) if n > 0) {
            break;
        }
        let mut byte = [0u8; 1];
        match stdout.read(&mut byte) {
            Ok(1) => seen.push(char::from(byte[0])),
            _ => break,
        }
    }
    seen
}

pub(crate) fn run(scale: Scale) -> Result<Outcome, String> {
    let broker = Broker::with(BrokerSetup {
        log_level: Some("warn"),
        ..BrokerSetup::default()
    });
    let baseline = broker.baseline_fds();
    let rss_before = common::rss_mib(&broker);
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let next = AtomicUsize::new(0);
    let stages: Mutex<BTreeMap<String, usize>> = Mutex::default();
    let errors: Mutex<Vec<String>> = Mutex::default();
    std::thread::scope(|scope| {
        for worker in 0..8u64 {
            let (exe, broker, next, stages, errors) = (&exe, &broker, &next, &stages, &errors);
            scope.spawn(move || {
                let mut rng = fastrand::Rng::with_seed(0x5eed ^ worker);
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= scale.kills {
                        return;
                    }
                    let kind = KINDS[i % KINDS.len()];
                    let mut child = match Command::new(exe)
                        .args(["client", &broker.run_dir().to_string_lossy(), kind])
                        .stdout(Stdio::piped())
                        .stderr(Stdio::null())
                        .spawn()
                    {
                        Ok(child) => child,
                        Err(e) => {
                            errors.lock().unwrap().push(format!("spawn: {e}"));
                            return;
                        }
                    };
                    // The kill comes at a random point of the client's life: one time in six
                    // at a random moment from its start (maybe before it connects), otherwise
                    // a moment after it reaches a stage drawn from those its kind passes.
                    let passes = stages_of(kind);
                    let mut out = String::new();
                    if rng.u8(0..6) == 0 {
                        std::thread::sleep(Duration::from_micros(rng.u64(0..10_000)));
                    } else if let Some(stdout) = child.stdout.as_mut() {
                        let target = passes[rng.usize(0..passes.len())];
                        out = read_until(stdout, target, Duration::from_secs(2));
                        std::thread::sleep(Duration::from_micros(rng.u64(0..3_000)));
                    }
                    let _ = child.kill();
                    let _ = child.wait();
                    let mut rest = String::new();
                    let _ = child.stdout.take().map(|mut o| o.read_to_string(&mut rest));
                    out.push_str(&rest);
                    if let Some(at) = out.find('!') {
                        errors.lock().unwrap().push(format!("{kind}: {}", &out[at + 1..]));
                    }
                    let last = out.chars().rev().find(|c| "coxmwrpl".contains(*c));
                    let at = match last {
                        None => "before connecting",
                        Some('c') => "connected",
                        Some('o' | 'x') => "holding an open",
                        Some('m') => "with memory mapped",
                        Some('w') => "mid-call (pending)",
                        Some('r') => "with a ring live",
                        Some('p') => "mid-handshake",
                        _ => "mid-call (call loop)",
                    };
                    *stages.lock().unwrap().entry(format!("{kind}: {at}")).or_default() += 1;
                    if out.contains('x') {
                        *stages
                            .lock()
                            .unwrap()
                            .entry("held an exclusive open".into())
                            .or_default() += 1;
                    }
                }
            });
        }
    });
    let errors = errors.into_inner().unwrap();
    if !errors.is_empty() {
        return Err(format!(
            "{} clients met errors: {}",
            errors.len(),
            errors[..errors.len().min(5)].join("; ")
        ));
    }
    common::no_leaks(&broker, baseline)?;
    common::served(&broker)?;
    if !broker.is_running_ref() {
        return Err("the broker is gone".into());
    }
    let rss_after = common::rss_mib(&broker);
    let stages = stages.into_inner().unwrap();
    let exclusive = stages.get("held an exclusive open").copied().unwrap_or(0);
    Ok(Outcome {
        summary: format!(
            "{} clients killed over gRPC, native and ring ({exclusive} holding the device exclusively); stats back to baseline; RSS {rss_before:.1} -> {rss_after:.1} MiB",
            scale.kills
        ),
        figures: serde_json::json!({ "killed": scale.kills, "where": stages, "rss_mib_before": rss_before, "rss_mib_after": rss_after }),
    })
}
