//! Broker configuration: the devices the virtual bus publishes, and where the policy lives.
//! Built-in defaults are embedded so that `portcullis broker` runs with no files at all.

use std::{
    fs,
    path::{Path, PathBuf},
};

use portcullis_policy::{Policy, PolicyError, Source};
use portcullis_proto::property::{PropValue, Properties};
use serde::Deserialize;

/// Connections served at once unless the configuration says otherwise.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;

/// The embedded default configuration.
pub const DEFAULT_CONFIG: &str = include_str!("default_config.toml");

/// The embedded default policy.
pub const DEFAULT_POLICY: &str = include_str!("default_policy.toml");

/// A parsed configuration.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Policy file or directory; relative paths are relative to the config file.
    pub policy: Option<PathBuf>,
    /// Most client connections served at once, over all transports [default: 1024]. A
    /// connection over the limit is refused at once, so a flood cannot exhaust the broker.
    pub max_connections: Option<usize>,
    /// The decision log (JSON lines); relative paths are relative to the config file.
    pub decision_log: Option<PathBuf>,
    /// Reload the policy when a file of it changes [default: true]. With `false`, only
    /// `SIGHUP` and `portcullis policy reload` reload it (a team that stages edits, and checks
    /// them with `policy reload --dry-run`, first).
    pub watch_policy: Option<bool>,
    /// Driver personalities: a `drivers.d` directory of `*.toml` files naming the kernel
    /// devices the broker may claim; relative paths are relative to the config file [default:
    /// none, so no kernel device is claimed].
    pub drivers: Option<PathBuf>,
    /// Publish a nub per tty, block and network device of the kernel, and follow its hotplug
    /// events [default: true]. Nubs are not opened: only a personality's driver opens a device.
    pub discovery: Option<bool>,
    /// Devices the virtual bus publishes.
    #[serde(default, rename = "device")]
    pub devices: Vec<DeviceConfig>,
    /// gRPC over TCP with mutual TLS, for remote clients (off unless configured).
    pub tls: Option<TlsConfig>,
    /// The shared-memory ring of the native protocol.
    #[serde(default)]
    pub ring: RingConfig,
    /// What one client identity may hold.
    #[serde(default)]
    pub limits: Limits,
    /// How the broker confines itself.
    #[serde(default)]
    pub sandbox: crate::sandbox::SandboxConfig,
    /// How the broker follows the machine's sleep and wake.
    #[serde(default)]
    pub power: crate::power::PowerConfig,
}

