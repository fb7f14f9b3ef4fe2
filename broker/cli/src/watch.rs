//! `portcullis watch [SERVICE]...`: print events as they happen.

use clap::Args;
use portcullis_client::pb::{self, event::Kind};
use serde_json::json;

use super::{RunDir, call::resolve_service, json};

#[derive(Debug, Args)]
pub(crate) struct WatchArgs {
    /// Services to watch, by name or id [default: every service this task may see, and
    /// publications of new ones].
    services: Vec<String>,
    /// Also tell when a service matching this dictionary is published or terminated
    /// (IOServiceAddMatchingNotification): `class=BlockDevice`, `name=loop0`, or any text
    /// property (`usb.vendor=0403`); repeat for more keys. The matching services there are
    /// already are printed first, as `present` lines.
    #[arg(long = "match", value_name = "KEY=VALUE")]
    matching: Vec<String>,
    /// Exit after this many events (`present` lines included).
    #[arg(long)]
    count: Option<u64>,
    /// Print one JSON object per line.
    #[arg(long)]
    json: bool,
}

pub(crate) async fn run(args: WatchArgs, run_dir: &RunDir) -> Result<(), String> {
    let client = run_dir.connect().await.map_err(|e| e.to_string())?;
    let session = client.session().await.map_err(|e| e.to_string())?;
    let mut ids = Vec::new();
    for name in &args.services {
        ids.push(resolve_service(&session, name).await.map_err(|e| e.to_string())?.id);
    }
    let mut seen = 0u64;
    if args.matching.is_empty() || !args.services.is_empty() {
        session.subscribe(&ids).await.map_err(|e| e.to_string())?;
        eprintln!(
            "watching {}",
            if args.services.is_empty() {
                "every service".to_string()
            } else {
                args.services.join(", ")
            }
        );
    }
    if !args.matching.is_empty() {
        let present = session
            .watch_matching(matching_of(&args.matching)?)
            .await
            .map_err(|e| e.to_string())?;
        eprintln!("watching for services matching {}", args.matching.join(" "));
        for service in present.iter().take(args.count.map_or(usize::MAX, |n| n as usize)) {
            if args.json {
                println!("{}", json!({ "event": "present", "service": json::service(service) }));
            } else {
                println!("present {} <class {}, id {}>", service.name, service.class, service.id);
            }
            seen += 1;
        }
    }
    while args.count.is_none_or(|n| seen < n) {
        let Some(event) = session.next_event().await else {
            return Err("the broker ended the session".into());
        };
        println!(
            "{}",
            if args.json {
                render_json(&event).to_string()
            } else {
                render(&event)
            }
        );
        seen += 1;
    }
    Ok(())
}

/// `class=…`, `name=…` and text properties as a matching dictionary.
fn matching_of(pairs: &[String]) -> Result<pb::Matching, String> {
    let mut matching = pb::Matching::default();
    for pair in pairs {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| format!("--match {pair:?}: write KEY=VALUE (class=TtyDevice)"))?;
        match key {
            "class" => matching.class = value.to_string(),
            "name" => matching.name = value.to_string(),
            _ => {
                matching.properties.insert(
                    key.to_string(),
                    pb::PropertyValue {
                        kind: Some(pb::property_value::Kind::Text(value.to_string())),
                    },
                );
            }
        }
    }
    Ok(matching)
}

fn render(event: &pb::Event) -> String {
    match &event.kind {
        Some(Kind::Published(p)) => {
            let s = p.service.clone().unwrap_or_default();
            format!("published {} <class {}, id {}>", s.name, s.class, s.id)
        }
        Some(Kind::Terminated(t)) => format!("terminated {} (id {})", t.name, t.service_id),
        Some(Kind::Notification(n)) => format!(
            "notification {} {} value={} ({})",
            n.service_name, n.kind, n.value, n.detail
        ),
        Some(Kind::UserClientClosed(c)) => format!(
            "user-client-closed handle={} {}: {}",
            c.handle,
            json::status_name(c.status),
            c.reason
        ),
        Some(Kind::Lost(l)) => format!("lost {} event(s)", l.count),
        Some(Kind::Goodbye(g)) => format!("goodbye {}: {}", json::status_name(g.status), g.reason),
        Some(Kind::WillSleep(_)) => "will-sleep".into(),
        Some(Kind::HasWoken(_)) => "has-woken".into(),
        None => "unknown event".into(),
    }
}

fn render_json(event: &pb::Event) -> serde_json::Value {
    match &event.kind {
        Some(Kind::Published(p)) => {
            json!({ "event": "published", "service": p.service.as_ref().map(json::service) })
        }
        Some(Kind::Terminated(t)) => {
            json!({ "event": "terminated", "service_id": t.service_id, "name": t.name })
        }
        Some(Kind::Notification(n)) => {
            json!({ "event": "notification", "service_id": n.service_id, "service": n.service_name, "kind": n.kind, "value": n.value, "detail": n.detail })
        }
        Some(Kind::UserClientClosed(c)) => {
            json!({ "event": "user_client_closed", "handle": c.handle, "status": json::status_name(c.status), "reason": c.reason })
        }
        Some(Kind::Lost(l)) => json!({ "event": "lost", "count": l.count }),
        Some(Kind::Goodbye(g)) => {
            json!({ "event": "goodbye", "status": json::status_name(g.status), "reason": g.reason })
        }
        Some(Kind::WillSleep(_)) => json!({ "event": "will_sleep" }),
        Some(Kind::HasWoken(_)) => json!({ "event": "has_woken" }),
        None => json!({ "event": "unknown" }),
    }
}
