//! One cycle of each transition, against a real broker over its real sockets.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use portcullis_client::{
    Client, ClientError, OpenMode, Session, Status, UserClient, matching,
    native::NativeSession,
    pb,
    ring::{RingClient, RingOptions},
};
use portcullis_proto::layout::AbiId;

use super::Transition;

/// The configuration of a broker qualify starts: the sample device, personalities in
/// `drivers.d` (written beside it).
pub(super) const CONFIG: &str = r#"drivers = "drivers.d"

[[device]]
name = "sample0"
driver = "sample"
properties = { model = "demo", vendor = "portcullis" }
"#;

/// Added to the policy of a broker qualify starts: root may use the devices qualify makes.
pub(super) const POLICY: &str = r#"
[[rule]]
id = "qualify-devices"
effect = "allow"
principals = ["root"]
service = { properties = { personality = { prefix = "org.portcullis.qualify." } } }
methods = ["*"]
memory = ["dma", "packets"]
open = "exclusive"
"#;

/// The prefix of the TUN interfaces qualify makes.
pub(super) const TUN_PREFIX: &str = "pqtun";

/// Personalities claiming the loop devices backed by files under `devices`, and the TUN
/// interfaces named `pqtun*`.
pub(super) fn personalities(devices: &Path) -> String {
    format!(
        r#"[[personality]]
id = "org.portcullis.qualify.disks"
version = "1.0"
driver = "block"
provider_class = "BlockNub"
match = {{ devtype = "disk", "loop.backing_file" = {{ prefix = "{}/" }} }}
probe_score = 1000

[[personality]]
id = "org.portcullis.qualify.tuns"
version = "1.0"
driver = "net"
provider_class = "NetNub"
match = {{ "net.interface" = {{ prefix = "{TUN_PREFIX}" }} }}
probe_score = 1000
"#,
        devices.display()
    )
}

/// A service qualify exercises.
#[derive(Clone, Debug)]
pub(super) struct Target {
    id: u64,
    name: String,
    class: String,
    methods: Vec<pb::MethodInfo>,
    memory_types: Vec<u32>,
}

/// The services qualify exercises.
#[derive(Debug)]
pub(super) struct Targets(Vec<Target>);

impl Targets {
    /// Every service with a driver this task may see (or those named).
    pub(super) async fn resolve(admin: &Client, names: &[String]) -> Result<Targets, String> {
        let all = admin.list_services(matching::all()).await.map_err(|e| e.to_string())?;
        let mut targets = Vec::new();
        for s in all.iter().filter(|s| !s.methods.is_empty()) {
            if !names.is_empty() && !names.contains(&s.name) {
                continue;
            }
            let memory_types = portcullis_broker::drivers::families()
                .into_iter()
                .find(|f| f.class == s.class)
                .map(|f| f.memory_types().iter().map(|m| m.id).collect())
                .unwrap_or_default();
            targets.push(Target {
                id: s.id,
                name: s.name.clone(),
                class: s.class.clone(),
                methods: s.methods.clone(),
                memory_types,
            });
        }
        if let Some(missing) = names.iter().find(|n| !targets.iter().any(|t| &t.name == *n)) {
            return Err(format!("no service {missing:?} with a driver that this task may see"));
        }
        Ok(Targets(targets))
    }
}

/// A request the broker refused as it may (policy, arbitration, limits): counted, not a failure.
fn refused_as_it_may(e: &ClientError) -> bool {
    matches!(
        e.status(),
        Some(Status::NotPrivileged | Status::ExclusiveAccess | Status::RateLimited | Status::Unsupported)
    )
}

/// Counts a refusal, or fails with the error.
fn tolerate<T>(result: Result<T, ClientError>, what: &str, refused: &mut u64) -> Result<Option<T>, String> {
    match result {
        Ok(v) => Ok(Some(v)),
        Err(e) if refused_as_it_may(&e) => {
            *refused += 1;
            Ok(None)
        }
        Err(e) => Err(format!("{what}: {e}")),
    }
}