/// `[limits]`: what one client identity (a uid; for TCP clients, a certificate) may hold, so
/// that no user can starve the others, and how long the broker waits on clients.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Connections one uid may hold at once, over all transports [default: 64]. Root and the
    /// broker's own user are not limited per uid.
    pub max_connections_per_uid: usize,
    /// Of `max_connections`, slots only root and the broker's own user may take, so that an
    /// administrator can always connect (`portcullis stats`) [default: 1/64 of
    /// `max_connections`, at least 1 and at most 16].
    pub reserved_connections: Option<usize>,
    /// How long a new connection may take before it can be served: a native client's `Hello`,
    /// a gRPC client's HTTP/2 preface, a TLS client's handshake, in milliseconds [default: 10000].
    pub handshake_timeout_ms: u64,
    /// Asynchronous calls one uid may have pending at once, over all its sessions (each session
    /// also at most 1024) [default: 4096]. Over it: `NO_MEMORY`.
    pub max_pending_calls_per_uid: usize,
    /// Responses and events queued for one uid's clients that they have not read yet, over all
    /// its sessions [default: 4096]. Over it, events are dropped (the client is told how many it
    /// lost) and calls are refused with `NO_MEMORY` until the clients read.
    pub max_queued_messages_per_uid: usize,
    /// Executables larger than this are not hashed: they match no `exe_sha256` principal
    /// [default: 64 MiB].
    pub max_exe_hash_bytes: u64,
    /// Executables hashed at once for one uid [default: 1]; more connections wait their turn.
    pub max_exe_hashes_per_uid: usize,
    /// When stopping, how long in-flight calls may take to finish before they are aborted, in
    /// milliseconds [default: 5000].
    pub shutdown_timeout_ms: u64,
    /// Shared-memory rings one uid may hold at once [default: 8], of the broker's
    /// `ring.max_rings`; over it, `NO_MEMORY` and the client stays on the socket. Root and the
    /// broker's own user are not limited per uid.
    pub max_rings_per_uid: usize,
    /// Driver memory one uid may have mapped at once, over all its user clients, in bytes
    /// [default: 1 GiB]; a mapping over it is refused with `NO_MEMORY`. Root and the broker's
    /// own user are not limited per uid.
    pub max_mapped_bytes_per_uid: u64,
    /// A session that holds nothing (no user client, pending call, subscription or matching
    /// watch) and has sent no request for this long is closed (`TIMEOUT`), so that idle
    /// connections cannot hold the slots others need, in milliseconds [default: 600000; 0:
    /// never].
    pub idle_timeout_ms: u64,
    /// User clients one session may hold open at once [default: 256]; over it, `NO_MEMORY`.
    pub max_user_clients_per_session: usize,
    /// Responses and events queued for one session (gRPC's outgoing queue, the native
    /// socket's completed calls) [default: 256]. A session whose client does not read stops
    /// being served at it: its next events are dropped, and it is told how many (`Lost`) when
    /// it reads again; the other sessions of its uid are not held up.
    pub max_queued_messages_per_session: usize,
    /// Connections one uid may hold and still be served in the foreground [default: 1].
    /// While it holds more, its connections are served by the background workers, which run at
    /// idle priority (`SCHED_IDLE`): as fast as ever on a machine with CPU to spare, but never
    /// ahead of another client's work — so that one uid spreading a flood over every
    /// connection it may hold cannot slow the others. A native connection moves between two of
    /// its requests; a gRPC connection is placed when it is accepted. Root and the user who
    /// started the broker are always in the foreground.
    pub foreground_connections_per_uid: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_connections_per_uid: 64,
            reserved_connections: None,
            handshake_timeout_ms: 10_000,
            max_pending_calls_per_uid: 4096,
            max_queued_messages_per_uid: 4096,
            max_exe_hash_bytes: 64 << 20,
            max_exe_hashes_per_uid: 1,
            shutdown_timeout_ms: 5_000,
            max_rings_per_uid: 8,
            max_mapped_bytes_per_uid: 1 << 30,
            idle_timeout_ms: 600_000,
            max_user_clients_per_session: portcullis_proto::limits::MAX_USER_CLIENTS_PER_SESSION,
            max_queued_messages_per_session: 256,
            foreground_connections_per_uid: 1,
        }
    }
}

impl Limits {
    /// Slots kept for administrators, of `max_connections`.
    pub fn reserved(&self, max_connections: usize) -> usize {
        self.reserved_connections
            .unwrap_or((max_connections / 64).clamp(1, 16))
            .min(max_connections.saturating_sub(1))
    }

    /// The handshake deadline.
    pub fn handshake_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.handshake_timeout_ms)
    }

    /// How long a session may sit idle holding nothing; `None` for ever.
    pub fn idle_timeout(&self) -> Option<std::time::Duration> {
        (self.idle_timeout_ms > 0).then(|| std::time::Duration::from_millis(self.idle_timeout_ms))
    }

    /// The shutdown deadline.
    pub fn shutdown_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.shutdown_timeout_ms)
    }
}

/// `[ring]`: how the broker serves shared-memory rings.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct RingConfig {
    /// `adaptive` (spin up to `spin_us`, then sleep on the eventfd), `spin` (never sleep; a
    /// core per ring) or `sleep` (never spin) [default: adaptive].
    pub wait: portcullis_proto::ring::WaitMode,
    /// How long an idle ring is polled before it sleeps, in microseconds [default: 50].
    pub spin_us: u64,
    /// Most rings served at once [default: 64]; more are refused with `NO_MEMORY` and the
    /// client stays on the socket. A sleeping ring holds no thread: thousands are cheap.
    pub max_rings: usize,
    /// Threads serving the rings that sleep (`adaptive`, `sleep`), in turns [default: the
    /// CPUs the broker may run on]. A `spin` ring has a thread of its own.
    pub threads: Option<usize>,
    /// Pin every ring thread to this CPU (for `spin` on a machine with a core set aside)
    /// [default: unpinned].
    pub cpu: Option<usize>,
}

