//! The `portcullis` command line.

#![forbid(unsafe_code)]
//!
//! Exit status: 0 on success, 1 when the broker refused or failed a request (the status and
//! the deciding rule are printed), 2 for usage errors.

mod call;
mod driver;
mod fields;
mod json;
mod layout;
mod ls;
mod policy;
mod policy_schema;
mod policy_suggest;
mod qualify;
mod schema;
mod watch;

use std::{path::PathBuf, process::ExitCode};

use clap::{Args, Parser, Subcommand, ValueEnum};
use portcullis_client::{Client, ClientError, RUN_DIR_ENV};

use portcullis_broker::server::{self, BrokerOptions};

/// Portcullis: a device broker that owns the drivers and checks every request against policy.
#[derive(Debug, Parser)]
#[command(name = "portcullis", version, propagate_version = true)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
    #[command(flatten)]
    run_dir: RunDir,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the broker (embedded defaults: the sample device and the default policy).
    Broker(BrokerArgs),
    /// Show the registry as this task may see it, as a tree (like ioreg).
    Ls(ls::LsArgs),
    /// Open a service and call one method.
    Call(call::CallArgs),
    /// Print events (notifications, services published and terminated) as they happen.
    Watch(watch::WatchArgs),
    /// Show struct layouts from a description file under each ABI (sizes, alignments, offsets).
    Layout(layout::LayoutArgs),
    /// Every driver's selectors and struct layouts, as C headers or JSON.
    Schema(schema::SchemaArgs),
    /// Policy tools: check, explain, test, diff, who-can, suggest, fmt, schema; status and reload of the running broker's policy.
    #[command(subcommand)]
    Policy(policy::PolicyCommand),
    /// Driver personality tools: lint a `drivers.d` directory.
    #[command(subcommand)]
    Driver(driver::DriverCommand),
    /// What the running broker holds for its clients: sessions, user clients, mappings,
    /// pending calls, rings, descriptors (root or the broker's own user).
    Stats(StatsArgs),
    /// The machine's sleep and wake as the broker's drivers follow it: `status`, or put the
    /// devices to `sleep` and `wake` them as logind's PrepareForSleep would (root or the
    /// broker's own user).
    Power(PowerArgs),
    /// Qualify the broker as Apple qualifies a driver: cycle every transition (connect, open,
    /// map, call, ring, reload, attach, sleep) 1,000 times, sample its live objects, fail where
    /// one ramps; check the install; keep a record to compare releases.
    Qualify(qualify::QualifyArgs),
}

#[derive(Debug, Args)]
struct PowerArgs {
    /// What to do.
    #[arg(value_enum, default_value_t = PowerAction::Status)]
    action: PowerAction,
    /// Print JSON instead of lines.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum PowerAction {
    /// Show the state and the last transition.
    Status,
    /// Put the devices to sleep: clients are told WillSleep, drivers finish (children first),
    /// calls wait for wake.
    Sleep,
    /// Wake the devices: drivers restore (parents first), waiting calls run, clients are told
    /// HasWoken.
    Wake,
}

async fn power(args: PowerArgs, run_dir: &RunDir) -> Result<(), String> {
    use portcullis_client::pb::power_request::Action;
    let client = run_dir.connect().await.map_err(|e| e.to_string())?;
    let action = match args.action {
        PowerAction::Status => Action::Status,
        PowerAction::Sleep => Action::Sleep,
        PowerAction::Wake => Action::Wake,
    };
    let p = client.power(action).await.map_err(|e| match e {
        ClientError::Rpc(status) => status.message().to_string(),
        e => e.to_string(),
    })?;
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "asleep": p.asleep, "sleeps": p.sleeps, "wakes": p.wakes,
                "last_source": p.last_source, "order": p.order, "failures": p.failures,
                "logind": p.logind, "assertions": p.assertions, "waiting_calls": p.waiting_calls,
            })
        );
        return Ok(());
    }
    println!("state           {}", if p.asleep { "asleep" } else { "awake" });
    println!("sleeps, wakes   {}, {}", p.sleeps, p.wakes);
    println!(
        "follows logind  {}",
        if p.logind {
            "yes"
        } else {
            "no (sleep and wake by `portcullis power` only)"
        }
    );
    println!("assertions      {}", p.assertions);
    println!("waiting calls   {}", p.waiting_calls);
    if !p.last_source.is_empty() {
        println!("last change     by {}: {}", p.last_source, p.order.join(", "));
    }
    for failure in &p.failures {
        println!("failed          {failure}");
    }
    if p.failures.is_empty() {
        Ok(())
    } else {
        Err(format!("{} driver(s) failed the change", p.failures.len()))
    }
}

#[derive(Debug, Args)]
struct StatsArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