/// The calls qualify makes on a method: arguments that change no device (reads, the sample
/// device's arithmetic), by class and method; `None` for a method it leaves alone.
fn harmless_call(class: &str, method: &str) -> Option<(Vec<u64>, Vec<u8>)> {
    Some(match (class, method) {
        ("SampleDevice", "add") => (vec![2, 3], vec![]),
        ("SampleDevice", "echo") => (vec![], b"qualify".to_vec()),
        ("SampleDevice", "get_info") => (vec![], vec![]),
        // No event comes: it times out at once.
        ("SampleDevice", "wait_event") => (vec![0], vec![]),
        ("SampleDevice", "fire_event") => (vec![7], vec![]),
        ("SampleDevice", "transform_record") => (vec![], Vec::new()),
        ("PowerDomain", "get_state") => (vec![], vec![]),
        ("TtyDevice", "get_line" | "get_modem") => (vec![], vec![]),
        ("BlockDevice", "get_geometry") => (vec![], vec![]),
        ("NetDevice", "get_info") => (vec![], vec![]),
        _ => return None,
    })
}

/// What a transition keeps between its cycles.
pub(super) enum Cycler {
    Connect {
        run_dir: PathBuf,
    },
    Open {
        session: Session,
        targets: Vec<Target>,
    },
    Map {
        native: NativeSession,
        targets: Vec<Target>,
    },
    Call {
        session: Session,
        open: Vec<(UserClient, String, Vec<pb::MethodInfo>)>,
    },
    Ring {
        run_dir: PathBuf,
        name: String,
    },
    Reload {
        admin: Client,
    },
    Attach {
        watcher: Session,
        devices: PathBuf,
        _scratch: Option<tempfile::TempDir>,
    },
    Sleep {
        admin: Client,
    },
}

impl Cycler {
    pub(super) async fn new(
        transition: Transition,
        run_dir: &Path,
        targets: &Targets,
        attach_dir: Option<&Path>,
        admin: &Client,
    ) -> Result<Cycler, String> {
        let session = || async {
            admin
                .session()
                .await
                .map_err(|e| format!("cannot start a session: {e}"))
        };
        Ok(match transition {
            Transition::Connect => Cycler::Connect {
                run_dir: run_dir.to_path_buf(),
            },
            Transition::Open => Cycler::Open {
                session: session().await?,
                targets: targets.0.clone(),
            },
            Transition::Map => Cycler::Map {
                native: NativeSession::connect(run_dir, AbiId::native())
                    .await
                    .map_err(|e| e.to_string())?,
                targets: targets
                    .0
                    .iter()
                    .filter(|t| !t.memory_types.is_empty())
                    .cloned()
                    .collect(),
            },
            Transition::Call => {
                let session = session().await?;
                let mut open = Vec::new();
                for t in &targets.0 {
                    let mut refused = 0;
                    if let Some(uc) = tolerate(session.open(t.id, OpenMode::Shared).await, "open", &mut refused)? {
                        open.push((uc, t.class.clone(), t.methods.clone()));
                    }
                }
                Cycler::Call { session, open }
            }
            Transition::Ring => Cycler::Ring {
                run_dir: run_dir.to_path_buf(),
                name: targets.0.first().map(|t| t.name.clone()).unwrap_or_default(),
            },
            Transition::Reload => Cycler::Reload { admin: admin.clone() },
            Transition::Attach => {
                let watcher = session().await?;
                for class in ["BlockDevice", "NetDevice"] {
                    watcher
                        .watch_matching(pb::Matching {
                            class: class.into(),
                            ..pb::Matching::default()
                        })
                        .await
                        .map_err(|e| e.to_string())?;
                }
                let (devices, scratch) = match attach_dir {
                    Some(dir) => (dir.to_path_buf(), None),
                    None => {
                        let scratch = tempfile::Builder::new()
                            .prefix("portcullis-qualify-")
                            .tempdir()
                            .map_err(|e| e.to_string())?;
                        (scratch.path().to_path_buf(), Some(scratch))
                    }
                };
                Cycler::Attach {
                    watcher,
                    devices,
                    _scratch: scratch,
                }
            }
            Transition::Sleep => Cycler::Sleep { admin: admin.clone() },
        })
    }