impl RingConfig {
    /// The pool's threads: `threads`, or the CPUs this process may run on; at least one.
    pub fn threads(&self) -> usize {
        self.threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, std::num::NonZero::get))
            .max(1)
    }
}

impl Default for RingConfig {
    fn default() -> RingConfig {
        RingConfig {
            wait: portcullis_proto::ring::WaitMode::Adaptive,
            spin_us: 50,
            max_rings: 64,
            threads: None,
            cpu: None,
        }
    }
}

/// `[tls]`: the remote gRPC listener. Clients must present a certificate signed by
/// `client_ca`; policy principals match them by its SAN URI, SAN DNS or subject CN.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Address to listen on (`0.0.0.0:7443`, `[::1]:7443`; port 0 picks one, logged).
    pub listen: std::net::SocketAddr,
    /// The broker's certificate chain (PEM); relative paths are relative to the config file.
    pub cert: PathBuf,
    /// The broker's private key (PEM).
    pub key: PathBuf,
    /// The CA (PEM) that client certificates must chain to.
    pub client_ca: PathBuf,
}

/// One `[[device]]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    /// Registry name, unique.
    pub name: String,
    /// Driver kind (see [`crate::drivers::families`]).
    pub driver: String,
    /// The device node a driver that serves one opens (`tty`, `block`).
    pub path: Option<PathBuf>,
    /// The network interface a `net` driver creates.
    pub interface: Option<String>,
    /// Open the device read-only (`block`): writes are refused with `NOT_WRITABLE`.
    #[serde(default)]
    pub read_only: bool,
    /// Properties published with the device (strings, integers, booleans).
    #[serde(default)]
    pub properties: toml::Table,
}

/// Why configuration or policy could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The config is not valid TOML of the expected shape.
    #[error("{origin}: {source}")]
    Parse {
        /// The file, or "embedded default".
        origin: String,
        /// The TOML error, with its location.
        source: toml::de::Error,
    },
    /// A device's property has a type the registry cannot hold.
    #[error("device {device:?}: property {key:?} must be a string, integer or boolean")]
    Property {
        /// The device.
        device: String,
        /// The key.
        key: String,
    },
    /// The policy is invalid.
    #[error("policy:\n{0}")]
    Policy(#[from] PolicyError),
    /// A policy directory holds no `*.toml` file.
    #[error("{0}: no *.toml policy files")]
    EmptyPolicyDir(PathBuf),
    /// A root broker refuses a file or directory others could change (StrictModes).
    #[error("{path}: refused: {}", problems.join("; "))]
    Untrusted {
        /// The file or directory loaded.
        path: PathBuf,
        /// What makes it untrusted, with the fix.
        problems: Vec<String>,
    },
    /// Two settings contradict each other, or one is out of range.
    #[error("{origin}: {message}")]
    Invalid {
        /// The file, or "embedded default config".
        origin: String,
        /// What is wrong.
        message: String,
    },
}

