//! The broker killed with `SIGKILL` while clients hold a tty, a disk exclusively with memory
//! mapped, and a ring — then started again on the same run dir: its clients are told (an error,
//! never a hang), nothing is left half-held in the kernel (the disk is free, the TUN interface
//! went with the broker), the stale sockets are replaced, clients reconnect, and a clean stop
//! at the end gives the tty its own settings back — those from before the first broker, which
//! a killed broker could not restore itself.

use std::{
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    time::Duration,
};

use portcullis_client::{
    Client, OpenMode,
    native::NativeSession,
    ring::{RingClient, RingOptions},
};
use portcullis_proto::layout::AbiId;
use portcullis_tests::{Broker, BrokerSetup, LoopDevice};

use crate::{Outcome, Scale};

const POLICY: &str = r#"
[[principal]]
name = "all"

[[rule]]
id = "everything"
effect = "allow"
principals = ["all"]
service = {}
methods = ["*"]
memory = ["dma"]
open = "exclusive"
"#;

fn pty() -> (OwnedFd, PathBuf) {
    use rustix::pty::{OpenptFlags, grantpt, openpt, ptsname, unlockpt};
    let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC).unwrap();
    grantpt(&master).unwrap();
    unlockpt(&master).unwrap();
    let name = ptsname(&master, Vec::new()).unwrap();
    (master, PathBuf::from(name.to_str().unwrap()))
}

/// What a client holds across the kill.
struct Held {
    _client: Client,
    session: portcullis_client::Session,
    tty: portcullis_client::UserClient,
    native: NativeSession,
    disk: u64,
    ring: RingClient,
    sample: u64,
}

async fn hold(broker: &Broker) -> Result<Held, String> {
    let client = broker.client().await;
    let session = client.session().await.map_err(|e| e.to_string())?;
    let tty_id = session
        .find_one(portcullis_client::matching::by_name("tty0"))
        .await
        .map_err(|e| e.to_string())?
        .id;
    let tty = session
        .open(tty_id, OpenMode::Shared)
        .await
        .map_err(|e| format!("open tty0: {e}"))?;
    session
        .call_named(&tty, "get_line", &[], &[])
        .await
        .map_err(|e| e.to_string())?;
    let mut native = NativeSession::connect(broker.run_dir(), AbiId::native())
        .await
        .map_err(|e| e.to_string())?;
    let disk_id = native
        .find("disk0")
        .await
        .map_err(|e| e.to_string())?
        .first()
        .map(|s| s.id)
        .ok_or("no disk0")?;
    let disk = native
        .open(disk_id, true)
        .await
        .map_err(|e| format!("open disk0: {e}"))?;
    native.map_memory(disk, 0).await.map_err(|e| e.to_string())?;
    native
        .call(disk, 1, &[0, 8, 0], &[], 0)
        .await
        .map_err(|e| format!("read disk0: {e}"))?;
    let run_dir = broker.run_dir();
    let (ring, sample) = tokio::task::spawn_blocking(move || {
        let mut ring = RingClient::connect(&run_dir, RingOptions::default()).map_err(|e| e.to_string())?;
        let id = ring
            .find("sample0")
            .map_err(|e| e.to_string())?
            .first()
            .map(|s| s.id)
            .ok_or("no sample0")?;
        let h = ring.open(id, false).map_err(|e| e.to_string())?;
        ring.call(h, 0, &[1, 1], &[], 0).map_err(|e| e.to_string())?;
        Ok::<_, String>((ring, h))
    })
    .await
    .map_err(|e| e.to_string())??;
    Ok(Held {
        _client: client,
        session,
        tty,
        native,
        disk,
        ring,
        sample,
    })
}

/// Each client's next request after the kill: an error, within 10 s. Returns what they said.
async fn told(held: Held) -> Result<Vec<String>, String> {
    let Held {
        session,
        tty,
        mut native,
        disk,
        mut ring,
        sample,
        ..
    } = held;
    let within = Duration::from_secs(10);
    let grpc = tokio::time::timeout(within, session.call_named(&tty, "get_line", &[], &[]))
        .await
        .map_err(|_| "a gRPC client was not told within 10 s".to_string())?;
    let native = tokio::time::timeout(within, native.call(disk, 1, &[0, 8, 0], &[], 0))
        .await
        .map_err(|_| "a native client was not told within 10 s".to_string())?;
    let ring = tokio::time::timeout(
        within,
        tokio::task::spawn_blocking(move || ring.call(sample, 0, &[2, 2], &[], 0)),
    )
    .await
    .map_err(|_| "a ring client was not told within 10 s".to_string())?
    .map_err(|e| e.to_string())?;
    let mut said = Vec::new();
    for (what, result) in [("gRPC", grpc.err()), ("native", native.err()), ("ring", ring.err())] {
        match result {
            Some(e) => said.push(format!("{what}: {e}")),
            None => return Err(format!("a {what} client's request was answered by a dead broker")),
        }
    }
    Ok(said)
}

