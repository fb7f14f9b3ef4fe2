//! `portcullis qualify`: Apple's driver qualification, for the broker — cycle every common
//! transition (connect/disconnect on each transport, open/close, map/unmap, calls, rings,
//! policy reloads, device attach/detach, sleep/wake) a thousand times against a running broker
//! (or one it starts), sample the broker's live object counts as it goes (`stats`), and fail
//! where a counter ramps. The record (`--json`) and a plot (`--plot`) are kept to compare
//! releases (`--compare`); the install is checked the way `kextutil` checks a kext bundle.

mod analysis;
mod install;
mod report;
mod transitions;

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use clap::{Args, ValueEnum};
use portcullis_client::{Client, pb};

use crate::RunDir;

/// The transitions, in the order they run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Transition {
    /// Connect and disconnect: a gRPC session, a native connection.
    Connect,
    /// Open and close every service, shared then exclusive.
    Open,
    /// Open, map every memory type, close.
    Map,
    /// Call every method the policy allows that qualify knows to be harmless.
    Call,
    /// A shared-memory ring set up, used once and torn down.
    Ring,
    /// Reload the policy.
    Reload,
    /// Attach and detach a loop device and a TUN interface qualify makes, each claimed by a
    /// driver through discovery.
    Attach,
    /// Sleep and wake the devices.
    Sleep,
}

impl Transition {
    pub(crate) const ALL: [Transition; 8] = [
        Transition::Connect,
        Transition::Open,
        Transition::Map,
        Transition::Call,
        Transition::Ring,
        Transition::Reload,
        Transition::Attach,
        Transition::Sleep,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Transition::Connect => "connect",
            Transition::Open => "open",
            Transition::Map => "map",
            Transition::Call => "call",
            Transition::Ring => "ring",
            Transition::Reload => "reload",
            Transition::Attach => "attach",
            Transition::Sleep => "sleep",
        }
    }
}

#[derive(Debug, Args)]
pub(crate) struct QualifyArgs {
    /// Cycles of each transition.
    #[arg(long, default_value_t = 1000)]
    cycles: u64,
    /// Only these transitions, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Transition>,
    /// Start a broker of this binary on a private run dir (the sample device, and driver
    /// personalities claiming the devices qualify makes), instead of qualifying a running one.
    #[arg(long)]
    start: bool,
    /// With --start: its configuration [default: the sample device and qualify's personalities].
    #[arg(long, requires = "start")]
    config: Option<PathBuf>,
    /// With --start: its policy [default: the embedded policy, and root may use qualify's devices].
    #[arg(long, requires = "start")]
    policy: Option<PathBuf>,
    /// Where `attach` makes the files behind its loop devices, for a running broker whose
    /// personalities claim loop devices backed by files there (and TUN interfaces named
    /// `pqtun*`) [default: with --start, its own; otherwise a new temporary directory].
    #[arg(long)]
    devices_dir: Option<PathBuf>,
    /// The services to exercise, by name [default: every service with a driver that this task
    /// may see].
    #[arg(long = "service")]
    services: Vec<String>,
    /// Sample the counters every N cycles [default: every cycles/50, at least every cycle].
    #[arg(long)]
    sample_every: Option<u64>,
    /// Write the record as JSON, to compare with later (`--compare`).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Plot every counter over the cycles (PNG; needs the DejaVu Sans font).
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Print what changed since an earlier record.
    #[arg(long)]
    compare: Option<PathBuf>,
    /// Skip the install checklist (a development build against its test files).
    #[arg(long)]
    no_install_check: bool,
}

/// One counter of `portcullis stats`, as qualify samples it.
pub(crate) struct Counter {
    pub(crate) name: &'static str,
    pub(crate) read: fn(&pb::StatsResponse) -> u64,
    /// Exact: must end where it started. Otherwise: how much growth is still noise.
    pub(crate) exact: bool,
    pub(crate) tolerance: fn(f64) -> f64,
}