impl Config {
    /// Parses configuration text.
    pub fn parse(origin: &str, text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|source| ConfigError::Parse {
            origin: origin.to_string(),
            source,
        })?;
        let invalid = |message: String| ConfigError::Invalid {
            origin: origin.to_string(),
            message,
        };
        let max = config.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS);
        let limits = &config.limits;
        if max == 0 || limits.max_connections_per_uid == 0 {
            return Err(invalid(
                "max_connections and limits.max_connections_per_uid must be at least 1".into(),
            ));
        }
        if let Some(reserved) = limits.reserved_connections
            && reserved >= max
        {
            return Err(invalid(format!(
                "limits.reserved_connections ({reserved}) must be less than max_connections ({max}), or nobody but root could connect"
            )));
        }
        if limits.max_pending_calls_per_uid == 0 || limits.max_queued_messages_per_uid == 0 {
            return Err(invalid(
                "limits.max_pending_calls_per_uid and limits.max_queued_messages_per_uid must be at least 1".into(),
            ));
        }
        if limits.foreground_connections_per_uid == 0 {
            return Err(invalid(
                "limits.foreground_connections_per_uid must be at least 1 (every client needs one connection served ahead of floods)".into(),
            ));
        }
        if limits.max_queued_messages_per_session == 0 {
            return Err(invalid(
                "limits.max_queued_messages_per_session must be at least 1".into(),
            ));
        }
        if limits.max_user_clients_per_session == 0 {
            return Err(invalid(
                "limits.max_user_clients_per_session must be at least 1 (to keep a user off a device, use the policy)"
                    .into(),
            ));
        }
        if limits.max_rings_per_uid == 0 || limits.max_mapped_bytes_per_uid == 0 {
            return Err(invalid(
                "limits.max_rings_per_uid and limits.max_mapped_bytes_per_uid must be at least 1 (to keep a user off rings or mappings, use the policy)".into(),
            ));
        }
        Ok(config)
    }

    /// [`Config::load`] for the broker: a root broker refuses a config file others could
    /// change ([`crate::trust`]).
    pub fn load_trusted(path: Option<&Path>) -> Result<Config, ConfigError> {
        if let Some(path) = path {
            require_trusted(path)?;
        }
        Config::load(path)
    }

    /// Loads a config file, or the embedded default. A relative `policy` path is resolved
    /// against the file's directory.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let Some(path) = path else {
            return Config::parse("embedded default config", DEFAULT_CONFIG);
        };
        let text = read(path)?;
        let mut config = Config::parse(&path.display().to_string(), &text)?;
        if let Some(dir) = path.parent() {
            config.policy = config.policy.map(|p| dir.join(p));
            config.decision_log = config.decision_log.map(|p| dir.join(p));
            config.drivers = config.drivers.map(|p| dir.join(p));
            if let Some(tls) = &mut config.tls {
                for path in [&mut tls.cert, &mut tls.key, &mut tls.client_ca] {
                    *path = dir.join(&*path);
                }
            }
        }
        Ok(config)
    }
}

impl DeviceConfig {
    /// The device's properties as registry values.
    pub fn registry_properties(&self) -> Result<Properties, ConfigError> {
        self.properties
            .iter()
            .map(|(k, v)| {
                let value = match v {
                    toml::Value::String(s) => PropValue::Text(s.clone()),
                    toml::Value::Integer(i) => u64::try_from(*i).map_or(PropValue::Signed(*i), PropValue::Unsigned),
                    toml::Value::Boolean(b) => PropValue::Flag(*b),
                    _ => {
                        return Err(ConfigError::Property {
                            device: self.name.clone(),
                            key: k.clone(),
                        });
                    }
                };
                Ok((k.clone(), value))
            })
            .collect()
    }
}