async fn stats(args: StatsArgs, run_dir: &RunDir) -> Result<(), String> {
    let client = run_dir.connect().await.map_err(|e| e.to_string())?;
    let s = client.stats().await.map_err(|e| match e {
        ClientError::Rpc(status) => status.message().to_string(),
        e => e.to_string(),
    })?;
    let rows = [
        ("services", s.services),
        ("sessions", s.sessions),
        ("user_clients", s.user_clients),
        ("mappings", s.mappings),
        ("pending_calls", s.pending_calls),
        ("service_opens", s.service_opens),
        ("driver_opens", s.driver_opens),
        ("driver_waiting", s.driver_waiting),
        ("rings", s.rings),
        ("open_fds", s.open_fds),
        ("queued_messages", s.queued_messages),
        ("connections", s.connections),
        ("background", s.background_connections),
        ("threads", s.threads),
        ("rss_bytes", s.rss_bytes),
    ];
    let policy = s.policy.as_ref();
    if args.json {
        let mut map: serde_json::Map<String, serde_json::Value> =
            rows.iter().map(|(k, v)| ((*k).to_string(), (*v).into())).collect();
        if let Some(p) = policy {
            map.insert(
                "policy".into(),
                serde_json::json!({ "revision": p.revision, "generation": p.generation, "mode": p.mode, "rules": p.rules }),
            );
        }
        let sandbox: Vec<serde_json::Value> = s
            .sandbox
            .iter()
            .map(|p| {
                serde_json::json!({
                    "role": p.role, "pid": p.pid, "uids": p.uids,
                    "cap_effective": format!("{:016x}", p.cap_effective),
                    "cap_permitted": format!("{:016x}", p.cap_permitted),
                    "cap_bounding": format!("{:016x}", p.cap_bounding),
                    "cap_ambient": format!("{:016x}", p.cap_ambient),
                    "no_new_privs": p.no_new_privs, "seccomp": p.seccomp,
                    "seccomp_filters": p.seccomp_filters, "landlock": p.landlock,
                })
            })
            .collect();
        map.insert("sandbox".into(), sandbox.into());
        if let Some(p) = &s.power {
            map.insert(
                "power".into(),
                serde_json::json!({ "asleep": p.asleep, "sleeps": p.sleeps, "wakes": p.wakes, "logind": p.logind, "assertions": p.assertions, "waiting_calls": p.waiting_calls }),
            );
        }
        println!("{}", serde_json::Value::Object(map));
    } else {
        for (k, v) in rows {
            println!("{k:<16}{v}");
        }
        if let Some(p) = policy {
            let revision = p.revision.get(..12).unwrap_or_default();
            println!(
                "{:<16}revision {revision}, generation {}, {}, {} rules",
                "policy", p.generation, p.mode, p.rules
            );
        }
        if let Some(p) = &s.power {
            println!(
                "{:<16}{}, {} sleeps, {} assertions, {} calls waiting for wake",
                "power",
                if p.asleep { "asleep" } else { "awake" },
                p.sleeps,
                p.assertions,
                p.waiting_calls
            );
        }
        for p in &s.sandbox {
            let uid = p.uids.get(1).copied().unwrap_or(u32::MAX);
            println!(
                "{:<16}pid {}, uid {uid}, capabilities eff {:x} prm {:x} bnd {:x} amb {:x}, no_new_privs {}, seccomp {} ({} filters), landlock {}",
                p.role,
                p.pid,
                p.cap_effective,
                p.cap_permitted,
                p.cap_bounding,
                p.cap_ambient,
                if p.no_new_privs { "on" } else { "off" },
                if p.seccomp == 2 { "filter" } else { "off" },
                p.seccomp_filters,
                p.landlock
            );
        }
    }
    Ok(())
}

/// Where the broker's sockets are.
#[derive(Clone, Debug, Args)]
pub(crate) struct RunDir {
    /// Directory holding the broker's sockets [default for clients: $XDG_RUNTIME_DIR/portcullis
    /// when a broker of your own serves it, else the system broker's /run/portcullis; for
    /// `broker`: /run/portcullis as root, else $XDG_RUNTIME_DIR/portcullis].
    #[arg(long, global = true, env = RUN_DIR_ENV)]
    run_dir: Option<PathBuf>,
}

impl RunDir {
    /// Where a client looks for the broker.
    fn path(&self) -> PathBuf {
        self.run_dir.clone().unwrap_or_else(portcullis_client::default_run_dir)
    }

    /// Where `portcullis broker` serves.
    fn serve_path(&self) -> Result<PathBuf, String> {
        match &self.run_dir {
            Some(dir) => Ok(dir.clone()),
            None => portcullis_client::own_run_dir().ok_or_else(|| {
                "no run dir: a broker not run as root serves $XDG_RUNTIME_DIR/portcullis, and XDG_RUNTIME_DIR is not set; pass --run-dir DIR (a directory only you can write)".to_string()
            }),
        }
    }

