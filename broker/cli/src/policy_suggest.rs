//! `portcullis policy suggest --from DECISION_LOG`: rules that would allow what the decision log
//! shows refused (or, in audit mode, would-be-refused) — `audit2allow` for this broker. One
//! suggestion per task identity and service, narrowest first: a principal of exactly that uid
//! (and program, when the log names it), a rule for exactly that service by class and name,
//! granting exactly the requests refused. A refusal that an allow rule cannot undo (a forbid
//! rule decided it, or an argument constraint) is said as such, not papered over.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

/// A field of a log line (`Null` when absent).
fn at<'v>(v: &'v Value, key: &str) -> &'v Value {
    v.get(key).unwrap_or(&Value::Null)
}

/// The task a log line names, as a principal can.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Who {
    uid: u64,
    exe: Option<String>,
}

/// What one task was refused on one service.
#[derive(Debug, Default)]
struct Refused {
    methods: std::collections::BTreeSet<String>,
    memory: std::collections::BTreeSet<String>,
    exclusive: bool,
    opened: bool,
    ids: Vec<u64>,
}

/// The suggestions, as policy TOML (with comments), and the notes on refusals no allow rule can
/// undo.
pub(crate) fn suggest(log: &Path, policy: &portcullis_policy::Policy) -> Result<(String, Vec<String>), String> {
    let text = std::fs::read_to_string(log).map_err(|e| format!("{}: {e}", log.display()))?;
    let mut refused: BTreeMap<(Who, String, String), Refused> = BTreeMap::new();
    let mut notes = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let r: Value = serde_json::from_str(line).map_err(|e| format!("{}:{}: {e}", log.display(), n + 1))?;
        let refusal = at(&r, "decision") == "deny" || at(&r, "decision") == "would_deny";
        let by_policy = at(&r, "check").is_null() || at(&r, "check") == "policy";
        if !refusal || at(&r, "event") == "closed_by_reload" {
            continue;
        }
        let id = at(&r, "id").as_u64().unwrap_or_default();
        let rule = at(&r, "rule").as_str().unwrap_or_default();
        if at(&r, "check") == "argument_constraint" {
            notes.push(format!(
                "line {}: an argument constraint of rule {rule:?} refused {}: widen it if that call is meant ({})",
                n + 1,
                at(&r, "request"),
                at(&r, "reason").as_str().unwrap_or_default()
            ));
            continue;
        }
        if !by_policy {
            continue;
        }
        if rule != portcullis_policy::DEFAULT_DENY
            && policy.rule_ids().any(|id| id == rule)
            && at(&r, "mode") != "audit"
        {
            // A rule refused: if it is a forbid, no allow rule changes that.
            notes.push(format!(
                "line {}: rule {rule:?} refused {} on {}: an allow rule cannot undo a forbid; edit that rule if the request is meant",
                n + 1,
                at(&r, "request"),
                at(&r, "service").as_str().unwrap_or("?")
            ));
            continue;
        }
        let (Some(uid), Some(class), Some(service)) = (
            at(&r, "uid").as_u64(),
            at(&r, "class").as_str(),
            at(&r, "service").as_str(),
        ) else {
            notes.push(format!("line {}: no uid, class or service to write a rule for", n + 1));
            continue;
        };
        let who = Who {
            uid,
            exe: at(&r, "exe").as_str().map(str::to_string),
        };
        let entry = refused
            .entry((who, class.to_string(), service.to_string()))
            .or_default();
        entry.ids.push(id);
        let request = at(&r, "request");
        if let Some(method) = at(request, "method").as_str() {
            entry.methods.insert(method.to_string());
        } else if let Some(memory) = at(request, "memory_type").as_str() {
            entry.memory.insert(memory.to_string());
        } else if let Some(open) = at(request, "open").as_str() {
            entry.opened = true;
            entry.exclusive |= open == "exclusive";
        }
    }
    let mut out = String::new();
    for (n, ((who, class, service), r)) in refused.iter().enumerate() {
        let principal = match &who.exe {
            Some(exe) => format!(
                "suggested-{}-uid{}-{}",
                n + 1,
                who.uid,
                Path::new(exe).file_name().and_then(|f| f.to_str()).unwrap_or("exe")
            ),
            None => format!("suggested-{}-uid{}", n + 1, who.uid),
        };
        let ids: Vec<String> = r.ids.iter().map(u64::to_string).collect();
        out.push_str(&format!("# From decision log line id(s) {}.\n", ids.join(", ")));
        out.push_str(&format!("[[principal]]\nname = {principal:?}\nuid = [{}]\n", who.uid));
        if let Some(exe) = &who.exe {
            out.push_str(&format!("exe = [{exe:?}]\n"));
        }
        out.push('\n');
        out.push_str(&format!(
            "[[rule]]\nid = \"{principal}-{}\"\neffect = \"allow\"\nprincipals = [{principal:?}]\nservice = {{ class = {class:?}, name = {service:?} }}\n",
            service
        ));
        let quoted = |set: &std::collections::BTreeSet<String>| {
            set.iter().map(|m| format!("{m:?}")).collect::<Vec<_>>().join(", ")
        };
        if !r.methods.is_empty() {
            out.push_str(&format!("methods = [{}]\n", quoted(&r.methods)));
            let privileges: std::collections::BTreeSet<String> = r
                .methods
                .iter()
                .filter_map(|m| super::policy::method_privilege(class, m).map(str::to_string))
                .collect();
            if !privileges.is_empty() {
                out.push_str(&format!("privileges = [{}]\n", quoted(&privileges)));
            }
        }
        if !r.memory.is_empty() {
            out.push_str(&format!("memory = [{}]\n", quoted(&r.memory)));
        }
        if r.exclusive {
            out.push_str("open = \"exclusive\"\n");
        }
        out.push('\n');
    }
    Ok((out, notes))
}