    /// One cycle; the requests refused as the broker may refuse them.
    pub(super) async fn cycle(&mut self, cycle: u64) -> Result<u64, String> {
        let mut refused = 0;
        match self {
            Cycler::Connect { run_dir } => {
                let client = Client::connect(&*run_dir)
                    .await
                    .map_err(|e| format!("gRPC connect: {e}"))?;
                let session = client.session().await.map_err(|e| format!("gRPC session: {e}"))?;
                drop((session, client));
                let native = NativeSession::connect(&*run_dir, AbiId::native())
                    .await
                    .map_err(|e| format!("native connect: {e}"))?;
                drop(native);
            }
            Cycler::Open { session, targets } => {
                for t in targets.iter() {
                    for mode in [OpenMode::Shared, OpenMode::Exclusive] {
                        let opened = tolerate(
                            session.open(t.id, mode).await,
                            &format!("open {}", t.name),
                            &mut refused,
                        )?;
                        if let Some(uc) = opened {
                            session.close(&uc).await.map_err(|e| format!("close {}: {e}", t.name))?;
                        }
                    }
                }
            }
            Cycler::Map { native, targets } => {
                for t in targets.iter() {
                    let opened = tolerate(
                        native.open(t.id, false).await,
                        &format!("open {}", t.name),
                        &mut refused,
                    )?;
                    let Some(handle) = opened else { continue };
                    for memory_type in &t.memory_types {
                        let what = format!("map {} type {memory_type}", t.name);
                        tolerate(native.map_memory(handle, *memory_type).await, &what, &mut refused)?;
                    }
                    native
                        .close(handle)
                        .await
                        .map_err(|e| format!("close {}: {e}", t.name))?;
                }
            }
            Cycler::Call { session, open } => {
                for (uc, class, methods) in open.iter() {
                    for m in methods {
                        let Some((scalars, mut struct_in)) = harmless_call(class, &m.name) else {
                            continue;
                        };
                        if m.name == "transform_record" {
                            struct_in = vec![0; m.struct_in.as_ref().map_or(0, |r| r.min as usize)];
                        }
                        let result = session.call_named(uc, &m.name, &scalars, &struct_in).await;
                        match result {
                            // wait_event with no event: its timeout is the expected answer.
                            Err(e) if m.name == "wait_event" && e.status() == Some(Status::Timeout) => {}
                            other => {
                                tolerate(other, &format!("call {}", m.name), &mut refused)?;
                            }
                        }
                    }
                }
            }
            Cycler::Ring { run_dir, name } => {
                let (run_dir, name) = (run_dir.clone(), name.clone());
                tokio::task::spawn_blocking(move || -> Result<(), String> {
                    let mut ring = RingClient::connect(&run_dir, RingOptions::default())
                        .map_err(|e| format!("ring set up: {e}"))?;
                    ring.find(&name).map_err(|e| format!("a call through the ring: {e}"))?;
                    Ok(())
                })
                .await
                .map_err(|e| e.to_string())??;
            }
            Cycler::Reload { admin } => {
                admin.reload_policy().await.map_err(|e| format!("reload: {e}"))?;
            }
            Cycler::Attach { watcher, devices, .. } => {
                let disk = devices.join(format!("disk{}.img", cycle % 2));
                std::fs::write(&disk, vec![0u8; 1 << 20]).map_err(|e| format!("{}: {e}", disk.display()))?;
                let node = command(Command::new("losetup").args(["--find", "--show"]).arg(&disk))?;
                let node = node.trim();
                let attached = claimed(watcher, "BlockDevice", devices).await;
                // The media goes while the broker holds the device: the kernel defers the
                // detach until the last holder lets go, and announces the emptied file as a
                // change of a device with no media, which ends the driver's service.
                command(Command::new("losetup").args(["--detach", node]))?;
                std::fs::write(&disk, b"").map_err(|e| format!("{}: {e}", disk.display()))?;
                let _ = Command::new("losetup").args(["--set-capacity", node]).output();
                let id = attached?;
                gone(watcher, id).await?;
                detached(node, &disk).await?;
                let _ = std::fs::remove_file(&disk);
                let tun = format!("{TUN_PREFIX}{}", std::process::id() % 100_000);
                command(Command::new("ip").args(["tuntap", "add", "dev", &tun, "mode", "tun"]))?;
                let attached = claimed(watcher, "NetDevice", devices).await;
                command(Command::new("ip").args(["link", "del", &tun]))?;
                let id = attached?;
                gone(watcher, id).await?;
            }
            Cycler::Sleep { admin } => {
                use pb::power_request::Action;
                for action in [Action::Sleep, Action::Wake] {
                    let status = admin.power(action).await.map_err(|e| format!("power: {e}"))?;
                    if status.asleep != (action == Action::Sleep) {
                        return Err(format!(
                            "power {action:?} left the devices {}",
                            if status.asleep { "asleep" } else { "awake" }
                        ));
                    }
                    if let Some(failure) = status.failures.first() {
                        return Err(format!("a driver failed {action:?}: {failure}"));
                    }
                }
            }
        }
        Ok(refused)
    }