const fn exact(name: &'static str, read: fn(&pb::StatsResponse) -> u64) -> Counter {
    Counter {
        name,
        read,
        exact: true,
        tolerance: |_| 0.0,
    }
}

/// The counters, and what counts as a ramp for each.
pub(crate) const COUNTERS: [Counter; 14] = [
    exact("sessions", |s| s.sessions),
    exact("connections", |s| s.connections),
    exact("user_clients", |s| s.user_clients),
    exact("mappings", |s| s.mappings),
    exact("pending_calls", |s| s.pending_calls),
    exact("rings", |s| s.rings),
    exact("service_opens", |s| s.service_opens),
    exact("driver_opens", |s| s.driver_opens),
    exact("driver_waiting", |s| s.driver_waiting),
    exact("queued_messages", |s| s.queued_messages),
    exact("services", |s| s.services),
    // Descriptors close a moment after the object that held them (a connection's task ends).
    Counter {
        name: "open_fds",
        read: |s| s.open_fds,
        exact: false,
        tolerance: |_| 4.0,
    },
    // Tokio's blocking pool keeps threads for 10 s after use: a plateau, never a ramp.
    Counter {
        name: "threads",
        read: |s| s.threads,
        exact: false,
        tolerance: |_| 8.0,
    },
    // The allocator keeps what it freed: 2 MiB, or 10 % of where it started.
    Counter {
        name: "rss_bytes",
        read: |s| s.rss_bytes,
        exact: false,
        tolerance: |start| (start * 0.10).max(2.0 * 1024.0 * 1024.0),
    },
];

/// One sample: the cycle it was taken after (0: before the first) and every counter.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct Sample {
    pub(crate) cycle: u64,
    pub(crate) counters: std::collections::BTreeMap<String, u64>,
}

/// What one transition did.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct TransitionRecord {
    pub(crate) name: String,
    pub(crate) cycles: u64,
    pub(crate) seconds: f64,
    /// Requests the broker refused as it should (policy, arbitration), not failures.
    pub(crate) refused: u64,
    /// What went wrong, if anything: the transition stopped there.
    pub(crate) error: Option<String>,
    pub(crate) samples: Vec<Sample>,
    pub(crate) verdicts: std::collections::BTreeMap<String, CounterVerdict>,
}

/// A counter over one transition.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct CounterVerdict {
    pub(crate) start: u64,
    pub(crate) end: u64,
    pub(crate) peak: u64,
    pub(crate) passed: bool,
    pub(crate) verdict: String,
}

/// The whole record, as `--json` writes it.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct Record {
    pub(crate) version: String,
    pub(crate) broker_version: String,
    pub(crate) release_build: bool,
    pub(crate) time: u64,
    pub(crate) cycles: u64,
    pub(crate) transitions: Vec<TransitionRecord>,
    pub(crate) install: Vec<install::Check>,
    pub(crate) passed: bool,
}

