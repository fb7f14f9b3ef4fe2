//! `portcullis ls`: the registry as this task may see it; for an administrator, also every nub
//! the kernel's bus published, with how driver matching went for it (the candidates, their
//! scores, each probe's outcome and the winner).

use std::collections::BTreeMap;

use clap::Args;
use portcullis_client::{matching, pb};

use super::{RunDir, json};

#[derive(Debug, Args)]
pub(crate) struct LsArgs {
    /// Print JSON (an array of services) instead of a tree.
    #[arg(long)]
    json: bool,
}

pub(crate) async fn run(args: LsArgs, run_dir: &RunDir) -> Result<(), String> {
    let client = run_dir.connect().await.map_err(|e| e.to_string())?;
    let mut services = client.list_services(matching::all()).await.map_err(|e| e.to_string())?;
    // Nubs are shown to administrators; anyone else sees what the policy lets them see.
    if let Ok(nubs) = client.list_nubs().await {
        let seen: std::collections::BTreeSet<u64> = services.iter().map(|s| s.id).collect();
        services.extend(nubs.into_iter().filter(|n| !seen.contains(&n.id)));
        services.sort_by_key(|s| s.id);
    }
    if args.json {
        let all: Vec<_> = services.iter().map(json::service).collect();
        println!("{}", serde_json::to_string_pretty(&all).map_err(|e| e.to_string())?);
    } else {
        print!("{}", tree(&services));
    }
    Ok(())
}

/// An ioreg-style tree. A service whose parent is not visible is shown at the top level.
fn tree(services: &[pb::ServiceInfo]) -> String {
    let by_id: BTreeMap<u64, &pb::ServiceInfo> = services.iter().map(|s| (s.id, s)).collect();
    let mut out = String::new();
    for s in services.iter().filter(|s| !by_id.contains_key(&s.parent)) {
        node(&mut out, s, &by_id, "");
    }
    out
}

fn node(out: &mut String, s: &pb::ServiceInfo, by_id: &BTreeMap<u64, &pb::ServiceInfo>, indent: &str) {
    out.push_str(&format!("{indent}+-o {}  <class {}, id {}>\n", s.name, s.class, s.id));
    let children: Vec<&pb::ServiceInfo> = s.children.iter().filter_map(|c| by_id.get(c).copied()).collect();
    let bar = if children.is_empty() { "  " } else { "| " };
    let detail = format!("{indent}{bar}    ");
    for (k, v) in &s.properties {
        out.push_str(&format!("{detail}\"{k}\" = {}\n", json::property(v)));
    }
    for c in &s.candidates {
        let result = match c.outcome.as_str() {
            "started" => format!("started: service {}", c.service_id),
            "outranked" => "outranked".to_string(),
            stage => format!("{stage} failed: {}", c.reason),
        };
        out.push_str(&format!(
            "{detail}candidate {} ({}, category {}, score {}): {result}\n",
            c.personality, c.driver, c.category, c.probe_score
        ));
    }
    if !s.methods.is_empty() {
        let methods: Vec<String> = s
            .methods
            .iter()
            .map(|m| {
                let mut notes = vec![m.selector.to_string()];
                if m.is_async {
                    notes.push("async".into());
                }
                if !m.privilege.is_empty() {
                    notes.push(format!("needs {}", m.privilege));
                }
                format!("{}({})", m.name, notes.join(", "))
            })
            .collect();
        out.push_str(&format!("{detail}methods: {}\n", methods.join(" ")));
    }
    for (i, child) in children.iter().enumerate() {
        let last = i + 1 == children.len();
        node(
            out,
            child,
            by_id,
            &format!("{indent}{}", if last { "  " } else { "| " }),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(id: u64, name: &str, parent: u64, children: Vec<u64>) -> pb::ServiceInfo {
        pb::ServiceInfo {
            id,
            name: name.into(),
            class: "C".into(),
            parent,
            children,
            ..Default::default()
        }
    }

    #[test]
    fn tree_nests_children_under_parents() {
        let t = tree(&[
            svc(1, "Root", 0, vec![2]),
            svc(2, "bus", 1, vec![3]),
            svc(3, "dev", 2, vec![]),
        ]);
        assert_eq!(
            t,
            "+-o Root  <class C, id 1>\n  +-o bus  <class C, id 2>\n    +-o dev  <class C, id 3>\n"
        );
    }

    #[test]
    fn tree_orphan_is_top_level() {
        let t = tree(&[svc(3, "dev", 2, vec![])]);
        assert!(t.starts_with("+-o dev"), "{t}");
    }
}
