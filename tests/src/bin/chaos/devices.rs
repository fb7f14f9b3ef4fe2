//! Devices removed in the middle of calls: a loop device's media pulled while a client reads
//! blocks as fast as it can, a TUN interface deleted while a client waits for a packet. The
//! calls end `NO_DEVICE` (or the user client is closed), the services go, nothing is held.

use std::{collections::BTreeMap, path::Path, process::Command, time::Duration};

use portcullis_client::{ClientError, OpenMode, Session, Status, native::NativeSession, pb};
use portcullis_proto::layout::AbiId;
use portcullis_tests::{Broker, BrokerSetup, LoopDevice};

use crate::{Outcome, Scale, common};

const READ_BLOCKS: u32 = 1;

fn personalities(dir: &Path, tun: &str) -> String {
    format!(
        r#"[[personality]]
id = "org.portcullis.chaos.disks"
version = "1"
driver = "block"
provider_class = "BlockNub"
match = {{ devtype = "disk", "loop.backing_file" = {{ prefix = "{}/" }} }}
probe_score = 1000

[[personality]]
id = "org.portcullis.chaos.tuns"
version = "1"
driver = "net"
provider_class = "NetNub"
match = {{ "net.interface" = "{tun}" }}
probe_score = 1000
"#,
        dir.display()
    )
}

const POLICY: &str = r#"
[[principal]]
name = "all"

[[rule]]
id = "sample"
effect = "allow"
principals = ["all"]
service = { class = "SampleDevice" }
methods = ["*"]
open = "exclusive"

[[rule]]
id = "chaos-devices"
effect = "allow"
principals = ["all"]
service = { properties = { personality = { prefix = "org.portcullis.chaos." } } }
methods = ["*"]
memory = ["dma", "packets"]
open = "exclusive"
"#;

/// The next event about a service of `class` (published) or the service `id` (terminated).
async fn next(watcher: &Session, class: &str, gone: Option<u64>) -> Result<u64, String> {
    let wait = async {
        loop {
            let event = watcher.next_event().await.ok_or("the watcher's session ended")?;
            match event.kind {
                Some(pb::event::Kind::Published(p)) if gone.is_none() => {
                    if let Some(s) = p.service.filter(|s| s.class == class) {
                        return Ok(s.id);
                    }
                }
                Some(pb::event::Kind::Terminated(t)) if Some(t.service_id) == gone => return Ok(t.service_id),
                _ => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), wait)
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "no {} of a {class} within 20 s",
                if gone.is_some() { "termination" } else { "publication" }
            ))
        })
}

fn ended_as_it_should(e: &ClientError) -> bool {
    matches!(e.status(), Some(Status::NoDevice | Status::NotOpen | Status::Aborted))
}