pub(crate) async fn run(args: QualifyArgs, run_dir: &RunDir) -> Result<(), String> {
    if args.cycles == 0 {
        return Err("--cycles must be at least 1".into());
    }
    let mut started = None;
    let run_dir = if args.start {
        let broker = OwnBroker::start(args.config.as_deref(), args.policy.as_deref())?;
        let dir = broker.run_dir();
        started = Some(broker);
        dir
    } else {
        run_dir.path()
    };
    let admin = Client::connect(&run_dir)
        .await
        .map_err(|e| format!("no broker at {}: {e}", run_dir.display()))?;
    let first = stats(&admin).await?;
    let install = if args.no_install_check {
        Vec::new()
    } else {
        install::check(first.install.as_ref(), first.policy.as_ref())
    };
    let transitions: Vec<Transition> = if args.only.is_empty() {
        Transition::ALL.to_vec()
    } else {
        let mut only = args.only.clone();
        only.sort();
        only.dedup();
        only
    };
    let sample_every = args.sample_every.unwrap_or((args.cycles / 50).max(1)).max(1);
    let targets = transitions::Targets::resolve(&admin, &args.services).await?;
    let attach_dir = args
        .devices_dir
        .clone()
        .or_else(|| started.as_ref().map(OwnBroker::devices_dir));
    let progress = report::Progress::new(transitions.len() as u64 * args.cycles);
    let mut records = Vec::new();
    for transition in transitions {
        let record = run_transition(
            transition,
            &admin,
            &run_dir,
            &targets,
            attach_dir.as_deref(),
            args.cycles,
            sample_every,
            &progress,
        )
        .await?;
        records.push(record);
    }
    progress.finish();
    let passed = records
        .iter()
        .all(|r| r.error.is_none() && r.verdicts.values().all(|v| v.passed))
        && install.iter().all(|c| c.ok);
    let broker = first.install.clone().unwrap_or_default();
    let record = Record {
        version: env!("CARGO_PKG_VERSION").to_string(),
        broker_version: broker.version,
        release_build: broker.release,
        time: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        cycles: args.cycles,
        transitions: records,
        install,
        passed,
    };
    report::print(&record);
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&record).map_err(|e| e.to_string())?;
        std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))?;
        println!("record written to {}", path.display());
    }
    if let Some(path) = &args.plot {
        report::plot(&record, path)?;
        println!("plot written to {}", path.display());
    }
    if let Some(path) = &args.compare {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let old: Record =
            serde_json::from_str(&text).map_err(|e| format!("{}: not a qualify record: {e}", path.display()))?;
        report::compare(&old, &record);
    }
    drop(started);
    if passed {
        Ok(())
    } else {
        Err("qualification failed (see above)".into())
    }
}

#[allow(clippy::too_many_arguments)]
async fn run_transition(
    transition: Transition,
    admin: &Client,
    run_dir: &Path,
    targets: &transitions::Targets,
    attach_dir: Option<&Path>,
    cycles: u64,
    sample_every: u64,
    progress: &report::Progress,
) -> Result<TransitionRecord, String> {
    progress.begin(transition.name());
    let base = settle(admin, None).await?;
    let mut samples = vec![sample(0, &base)];
    let mut cycler = transitions::Cycler::new(transition, run_dir, targets, attach_dir, admin).await;
    // What the transition holds between its cycles (a session, open user clients) is where its
    // samples settle to; after its last cycle, it lets go of that too.
    let holding = settle(admin, None).await?;
    let begun = Instant::now();
    let mut refused = 0;
    let mut error = None;
    let mut done = 0;
    if let Err(e) = &cycler {
        error = Some(e.clone());
    }
    if let Ok(cycler) = cycler.as_mut() {
        for cycle in 1..=cycles {
            match cycler.cycle(cycle).await {
                Ok(n) => refused += n,
                Err(e) => {
                    error = Some(format!("cycle {cycle}: {e}"));
                    break;
                }
            }
            done = cycle;
            progress.advance();
            if cycle % sample_every == 0 && cycle != cycles {
                samples.push(sample(cycle, &settle(admin, Some(&holding)).await?));
            }
        }
        cycler.finish().await;
    }
    let seconds = begun.elapsed().as_secs_f64();
    drop(cycler);
    samples.push(sample(done.max(1), &settle(admin, Some(&base)).await?));
    progress.skip(cycles - done);
    let verdicts = COUNTERS
        .iter()
        .map(|counter| {
            let points: Vec<(f64, f64)> = samples
                .iter()
                .map(|s| {
                    (
                        s.cycle as f64,
                        s.counters.get(counter.name).copied().unwrap_or(0) as f64,
                    )
                })
                .collect();
            let start = points.first().map_or(0.0, |p| p.1);
            let verdict = analysis::judge(&points, (counter.tolerance)(start), counter.exact);
            let values = points.iter().map(|p| p.1 as u64);
            (
                counter.name.to_string(),
                CounterVerdict {
                    start: start as u64,
                    end: points.last().map_or(0, |p| p.1 as u64),
                    peak: values.max().unwrap_or(0),
                    passed: verdict.passed(),
                    verdict: verdict.describe(),
                },
            )
        })
        .collect();
    Ok(TransitionRecord {
        name: transition.name().to_string(),
        cycles: done,
        seconds,
        refused,
        error,
        samples,
        verdicts,
    })
}

