//! A system D-Bus of the tests' own with the machine's real `systemd-logind` and `polkitd` on
//! it, for the broker's logind integration: sleep inhibitors, `PrepareForSleep`, and the
//! polkit rule the product ships (`dist/polkit/50-portcullis.rules`, installed by `cargo xtask
//! test`).
//!
//! This machine cannot sleep and its PID 1 is not systemd, so two things stand in for the
//! missing machine, and only they: logind runs in a mount namespace of its own where
//! `/sys/power/state` offers sleep states, and a small stand-in owns `org.freedesktop.systemd1`
//! on this bus, answering logind's questions about `suspend.target` and "running" it by
//! announcing the job done at once — as if the machine slept and woke in an instant. Everything
//! the broker sees — logind's signals, its inhibitors, polkit's verdicts — is the real daemons'.
//!
//! Started once per test process, from a thread that lives as long as the process, so that the
//! daemons (`setpriv --pdeathsig KILL`) die with it.

use std::{
    process::{Child, Command, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

use tokio_stream::StreamExt;

/// The tests' system bus.
#[derive(Debug)]
pub struct SystemBus {
    /// `DBUS_SYSTEM_BUS_ADDRESS` of the bus.
    pub address: String,
    dir: std::path::PathBuf,
}

static BUS: OnceLock<SystemBus> = OnceLock::new();

/// The bus, started at first use (with logind, polkitd and the systemd stand-in on it).
pub fn system_bus() -> &'static SystemBus {
    BUS.get_or_init(|| {
        let dir = crate::tempdir_named("portcullis-bus-").keep();
        let address = format!("unix:path={}", dir.join("system_bus_socket").display());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread_dir = dir.clone();
        let thread_address = address.clone();
        std::thread::Builder::new()
            .name("system-bus".into())
            .spawn(move || run(&thread_dir, &thread_address, ready_tx))
            .unwrap();
        match ready_rx.recv_timeout(Duration::from_secs(60)) {
            Ok(Ok(())) => SystemBus { address, dir },
            Ok(Err(e)) => panic!("the tests' system bus did not start: {e}"),
            Err(e) => panic!("the tests' system bus did not start within 60 s: {e}"),
        }
    })
}

impl SystemBus {
    /// `busctl` on this bus.
    pub fn busctl(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("busctl");
        cmd.arg(format!("--address={}", self.address)).args(args);
        cmd
    }

    /// logind's inhibitors: (what, who, why, mode, uid, pid) each.
    pub fn inhibitors(&self) -> Vec<(String, String, String, String, u64, u64)> {
        let out = self
            .busctl(&[
                "--json=short",
                "call",
                "org.freedesktop.login1",
                "/org/freedesktop/login1",
                "org.freedesktop.login1.Manager",
                "ListInhibitors",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ListInhibitors: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let reply: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        reply["data"][0]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| {
                let s = |n: usize| i[n].as_str().unwrap().to_string();
                (s(0), s(1), s(2), s(3), i[4].as_u64().unwrap(), i[5].as_u64().unwrap())
            })
            .collect()
    }

    /// Asks logind to suspend the machine, as root with `flags` (`SuspendWithFlags`); the
    /// error's text when logind refuses.
    pub fn suspend(&self, flags: u64) -> Result<(), String> {
        let out = self
            .busctl(&[
                "call",
                "org.freedesktop.login1",
                "/org/freedesktop/login1",
                "org.freedesktop.login1.Manager",
                "SuspendWithFlags",
                "t",
                &flags.to_string(),
            ])
            .output()
            .unwrap();
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// Where the daemons' logs are.
    pub fn log(&self, daemon: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{daemon}.log"))).unwrap_or_default()
    }
}

/// The bus's thread: starts the daemons, then serves the systemd stand-in forever.
fn run(dir: &std::path::Path, address: &str, ready: std::sync::mpsc::Sender<Result<(), String>>) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        match start(dir, address).await {
            Ok((children, standin)) => {
                let _ = ready.send(Ok(()));
                let _children = children;
                serve_standin(standin).await;
            }
            Err(e) => {
                let _ = ready.send(Err(e));
            }
        }
    });
}