    pub(crate) async fn connect(&self) -> Result<Client, ClientError> {
        Client::connect(self.path()).await
    }
}

#[derive(Debug, Args)]
struct BrokerArgs {
    /// Configuration file (TOML) [default: embedded: one sample device].
    #[arg(long)]
    config: Option<PathBuf>,
    /// Policy file, or directory of *.toml files read in lexical order [default: the config's
    /// `policy`, else the embedded default policy].
    #[arg(long)]
    policy: Option<PathBuf>,
    /// Log every admission and refusal as JSON lines to this file [default: the config's
    /// `decision_log`, else none].
    #[arg(long)]
    decision_log: Option<PathBuf>,
    /// Stop once no client has been connected for this many seconds. Meant for socket
    /// activation (`dist/systemd/portcullis.socket`): systemd keeps the sockets and starts the
    /// broker again at the next connection, whose first request waits in the backlog.
    #[arg(long, value_name = "SECS")]
    exit_idle_time: Option<f64>,
}

/// Runs the command line; returns the process exit status.
fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Broker(_)) {
        portcullis_broker::default_sigpipe();
    }
    let run_dir = cli.run_dir;
    // Offline commands need no runtime.
    match cli.command {
        Command::Layout(args) => return finish(layout::run(args)),
        Command::Schema(args) => return finish(schema::run(args)),
        Command::Policy(command) => return policy::run(command, &run_dir),
        Command::Driver(command) => return finish(driver::run(command)),
        _ => {}
    }
    let is_broker = matches!(cli.command, Command::Broker(_));
    // Before any thread exists: taking systemd's sockets clears the environment.
    let activated = if is_broker {
        match portcullis_broker::systemd::Activated::take() {
            Ok(activated) => activated,
            Err(e) => {
                eprintln!("portcullis: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        None
    };
    init_logging(cli.log_format, if is_broker { "info" } else { "warn" });
    // The broker enters its sandbox before the runtime starts any thread.
    let prepared = match &cli.command {
        Command::Broker(args) => match prepare_broker(args, &run_dir, activated) {
            Ok(prepared) => Some(prepared),
            Err(message) => {
                tracing::error!("{message}");
                eprintln!("portcullis: {message}");
                return ExitCode::FAILURE;
            }
        },
        _ => None,
    };
    let runtime = if is_broker {
        server::runtime()
    } else {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    };
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("portcullis: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Broker(_) => match prepared {
                Some(prepared) => server::run(prepared, shutdown_signal())
                    .await
                    .map_err(|e| e.to_string()),
                None => Ok(()),
            },
            Command::Ls(args) => ls::run(args, &run_dir).await,
            Command::Call(args) => call::run(args, &run_dir).await,
            Command::Watch(args) => watch::run(args, &run_dir).await,
            Command::Stats(args) => stats(args, &run_dir).await,
            Command::Power(args) => power(args, &run_dir).await,
            Command::Qualify(args) => qualify::run(args, &run_dir).await,
            Command::Layout(_) | Command::Schema(_) | Command::Policy(_) | Command::Driver(_) => Ok(()),
        }
    });
    // Work still running on the blocking pool (an identity being read) does not hold the exit.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    finish(result)
}

pub(crate) fn finish(result: Result<(), String>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            if !message.is_empty() {
                eprintln!("portcullis: {message}");
            }
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat, default_level: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    use std::io::IsTerminal;
    // Colours only for a person at a terminal, never into a file or a journal.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn prepare_broker(
    args: &BrokerArgs,
    run_dir: &RunDir,
    activated: Option<portcullis_broker::systemd::Activated>,
) -> Result<server::Prepared, String> {
    let exit_idle = match args.exit_idle_time {
        Some(secs) if secs.is_finite() && secs > 0.0 => Some(std::time::Duration::from_secs_f64(secs)),
        Some(secs) => return Err(format!("--exit-idle-time {secs}: a number of seconds above 0")),
        None => None,
    };
    if exit_idle.is_some() && activated.is_none() {
        tracing::warn!("--exit-idle-time without socket activation: once the broker stops, nothing starts it again");
    }
    let options = BrokerOptions {
        activated,
        exit_idle,
        config: args.config.clone(),
        policy: args.policy.clone(),
        run_dir: run_dir.serve_path()?,
        decision_log: args.decision_log.clone(),
    };
    server::prepare(options).map_err(|e| e.to_string())
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut interrupt), Ok(mut terminate)) = (signal(SignalKind::interrupt()), signal(SignalKind::terminate()))
    else {
        tracing::error!("cannot install signal handlers; stop the broker with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = interrupt.recv() => tracing::info!("SIGINT: stopping"),
        _ = terminate.recv() => tracing::info!("SIGTERM: stopping"),
    }
}