fn read(path: &Path) -> Result<String, ConfigError> {
    fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// The files of the policy at `path`: the file itself, or a directory's `*.toml` files in
/// lexical order.
pub fn policy_files(path: &Path) -> Result<Vec<PathBuf>, ConfigError> {
    if path.is_dir() {
        let mut files: Vec<PathBuf> = fs::read_dir(path)
            .map_err(|source| ConfigError::Read {
                path: path.to_path_buf(),
                source,
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml") && p.is_file())
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(ConfigError::EmptyPolicyDir(path.to_path_buf()));
        }
        Ok(files)
    } else {
        Ok(vec![path.to_path_buf()])
    }
}

/// Refuses `path` (and, for a policy directory, each of its files) when this broker runs as
/// root and someone else could change it: every problem at once, each with its fix.
pub fn require_trusted(path: &Path) -> Result<(), ConfigError> {
    if !crate::trust::enforced() {
        return Ok(());
    }
    let problems = trust_problems(path, crate::trust::broker_uid());
    if problems.is_empty() {
        Ok(())
    } else {
        Err(ConfigError::Untrusted {
            path: path.to_path_buf(),
            problems,
        })
    }
}

/// What makes `path` untrusted for a broker of `uid`, and for a policy directory each file of
/// it (a file is its own only file).
fn trust_problems(path: &Path, uid: u32) -> Vec<String> {
    let mut found = crate::trust::problems(path, uid);
    if path.is_dir() {
        for file in policy_files(path).unwrap_or_default() {
            found.extend(crate::trust::problems(&file, uid));
        }
    }
    found.sort();
    found.dedup();
    found
}

/// What makes the policy at `path` untrusted for a root broker, for `policy check` to warn
/// about.
pub fn policy_trust_problems(path: &Path) -> Vec<String> {
    trust_problems(path, 0)
}

/// [`load_policy`] for the broker: a root broker refuses a policy file or directory others
/// could change ([`crate::trust`]).
pub fn load_policy_trusted(path: Option<&Path>) -> Result<Policy, ConfigError> {
    if let Some(path) = path {
        require_trusted(path)?;
    }
    load_policy(path)
}

/// Loads the policy at `path` (a file, or a directory whose `*.toml` files are read in lexical
/// order), or the embedded default, and checks every driver name it uses against the drivers.
pub fn load_policy(path: Option<&Path>) -> Result<Policy, ConfigError> {
    let catalog = crate::drivers::catalog();
    let Some(path) = path else {
        let default = Source {
            origin: "embedded default policy",
            text: DEFAULT_POLICY,
        };
        return Ok(Policy::parse_checked(&[default], Some(&catalog))?);
    };
    let files = policy_files(path)?;
    let texts = files
        .iter()
        .map(|f| Ok((f.display().to_string(), read(f)?)))
        .collect::<Result<Vec<_>, ConfigError>>()?;
    if crate::capture::enabled() {
        texts
            .iter()
            .for_each(|(_, text)| crate::capture::record("policy_text", text.as_bytes()));
    }
    let sources: Vec<Source<'_>> = texts.iter().map(|(origin, text)| Source { origin, text }).collect();
    let policy = Policy::parse_checked(&sources, Some(&catalog))?;
    for warning in policy.warnings() {
        tracing::warn!("{warning}");
    }
    Ok(policy)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_defaults_load() {
        let config = Config::load(None).unwrap();
        assert_eq!(config.devices.len(), 1);
        assert_eq!(config.devices[0].name, "sample0");
        assert!(load_policy(None).unwrap().rule_count() >= 2);
    }

    #[test]
    fn policy_naming_an_unknown_method_is_refused_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.toml");
        fs::write(&path, "[[principal]]\nname = \"a\"\n[[rule]]\nid = \"r\"\neffect = \"allow\"\nprincipals = [\"a\"]\nservice = { class = \"SampleDevice\" }\nmethods = [\"ad\"]\n").unwrap();
        let err = load_policy(Some(&path)).unwrap_err().to_string();
        assert!(
            err.contains("p.toml:8:12") && err.contains("did you mean \"add\""),
            "{err}"
        );
    }

    #[test]
    fn config_unknown_key_is_refused() {
        assert!(Config::parse("t", "[[device]]\nname = \"a\"\ndriver = \"sample\"\nspeed = 1\n").is_err());
    }

    #[test]
    fn config_table_property_is_refused() {
        let c = Config::parse(
            "t",
            "[[device]]\nname = \"a\"\ndriver = \"sample\"\nproperties = { x = { y = 1 } }\n",
        )
        .unwrap();
        assert!(matches!(
            c.devices[0].registry_properties(),
            Err(ConfigError::Property { .. })
        ));
    }

    #[test]
    fn policy_dir_reads_toml_files_in_order() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("10-principals.toml"), "[[principal]]\nname = \"all\"\n").unwrap();
        fs::write(
            dir.path().join("20-rules.toml"),
            "[[rule]]\nid = \"r\"\neffect = \"allow\"\nprincipals = [\"all\"]\n",
        )
        .unwrap();
        fs::write(dir.path().join("README"), "not policy").unwrap();
        assert_eq!(load_policy(Some(dir.path())).unwrap().rule_count(), 1);
        let empty = tempfile::tempdir().unwrap();
        assert!(matches!(
            load_policy(Some(empty.path())),
            Err(ConfigError::EmptyPolicyDir(_))
        ));
    }

    /// The configuration the README shows parses, with the values it says are the defaults.
    #[test]
    fn the_readme_configuration_example_parses() {
        let readme = include_str!("../../README.md");
        let example = readme
            .split_once("A broker configuration declares")
            .and_then(|(_, rest)| rest.split_once("```toml\n"))
            .and_then(|(_, rest)| rest.split_once("```"))
            .map(|(block, _)| block)
            .unwrap();
        let config = Config::parse("README", example).unwrap();
        assert_eq!(config.drivers.as_deref(), Some(Path::new("drivers.d")));
        assert_eq!(config.discovery, Some(true));
        assert_eq!(config.limits, Limits::default());
        assert_eq!(config.sandbox, crate::sandbox::SandboxConfig::default());
    }
}