async fn start(dir: &std::path::Path, address: &str) -> Result<(Vec<Child>, zbus::Connection), String> {
    // The distribution's own system bus policy, on a socket of ours.
    let policy = std::fs::read_to_string("/usr/share/dbus-1/system.conf").map_err(|e| e.to_string())?;
    let config = policy
        .replace(
            "<listen>unix:path=/run/dbus/system_bus_socket</listen>",
            &format!("<listen>{address}</listen>"),
        )
        .replace(
            "<includedir>system.d</includedir>",
            "<includedir>/usr/share/dbus-1/system.d</includedir>",
        )
        .replace("<pidfile>/run/dbus/pid</pidfile>", "")
        .replace("<user>messagebus</user>", "");
    let config_path = dir.join("system.conf");
    std::fs::write(&config_path, config).map_err(|e| e.to_string())?;
    let state = dir.join("power-state");
    std::fs::write(&state, "freeze mem disk\n").map_err(|e| e.to_string())?;
    let log = |name: &str| std::fs::File::create(dir.join(format!("{name}.log"))).map(Stdio::from);
    let spawn = |name: &str, args: &[&str]| -> Result<Child, String> {
        Command::new("setpriv")
            .args(["--pdeathsig", "KILL", "--"])
            .args(args)
            .env("DBUS_SYSTEM_BUS_ADDRESS", address)
            .stdout(Stdio::null())
            .stderr(log(name).map_err(|e| e.to_string())?)
            .spawn()
            .map_err(|e| format!("{name}: {e}"))
    };
    let mut children = vec![spawn(
        "dbus-daemon",
        &[
            "dbus-daemon",
            "--nofork",
            "--config-file",
            &config_path.to_string_lossy(),
        ],
    )?];
    let socket = dir.join("system_bus_socket");
    wait_for(
        || std::os::unix::net::UnixStream::connect(&socket).is_ok(),
        "the bus socket",
    )
    .await?;
    let standin = zbus::connection::Builder::address(address)
        .map_err(|e| e.to_string())?
        .name("org.freedesktop.systemd1")
        .map_err(|e| e.to_string())?
        .build()
        .await
        .map_err(|e| format!("the systemd stand-in: {e}"))?;
    children.push(spawn("polkitd", &["/usr/lib/polkit-1/polkitd", "--no-debug"])?);
    let mount = format!(
        "mount --bind {} /sys/power/state && exec /usr/lib/systemd/systemd-logind",
        state.display()
    );
    children.push(spawn("logind", &["unshare", "--mount", "--", "sh", "-c", &mount])?);
    for name in ["org.freedesktop.login1", "org.freedesktop.PolicyKit1"] {
        let owned = || {
            Command::new("busctl")
                .arg(format!("--address={address}"))
                .args(["status", name])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        wait_for(owned, name).await?;
    }
    Ok((children, standin))
}

async fn wait_for(mut ready: impl FnMut() -> bool, what: &str) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ready() {
        if Instant::now() > deadline {
            return Err(format!("{what} did not come within 30 s"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// The systemd stand-in: `suspend.target` is loaded; starting it is a job done at once.
async fn serve_standin(connection: zbus::Connection) {
    let mut calls = zbus::MessageStream::from(&connection);
    let mut job = 0u32;
    while let Some(Ok(call)) = calls.next().await {
        let header = call.header();
        if header.message_type() != zbus::message::Type::MethodCall {
            continue;
        }
        let member = header.member().map(|m| m.to_string()).unwrap_or_default();
        let _ = match member.as_str() {
            "Get" => connection.reply(&header, &zbus::zvariant::Value::from("loaded")).await,
            "StartUnit" => {
                job += 1;
                let path =
                    zbus::zvariant::ObjectPath::try_from(format!("/org/freedesktop/systemd1/job/{job}")).unwrap();
                let unit: (String, String) = call.body().deserialize().unwrap_or_default();
                let replied = connection.reply(&header, &path).await;
                let _ = connection
                    .emit_signal(
                        None::<&str>,
                        "/org/freedesktop/systemd1",
                        "org.freedesktop.systemd1.Manager",
                        "JobRemoved",
                        &(job, &path, unit.0.as_str(), "done"),
                    )
                    .await;
                replied
            }
            "Subscribe" => connection.reply(&header, &()).await,
            _ => {
                connection
                    .reply_error(
                        &header,
                        "org.freedesktop.DBus.Error.UnknownMethod",
                        &"not in the systemd stand-in",
                    )
                    .await
            }
        };
    }
}