pub(crate) fn run(scale: Scale) -> Result<Outcome, String> {
    let dir = portcullis_tests::tempdir_named("portcullis-chaos-disks-");
    let tun = format!("pcx{}", std::process::id() % 100_000);
    let text = personalities(dir.path(), &tun);
    let broker = Broker::with(BrokerSetup {
        config: Some("drivers = \"drivers.d\"\n[[device]]\nname = \"sample0\"\ndriver = \"sample\"\n"),
        policy: Some(POLICY),
        personalities: Some(&text),
        log_level: Some("warn"),
        ..BrokerSetup::default()
    });
    let baseline = broker.baseline_fds();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut ends: BTreeMap<String, usize> = BTreeMap::new();
    let mut reads_before = 0u64;
    rt.block_on(async {
        let client = broker.client().await;
        let watcher = client.session().await.map_err(|e| e.to_string())?;
        for class in ["BlockDevice", "NetDevice"] {
            watcher
                .watch_matching(pb::Matching {
                    class: class.into(),
                    ..pb::Matching::default()
                })
                .await
                .map_err(|e| e.to_string())?;
        }
        for _ in 0..scale.device_rounds {
            // The loop device: its media pulled under a reader.
            let device = LoopDevice::attach_in(Some(dir.path()), &vec![0x3c; 4 << 20], false);
            let id = next(&watcher, "BlockDevice", None).await?;
            let mut s = NativeSession::connect(broker.run_dir(), AbiId::native())
                .await
                .map_err(|e| e.to_string())?;
            let h = s.open(id, true).await.map_err(|e| format!("open the disk: {e}"))?;
            let _dma = s.map_memory(h, 0).await.map_err(|e| e.to_string())?;
            let reader = tokio::spawn(async move {
                let mut reads = 0u64;
                loop {
                    match s.call(h, READ_BLOCKS, &[0, 8, 0], &[], 0).await {
                        Ok(_) => reads += 1,
                        Err(e) => return (reads, e),
                    }
                }
            });
            // Some reads first, so that the media goes from under calls in flight.
            tokio::time::sleep(Duration::from_millis(5)).await;
            device.pull_media();
            let (reads, e) = tokio::time::timeout(Duration::from_secs(20), reader)
                .await
                .map_err(|_| "a read went on 20 s after the media went".to_string())?
                .map_err(|e| e.to_string())?;
            if !ended_as_it_should(&e) {
                return Err(format!("a read of a pulled disk ended with {e}"));
            }
            reads_before += reads;
            *ends
                .entry(format!(
                    "read_blocks: {}",
                    e.status().map_or("?".into(), |s| s.name().to_string())
                ))
                .or_default() += 1;
            next(&watcher, "BlockDevice", Some(id)).await?;
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            while device.attached() {
                if std::time::Instant::now() > deadline {
                    return Err(format!(
                        "{} still attached: the broker did not let go",
                        device.path.display()
                    ));
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            // The TUN interface: deleted under a client waiting for a packet.
            let out = Command::new("ip")
                .args(["tuntap", "add", "dev", &tun, "mode", "tun"])
                .output()
                .map_err(|e| e.to_string())?;
            if !out.status.success() {
                return Err(format!("ip tuntap add: {}", String::from_utf8_lossy(&out.stderr)));
            }
            let id = next(&watcher, "NetDevice", None).await?;
            let session = client.session().await.map_err(|e| e.to_string())?;
            let net = session
                .open(id, OpenMode::Shared)
                .await
                .map_err(|e| format!("open the TUN: {e}"))?;
            let waiting = tokio::spawn(async move {
                let r = session.call_named(&net, "recv_packet", &[600_000], &[]).await;
                drop(session);
                r
            });
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            while broker.stats()["driver_waiting"] != 1 {
                if std::time::Instant::now() > deadline {
                    return Err("the packet wait never reached the driver".into());
                }
                tokio::task::yield_now().await;
            }
            let _ = Command::new("ip").args(["link", "del", &tun]).output();
            let result = tokio::time::timeout(Duration::from_secs(20), waiting)
                .await
                .map_err(|_| "a packet wait went on 20 s after its interface went".to_string())?
                .map_err(|e| e.to_string())?;
            match result {
                Err(e) if ended_as_it_should(&e) => {
                    *ends
                        .entry(format!(
                            "recv_packet: {}",
                            e.status().map_or("?".into(), |s| s.name().to_string())
                        ))
                        .or_default() += 1;
                }
                other => return Err(format!("a packet wait on a deleted interface ended with {other:?}")),
            }
            next(&watcher, "NetDevice", Some(id)).await?;
        }
        Ok::<(), String>(())
    })?;
    drop(rt);
    let _ = Command::new("ip").args(["link", "del", &tun]).output();
    common::no_leaks(&broker, baseline)?;
    common::served(&broker)?;
    Ok(Outcome {
        summary: format!(
            "{} loop devices pulled under readers ({reads_before} reads before), {} TUN interfaces deleted under waiting calls; ended {ends:?}; nothing held",
            scale.device_rounds, scale.device_rounds
        ),
        figures: serde_json::json!({ "rounds": scale.device_rounds, "reads_before_removal": reads_before, "ended": ends }),
    })
}