fn sample(cycle: u64, stats: &pb::StatsResponse) -> Sample {
    Sample {
        cycle,
        counters: COUNTERS.iter().map(|c| (c.name.to_string(), (c.read)(stats))).collect(),
    }
}

async fn stats(admin: &Client) -> Result<pb::StatsResponse, String> {
    admin.stats().await.map_err(|e| match e {
        portcullis_client::ClientError::Rpc(status) => status.message().to_string(),
        e => e.to_string(),
    })
}

/// The broker's counters once what qualify released has been let go: the exact counters back
/// at `base` (waiting up to 5 s; after that, as they are — the verdict then says so).
async fn settle(admin: &Client, base: Option<&pb::StatsResponse>) -> Result<pb::StatsResponse, String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = stats(admin).await?;
        let Some(base) = base else { return Ok(now) };
        let back = COUNTERS
            .iter()
            .filter(|c| c.exact)
            .all(|c| (c.read)(&now) <= (c.read)(base));
        if back || Instant::now() > deadline {
            return Ok(now);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A broker qualify started (`--start`), stopped when dropped.
struct OwnBroker {
    child: Child,
    dir: tempfile::TempDir,
}

impl OwnBroker {
    fn start(config: Option<&Path>, policy: Option<&Path>) -> Result<OwnBroker, String> {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::Builder::new()
            .prefix("portcullis-qualify-")
            .tempdir()
            .map_err(|e| e.to_string())?;
        // The broker's service user reads the files qualify writes.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).map_err(|e| e.to_string())?;
        let devices = dir.path().join("devices");
        std::fs::create_dir(&devices).map_err(|e| e.to_string())?;
        let mut cmd = Command::new(std::env::current_exe().map_err(|e| e.to_string())?);
        cmd.arg("broker").arg("--run-dir").arg(dir.path().join("run"));
        let config = match config {
            Some(config) => config.to_path_buf(),
            None => {
                let drivers = dir.path().join("drivers.d");
                std::fs::create_dir(&drivers).map_err(|e| e.to_string())?;
                std::fs::write(drivers.join("qualify.toml"), transitions::personalities(&devices))
                    .map_err(|e| e.to_string())?;
                let path = dir.path().join("config.toml");
                std::fs::write(&path, transitions::CONFIG).map_err(|e| e.to_string())?;
                path
            }
        };
        cmd.arg("--config").arg(config);
        let policy = match policy {
            Some(policy) => policy.to_path_buf(),
            None => {
                let path = dir.path().join("policy.toml");
                let text = format!("{}\n{}", portcullis_broker::config::DEFAULT_POLICY, transitions::POLICY);
                std::fs::write(&path, text).map_err(|e| e.to_string())?;
                path
            }
        };
        cmd.arg("--policy").arg(policy);
        let log = std::fs::File::create(dir.path().join("broker.log")).map_err(|e| e.to_string())?;
        cmd.stdout(Stdio::null()).stderr(log).env("RUST_LOG", "warn");
        let mut child = cmd.spawn().map_err(|e| format!("cannot start a broker: {e}"))?;
        let socket = dir.path().join("run").join(portcullis_client::GRPC_SOCKET);
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            if let Ok(Some(status)) = child.try_wait() {
                let log = std::fs::read_to_string(dir.path().join("broker.log")).unwrap_or_default();
                return Err(format!("the broker qualify started exited with {status}:\n{log}"));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return Err("the broker qualify started did not serve within 30 s".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "qualify: started a broker (pid {}) on {}",
            child.id(),
            dir.path().join("run").display()
        );
        Ok(OwnBroker { child, dir })
    }

    fn run_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    fn devices_dir(&self) -> PathBuf {
        self.dir.path().join("devices")
    }
}

impl Drop for OwnBroker {
    fn drop(&mut self) {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32);
        if let Some(pid) = pid {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let _ = self.child.wait();
    }
}