/// Whether anyone holds the block device (an exclusive open of it fails while one does).
fn disk_free(path: &Path) -> bool {
    rustix::fs::open(
        path,
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::EXCL,
        rustix::fs::Mode::empty(),
    )
    .is_ok()
}

pub(crate) fn run(scale: Scale) -> Result<Outcome, String> {
    let (master, follower) = pty();
    let mut own = rustix::termios::tcgetattr(&master).map_err(|e| e.to_string())?;
    own.set_speed(9600).map_err(|e| e.to_string())?;
    rustix::termios::tcsetattr(&master, rustix::termios::OptionalActions::Now, &own).map_err(|e| e.to_string())?;
    let own = rustix::termios::tcgetattr(&master).map_err(|e| e.to_string())?;
    let disk = LoopDevice::attach(&vec![0u8; 1 << 20], false);
    let tun = format!("pcr{}", std::process::id() % 100_000);
    let config = format!(
        "[[device]]\nname = \"sample0\"\ndriver = \"sample\"\n\n[[device]]\nname = \"tty0\"\ndriver = \"tty\"\npath = \"{}\"\n\n[[device]]\nname = \"disk0\"\ndriver = \"block\"\npath = \"{}\"\n\n[[device]]\nname = \"net0\"\ndriver = \"net\"\ninterface = \"{tun}\"\n",
        follower.display(),
        disk.path.display()
    );
    let mut broker = Broker::with(BrokerSetup {
        config: Some(&config),
        policy: Some(POLICY),
        log_level: Some("warn"),
        ..BrokerSetup::default()
    });
    let tun_exists = || Path::new("/sys/class/net").join(&tun).exists();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut told_first = Vec::new();
    for round in 0..scale.restarts {
        let held = rt.block_on(hold(&broker)).map_err(|e| format!("round {round}: {e}"))?;
        if !tun_exists() {
            return Err(format!("round {round}: the broker's TUN interface {tun} is missing"));
        }
        broker.kill();
        let said = rt.block_on(told(held)).map_err(|e| format!("round {round}: {e}"))?;
        if round == 0 {
            told_first = said;
        }
        if !disk_free(&disk.path) {
            return Err(format!(
                "round {round}: {} is still held after the broker was killed",
                disk.path.display()
            ));
        }
        if tun_exists() {
            return Err(format!("round {round}: the TUN interface outlived the broker"));
        }
        // Started again on the same run dir: its stale sockets are replaced.
        broker.restart();
    }
    // Clients come back, and the device is served as before.
    let held = rt
        .block_on(hold(&broker))
        .map_err(|e| format!("after the restarts: {e}"))?;
    drop(held);
    drop(rt);
    broker.signal(rustix::process::Signal::TERM);
    let status = broker.wait_exit(Duration::from_secs(30));
    if !status.success() {
        return Err(format!("the broker's clean stop ended {status}"));
    }
    let after = rustix::termios::tcgetattr(&master).map_err(|e| e.to_string())?;
    if after.output_speed() != own.output_speed()
        || after.local_modes != own.local_modes
        || after.input_modes != own.input_modes
    {
        return Err(format!(
            "the tty did not get its own settings back: speed {} (was {}), local modes {:?} (were {:?})",
            after.output_speed(),
            own.output_speed(),
            after.local_modes,
            own.local_modes
        ));
    }
    if !disk_free(&disk.path) {
        return Err("the disk is held after the clean stop".into());
    }
    Ok(Outcome {
        summary: format!(
            "{} SIGKILLs with a tty, an exclusive disk with memory mapped and a ring held: clients told ({}), disk free, TUN gone, restarted on the same run dir, clients back; the tty's own settings restored at the end",
            scale.restarts,
            told_first.join("; ")
        ),
        figures: serde_json::json!({ "restarts": scale.restarts, "clients_told": told_first }),
    })
}
