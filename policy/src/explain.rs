//! `explain`: a decision, the rule that made it, and for every rule why it did or did not take
//! part — what a security engineer reads when a request was refused (polkit #697, audit2why).

use std::fmt;

use crate::{
    Decision, Policy, Request, ServiceView, Task,
    model::{Effect, OpenPermission, Principal, Rule, ServiceMatch},
};

/// How one rule related to the request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleTrace {
    /// Rule id.
    pub id: String,
    /// `allow` or `forbid`.
    pub effect: Effect,
    /// The principal that matched, or why none did.
    pub principal: Result<String, String>,
    /// Why the service did not match, if it did not.
    pub service: Result<(), String>,
    /// What the rule says about this request, when it applies: `None` when it says nothing.
    pub says: Option<String>,
}

/// A decision with its reasons.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Explanation {
    /// The decision (as the reference evaluator makes it).
    pub decision: Decision,
    /// Every rule, in file order.
    pub rules: Vec<RuleTrace>,
}

impl Principal {
    /// Why the task does not match, or `None` when it does.
    fn mismatch(&self, task: &Task<'_>) -> Option<String> {
        match (self.remote, &task.remote) {
            (true, None) => return Some("names a TLS certificate; the task is local".into()),
            (false, Some(_)) => return Some("a principal of local tasks; the task is a TLS client".into()),
            (true, Some(r)) => {
                let some_of = |set: &[String], have: &[String]| set.is_empty() || set.iter().any(|s| have.contains(s));
                if !some_of(&self.tls_san_uri, r.san_uri) {
                    return Some(format!(
                        "certificate SAN URIs {:?} include none of {:?}",
                        r.san_uri, self.tls_san_uri
                    ));
                }
                if !some_of(&self.tls_san_dns, r.san_dns) {
                    return Some(format!(
                        "certificate SAN DNS names {:?} include none of {:?}",
                        r.san_dns, self.tls_san_dns
                    ));
                }
                if !self.tls_subject_cn.is_empty()
                    && !r.subject_cn.is_some_and(|c| self.tls_subject_cn.iter().any(|x| x == c))
                {
                    return Some(format!(
                        "certificate CN {} not in {:?}",
                        r.subject_cn.unwrap_or("(none)"),
                        self.tls_subject_cn
                    ));
                }
                if let Some(not) = &self.not
                    && not.attrs_match(task)
                {
                    return Some("excluded by its `not` block".into());
                }
                return None;
            }
            (false, None) => {}
        }
        if !self.uid.is_empty() && !self.uid.contains(&task.uid) {
            return Some(format!("uid {} not in {:?}", task.uid, self.uid));
        }
        if !self.gid.is_empty() && !self.gid.contains(&task.gid) {
            return Some(format!("gid {} not in {:?}", task.gid, self.gid));
        }
        if !self.groups.is_empty() && !self.groups.iter().any(|g| task.groups.contains(g)) {
            return Some(format!("in none of the groups {:?}", self.groups));
        }
        if !self.exe.is_empty() && !task.exe.is_some_and(|e| self.exe.iter().any(|x| x == e)) {
            return Some(format!("exe {} not in {:?}", task.exe.unwrap_or("(unknown)"), self.exe));
        }
        let unknown = "(unknown)";
        if !self.exe_sha256.is_empty() && !task.exe_sha256.is_some_and(|h| self.exe_sha256.iter().any(|x| x == h)) {
            return Some(format!(
                "exe sha256 {} not in {:?}",
                task.exe_sha256.unwrap_or(unknown),
                self.exe_sha256
            ));
        }
        if !self.cgroup.is_empty() {
            match task.cgroup {
                None => return Some("cgroup unknown".into()),
                Some(c) if !self.cgroup.iter().any(|p| c == p || c.starts_with(&format!("{p}/"))) => {
                    return Some(format!("cgroup {c} is not within {:?}", self.cgroup));
                }
                Some(_) => {}
            }
        }
        if !self.lsm_label.is_empty() && !task.lsm_label.is_some_and(|l| self.lsm_label.iter().any(|x| x == l)) {
            return Some(format!(
                "lsm label {} not in {:?}",
                task.lsm_label.unwrap_or(unknown),
                self.lsm_label
            ));
        }
        if let Some(not) = &self.not
            && not.attrs_match(task)
        {
            return Some("excluded by its `not` block".into());
        }
        if !self.abi.is_empty() && !self.abi.contains(&task.abi) {
            return Some(format!(
                "abi {} not in {:?}",
                task.abi,
                self.abi.iter().map(ToString::to_string).collect::<Vec<_>>()
            ));
        }
        None
    }
}

impl ServiceMatch {
    fn mismatch(&self, service: &ServiceView<'_>) -> Option<String> {
        if let Some(c) = self.class.as_deref().filter(|c| *c != service.class) {
            return Some(format!("class {} is not {c}", service.class));
        }
        if let Some(n) = self.name.as_deref().filter(|n| *n != service.name) {
            return Some(format!("name {} is not {n}", service.name));
        }
        self.properties
            .iter()
            .find(|(k, m)| !service.properties.get(*k).is_some_and(|have| m.matches(have)))
            .map(|(k, m)| format!("property {k} is not {m}"))
    }
}