    /// Releases what the transition kept.
    pub(super) async fn finish(&mut self) {
        if let Cycler::Call { session, open } = self {
            for (uc, _, _) in open.drain(..) {
                let _ = session.close(&uc).await;
            }
        }
    }
}

/// Waits (10 s at most) until the kernel has finished the deferred detach of `node` from `disk`.
async fn detached(node: &str, disk: &Path) -> Result<(), String> {
    let name = node.rsplit('/').next().unwrap_or(node);
    let backing = format!("/sys/block/{name}/loop/backing_file");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::fs::read_to_string(&backing).is_ok_and(|f| f.trim_end() == disk.to_string_lossy()) {
        if std::time::Instant::now() > deadline {
            return Err(format!(
                "{node} was still attached to {} 10 s after the broker let go",
                disk.display()
            ));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

fn command(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Waits (10 s at most) for the broker to publish a service of `class` for a device qualify made.
async fn claimed(watcher: &Session, class: &str, devices: &Path) -> Result<u64, String> {
    let wait = async {
        loop {
            let Some(event) = watcher.next_event().await else {
                return Err("the session ended".to_string());
            };
            if let Some(pb::event::Kind::Published(p)) = event.kind
                && let Some(service) = p.service
                && service.class == class
            {
                return Ok(service.id);
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), wait).await.unwrap_or_else(|_| {
        Err(format!(
            "no driver claimed the {class} qualify made within 10 s: the broker's personalities must claim loop devices backed by files under {} and TUN interfaces named {TUN_PREFIX}* (`portcullis qualify --start` brings its own; or --devices-dir)",
            devices.display()
        ))
    })
}

/// Waits (10 s at most) for the service `id` to be terminated.
async fn gone(watcher: &Session, id: u64) -> Result<(), String> {
    let wait = async {
        loop {
            let Some(event) = watcher.next_event().await else {
                return Err("the session ended".to_string());
            };
            if let Some(pb::event::Kind::Terminated(t)) = event.kind
                && t.service_id == id
            {
                return Ok(());
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), wait)
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "service {id} was not terminated within 10 s of its device going"
            ))
        })
}