impl Rule {
    fn says(&self, request: Request<'_>) -> Option<String> {
        let verb = if self.effect == Effect::Allow {
            "allows"
        } else {
            "forbids"
        };
        if self.forbids_service() {
            return Some("forbids the whole service".into());
        }
        let mut said = Vec::new();
        match request {
            Request::Open { exclusive } => {
                if self.effect == Effect::Allow {
                    said.push("admits the task".to_string());
                }
                if exclusive && self.open == Some(OpenPermission::Exclusive) {
                    said.push(format!("{verb} exclusive opens"));
                }
            }
            Request::Method { name, privilege } => {
                if self.effect == Effect::Allow {
                    said.push("admits the task".to_string());
                }
                if self.methods.contains(name) {
                    said.push(format!("{verb} method {name}"));
                }
                if let Some(p) = privilege.filter(|p| self.privileges.iter().any(|q| q == p)) {
                    said.push(format!("{verb} privilege {p}"));
                }
            }
            Request::Memory { name } => {
                if self.effect == Effect::Allow {
                    said.push("admits the task".to_string());
                }
                if self.memory.iter().any(|m| m == name) {
                    said.push(format!("{verb} memory type {name}"));
                }
            }
        }
        (!said.is_empty()).then(|| said.join(", "))
    }
}

impl Policy {
    /// Explains the decision on one request.
    pub fn explain(&self, task: &Task<'_>, service: &ServiceView<'_>, request: Request<'_>) -> Explanation {
        let rules = self
            .rules
            .iter()
            .map(|rule| {
                let principal = rule
                    .principals
                    .iter()
                    .filter_map(|&i| self.principals.get(i))
                    .find(|p| p.mismatch(task).is_none())
                    .map(|p| p.name.clone())
                    .ok_or_else(|| {
                        rule.principals
                            .iter()
                            .filter_map(|&i| self.principals.get(i))
                            .map(|p| format!("{}: {}", p.name, p.mismatch(task).unwrap_or_default()))
                            .collect::<Vec<_>>()
                            .join("; ")
                    });
                let service_match = rule.service.mismatch(service).map_or(Ok(()), Err);
                let says = (principal.is_ok() && service_match.is_ok())
                    .then(|| rule.says(request))
                    .flatten();
                RuleTrace {
                    id: rule.id.clone(),
                    effect: rule.effect,
                    principal,
                    service: service_match,
                    says,
                }
            })
            .collect();
        Explanation {
            decision: self.evaluate(task, service, request),
            rules,
        }
    }
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.decision.allowed, self.decision.audit) {
            (true, _) => writeln!(f, "decision: ALLOW (rule {:?})", self.decision.rule)?,
            (false, false) => writeln!(f, "decision: DENY (rule {:?})", self.decision.rule)?,
            (false, true) => writeln!(
                f,
                "decision: ALLOW in audit mode: would DENY (rule {:?})",
                self.decision.rule
            )?,
        }
        writeln!(
            f,
            "rules considered, by id (the order every choice among rules follows):"
        )?;
        for r in &self.rules {
            let effect = if r.effect == Effect::Allow { "allow " } else { "forbid" };
            let marker = if r.id == self.decision.rule { "  <- decided" } else { "" };
            let detail = match (&r.principal, &r.service, &r.says) {
                (Err(why), _, _) => format!("principal does not match ({why})"),
                (Ok(_), Err(why), _) => format!("service does not match ({why})"),
                (Ok(p), Ok(()), Some(says)) => format!("applies (principal {p}): {says}"),
                (Ok(p), Ok(()), None) => format!("applies (principal {p}) but says nothing about this request"),
            };
            writeln!(f, "  {effect} {:<24} {detail}{marker}", r.id)?;
        }
        if self.decision.rule == crate::DEFAULT_DENY {
            writeln!(f, "  (no rule allowed the request: default deny)")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use portcullis_proto::{layout::AbiId, property::Properties};

    use super::*;
    use crate::Source;

    #[test]
    fn explain_names_the_decider_and_every_rule() {
        let text = r#"
[[principal]]
name = "dialout"
groups = ["dialout"]

[[principal]]
name = "root"
uid = [0]

[[rule]]
id = "serial"
effect = "allow"
principals = ["dialout"]
service = { class = "TtyDevice" }
methods = ["write"]

[[rule]]
id = "no-write"
effect = "forbid"
principals = ["dialout"]
methods = ["write"]

[[rule]]
id = "admin"
effect = "allow"
principals = ["root"]
methods = ["*"]
"#;
        let p = Policy::parse(&[Source { origin: "p", text }]).unwrap();
        let groups = vec!["dialout".to_string()];
        let task = Task::new(1000, 1000, &groups, AbiId::X86_64);
        let props = Properties::new();
        let service = ServiceView {
            name: "tty0",
            class: "TtyDevice",
            properties: &props,
        };
        let e = p.explain(
            &task,
            &service,
            Request::Method {
                name: "write",
                privilege: None,
            },
        );
        assert_eq!(
            e.decision,
            Decision {
                allowed: false,
                rule: "no-write".into(),
                audit: false
            }
        );
        // By id, whatever the file's order.
        assert_eq!(e.rules[0].principal, Err("root: uid 1000 not in [0]".to_string()));
        assert_eq!(e.rules[1].says.as_deref(), Some("forbids method write"));
        assert_eq!(e.rules[2].says.as_deref(), Some("admits the task, allows method write"));
        let text = e.to_string();
        assert!(text.starts_with("decision: DENY (rule \"no-write\")"), "{text}");
        assert!(text.contains("no-write") && text.contains("<- decided"), "{text}");
    }
}
