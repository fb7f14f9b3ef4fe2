//! Admission: (task, service) → a [`Grant`] holding every per-method decision, computed once so
//! that a call check is one index into a table.

use std::collections::BTreeSet;

use portcullis_proto::{layout::AbiId, property::Properties};

use crate::{
    DEFAULT_DENY,
    args::{Compiled, ParamRef},
    index::PrincipalSet,
    model::{Effect, OpenPermission, Policy, Principal, Rate, Rule, ServiceMatch},
};

/// The kernel's view of a client task, as the broker collected it (never what the client says).
#[derive(Clone, Copy, Debug)]
pub struct Task<'a> {
    /// Effective uid (`SO_PEERCRED`).
    pub uid: u32,
    /// Effective gid.
    pub gid: u32,
    /// Names of the primary and supplementary groups.
    pub groups: &'a [String],
    /// Executable path, read through the pidfd.
    pub exe: Option<&'a str>,
    /// The struct-layout ABI the client declared (the native one for gRPC).
    pub abi: AbiId,
    /// SHA-256 of the executable, lowercase hex, read through the pidfd.
    pub exe_sha256: Option<&'a str>,
    /// The cgroup v2 path.
    pub cgroup: Option<&'a str>,
    /// The LSM label.
    pub lsm_label: Option<&'a str>,
    /// For a client that connected over TCP: what its TLS client certificate says. Such a task
    /// has no uid, gid, groups or process attributes, and matches only principals that name
    /// certificate attributes; a local task never matches those.
    pub remote: Option<Remote<'a>>,
}

/// The identity in a verified TLS client certificate.
#[derive(Clone, Copy, Debug)]
pub struct Remote<'a> {
    /// Subject alternative names of type URI (`spiffe://…`).
    pub san_uri: &'a [String],
    /// Subject alternative names of type DNS.
    pub san_dns: &'a [String],
    /// The subject's common name.
    pub subject_cn: Option<&'a str>,
}

impl<'a> Task<'a> {
    /// A task known by uid, gid, groups and declared ABI only (tools and tests); the
    /// attributes read from `/proc` are unknown, so principals that need them never match.
    pub fn new(uid: u32, gid: u32, groups: &'a [String], abi: AbiId) -> Task<'a> {
        Task {
            uid,
            gid,
            groups,
            exe: None,
            abi,
            exe_sha256: None,
            cgroup: None,
            lsm_label: None,
            remote: None,
        }
    }
}

/// The service being asked for.
#[derive(Clone, Copy, Debug)]
pub struct ServiceView<'a> {
    /// Registry name (`sample0`).
    pub name: &'a str,
    /// Class (`SampleDevice`).
    pub class: &'a str,
    /// Registry properties.
    pub properties: &'a Properties,
}

/// One row of the service's method table, as policy sees it.
#[derive(Clone, Copy, Debug)]
pub struct MethodRef<'a> {
    /// Method name.
    pub name: &'a str,
    /// Privilege the method requires, if any.
    pub privilege: Option<&'a str>,
    /// Its parameters, by name, for argument constraints.
    pub params: &'a [ParamRef<'a>],
}

/// The rule behind a decision: a rule id, or [`DEFAULT_DENY`].
pub type RuleRef = String;

/// An allow or deny with the rule that decided it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// Whether the request is allowed.
    pub allowed: bool,
    /// The deciding rule id, or [`DEFAULT_DENY`].
    pub rule: RuleRef,
    /// A refusal in audit mode: the request goes through, logged as "would deny".
    pub audit: bool,
}

/// A refusal: which rule decided, and why in words.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Denial {
    /// The deciding rule id, or [`DEFAULT_DENY`].
    pub rule: RuleRef,
    /// A sentence for logs and clients.
    pub reason: String,
    /// In audit mode: the request goes through, and the refusal is logged as "would deny".
    pub audit: bool,
}

/// One allow rule granting a method, with its argument constraints for that method.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Alternative {
    rule: RuleRef,
    checks: Vec<Compiled>,
}

/// The decision for one method of the grant's service.
pub type MethodDecision = Result<RuleRef, Denial>;

/// The outcome of admission: either a grant or a denial naming its rule.
pub type Admission = Result<Grant, Denial>;

/// What one user client may do with its service, compiled at admission.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    admitted_by: RuleRef,
    /// Refusals of the admission itself that audit mode let through.
    audited: Vec<Denial>,
    methods: Vec<MethodDecision>,
    /// Per method, the allow rules that grant it with their argument constraints, by rule id,
    /// up to the first that has none (which admits every call). Empty: no constraint applies.
    constraints: Vec<Vec<Alternative>>,
    /// The tightest rate limit among the applicable allow rules, and the rule that sets it.
    rate: Option<(Rate, RuleRef)>,
    privileges: BTreeSet<String>,
    memory: Vec<MethodDecision>,
}

impl Grant {
    /// The allow rule that admitted the task ([`DEFAULT_DENY`] when audit mode let it in).
    pub fn admitted_by(&self) -> &str {
        &self.admitted_by
    }

    /// Refusals of the admission that audit mode let through, to log as "would deny".
    pub fn audited(&self) -> &[Denial] {
        &self.audited
    }

    /// The decision for the method at `index` of the method table given at admission. An index
    /// outside the table is a default denial.
    pub fn check(&self, index: usize) -> Result<&str, Denial> {
        decided(&self.methods, index, "no such method")
    }

    /// Checks a call's arguments (scalars, and the struct input in the broker's layout): allow
    /// rules are a union, so the call passes when **any** allow rule that grants the method
    /// admits its arguments, and is named by the first of those by rule id (the method's rule,
    /// when no constraint applies). A refusal names the first refusing rule and says why each
    /// refused; it is audited (let through, logged as "would deny") when a refusing rule is in
    /// audit mode — that rule would have allowed it.
    pub fn check_args(&self, index: usize, scalars: &[u64], struct_in: &[u8]) -> Result<&str, Denial> {
        let rule = match self.methods.get(index) {
            Some(Ok(rule)) => rule.as_str(),
            // The method's own refusal decides (check); no argument constraint applies.
            Some(Err(denial)) => return Ok(denial.rule.as_str()),
            None => return Ok(DEFAULT_DENY),
        };
        let alternatives = match self.constraints.get(index) {
            Some(a) if !a.is_empty() => a,
            _ => return Ok(rule),
        };
        let mut refusals: Vec<(&str, String, bool)> = Vec::new();
        for alt in alternatives {
            let refused = alt
                .checks
                .iter()
                .find_map(|c| c.check(scalars, struct_in).err().map(|why| (why, c.audit)));
            match refused {
                None => return Ok(&alt.rule),
                Some((why, audit)) => refusals.push((&alt.rule, why, audit)),
            }
        }
        // Named by an audited refusal if there is one (that rule lets the call through), else
        // by the first refusal.
        let deciding = refusals
            .iter()
            .find(|(_, _, audit)| *audit)
            .or(refusals.first())
            .map_or((DEFAULT_DENY, false), |(rule, _, audit)| (*rule, *audit));
        let reason = refusals
            .iter()
            .map(|(rule, why, _)| format!("{why} (rule {rule:?})"))
            .collect::<Vec<_>>()
            .join("; ");
        Err(Denial {
            rule: deciding.0.to_string(),
            reason: if refusals.len() > 1 {
                format!("no rule granting the method admits these arguments: {reason}")
            } else {
                reason
            },
            audit: deciding.1,
        })
    }

    /// The rate limit on this user client's calls and the rule that sets it.
    pub fn rate_limit(&self) -> Option<(Rate, &str)> {
        self.rate.as_ref().map(|(r, rule)| (*r, rule.as_str()))
    }

    /// The decision for mapping the memory type at `index` of the list given at admission.
    pub fn check_memory(&self, index: usize) -> Result<&str, Denial> {
        decided(&self.memory, index, "no such memory type")
    }

    /// `clientHasPrivilege`.
    pub fn has_privilege(&self, privilege: &str) -> bool {
        self.privileges.contains(privilege)
    }

    /// Granted privileges, sorted.
    pub fn privileges(&self) -> impl Iterator<Item = &str> {
        self.privileges.iter().map(String::as_str)
    }
}

/// The decision at `index`; an index outside the list is a default denial.
fn decided<'a>(decisions: &'a [MethodDecision], index: usize, missing: &str) -> Result<&'a str, Denial> {
    match decisions.get(index) {
        Some(Ok(rule)) => Ok(rule),
        Some(Err(denial)) => Err(denial.clone()),
        None => Err(Denial {
            rule: DEFAULT_DENY.into(),
            reason: missing.into(),
            audit: false,
        }),
    }
}

impl Principal {
    pub(crate) fn matches(&self, task: &Task<'_>) -> bool {
        self.attrs_match(task) && self.not.as_ref().is_none_or(|not| !not.attrs_match(task))
    }

    /// Every attribute that is set matches (ignoring `not`). A task attribute the broker could
    /// not read never matches.
    pub(crate) fn attrs_match(&self, task: &Task<'_>) -> bool {
        let any =
            |set: &[String], have: Option<&str>| set.is_empty() || have.is_some_and(|h| set.iter().any(|s| s == h));
        let some_of = |set: &[String], have: &[String]| set.is_empty() || set.iter().any(|s| have.contains(s));
        if self.remote != task.remote.is_some() {
            return false;
        }
        if let Some(r) = &task.remote {
            return some_of(&self.tls_san_uri, r.san_uri)
                && some_of(&self.tls_san_dns, r.san_dns)
                && any(&self.tls_subject_cn, r.subject_cn);
        }
        (self.uid.is_empty() || self.uid.contains(&task.uid))
            && (self.gid.is_empty() || self.gid.contains(&task.gid))
            && (self.groups.is_empty() || self.groups.iter().any(|g| task.groups.contains(g)))
            && any(&self.exe, task.exe)
            && any(&self.exe_sha256, task.exe_sha256)
            && any(&self.lsm_label, task.lsm_label)
            && (self.cgroup.is_empty()
                || task
                    .cgroup
                    .is_some_and(|c| self.cgroup.iter().any(|p| cgroup_within(c, p))))
            && (self.abi.is_empty() || self.abi.contains(&task.abi))
    }
}

/// Whether cgroup `path` is `parent` or below it.
pub(crate) fn cgroup_within(path: &str, parent: &str) -> bool {
    parent.is_empty() || path == parent || path.strip_prefix(parent).is_some_and(|rest| rest.starts_with('/'))
}

impl ServiceMatch {
    pub(crate) fn matches(&self, service: &ServiceView<'_>) -> bool {
        self.class.as_deref().is_none_or(|c| c == service.class)
            && self.name.as_deref().is_none_or(|n| n == service.name)
            && self
                .properties
                .iter()
                .all(|(k, m)| service.properties.get(k).is_some_and(|have| m.matches(have)))
    }
}

impl Policy {
    /// The rules about `task` and `service`, in policy order (through the index: the cost
    /// follows the rules that could apply, not the size of the policy).
    pub(crate) fn matching<'p>(&'p self, task: &Task<'_>, service: &ServiceView<'_>) -> Vec<&'p Rule> {
        let set = self.principals_of(task);
        self.index.matching(&self.rules, &set, service)
    }

    /// The rules about `task` and `service` found by reading every rule: the reference the
    /// index is tested against.
    #[cfg(test)]
    pub(crate) fn matching_by_scan<'p>(&'p self, task: &Task<'_>, service: &ServiceView<'_>) -> Vec<&'p Rule> {
        let principal_matches: Vec<bool> = self.principals.iter().map(|p| p.matches(task)).collect();
        self.rules
            .iter()
            .filter(|r| {
                r.principals
                    .iter()
                    .any(|&i| principal_matches.get(i).copied().unwrap_or(false))
            })
            .filter(|r| r.service.matches(service))
            .collect()
    }

    /// The principals `task` matches: found once, then used for any number of services
    /// ([`Policy::can_see_as`]).
    pub fn principals_of(&self, task: &Task<'_>) -> PrincipalSet {
        self.index.principals_of(&self.principals, task)
    }

    /// Whether the task may see the service at all: only a forbid rule naming the whole service
    /// hides it.
    pub fn can_see(&self, task: &Task<'_>, service: &ServiceView<'_>) -> bool {
        self.can_see_as(&self.principals_of(task), service)
    }

    /// [`Policy::can_see`] for a task whose principals were found already.
    pub fn can_see_as(&self, principals: &PrincipalSet, service: &ServiceView<'_>) -> bool {
        !self
            .index
            .matching(&self.rules, principals, service)
            .iter()
            .any(|r| r.forbids_service())
    }

    /// `initWithTask`: admits the task to the service with the given open mode and compiles the
    /// grant for the service's method table and memory types, or names the rule that refused.
    pub fn admit(
        &self,
        task: &Task<'_>,
        service: &ServiceView<'_>,
        exclusive: bool,
        methods: &[MethodRef<'_>],
        memory_types: &[&str],
    ) -> Admission {
        let rules = self.matching(task, service);
        let first = |effect: Effect, pred: &dyn Fn(&Rule) -> bool| {
            rules.iter().copied().find(|r| r.effect == effect && pred(r))
        };
        let global = self.audit;
        let by = |r: &Rule, reason: String| Denial {
            rule: r.id.clone(),
            reason,
            audit: r.audit || global,
        };
        let default = |reason: String| Denial {
            rule: DEFAULT_DENY.into(),
            reason,
            audit: global,
        };
        // Admission: an enforced refusal ends it; an audited one is recorded and admission goes on.
        let mut audited = Vec::new();
        let mut refuse = |d: Denial| {
            if d.audit {
                audited.push(d);
                Ok(())
            } else {
                Err(d)
            }
        };
        if let Some(r) = rules.iter().find(|r| r.forbids_service()) {
            refuse(by(r, format!("service {} is forbidden to this task", service.name)))?;
        }
        let first_allow = first(Effect::Allow, &|_| true);
        if first_allow.is_none() {
            refuse(default(format!("no rule allows this task to open {}", service.name)))?;
        }
        let mut admitted_by = first_allow.map_or_else(|| DEFAULT_DENY.to_string(), |r| r.id.clone());
        if exclusive {
            if let Some(r) = first(Effect::Forbid, &|r| r.open == Some(OpenPermission::Exclusive)) {
                refuse(by(r, format!("exclusive open of {} is forbidden", service.name)))?;
            }
            match first(Effect::Allow, &|r| r.open == Some(OpenPermission::Exclusive)) {
                Some(r) => admitted_by = r.id.clone(),
                None => refuse(default(format!("no rule allows an exclusive open of {}", service.name)))?,
            }
        }
        let privilege = |p: &str| -> Result<(), Denial> {
            if let Some(r) = first(Effect::Forbid, &|r| r.privileges.iter().any(|q| q == p)) {
                Err(by(r, format!("privilege {p} is forbidden")))
            } else if first(Effect::Allow, &|r| r.privileges.iter().any(|q| q == p)).is_some() {
                Ok(())
            } else {
                Err(default(format!("no rule grants privilege {p}")))
            }
        };
        let privileges: BTreeSet<String> = rules
            .iter()
            .filter(|r| r.effect == Effect::Allow)
            .flat_map(|r| r.privileges.iter())
            .filter(|p| privilege(p).is_ok())
            .cloned()
            .collect();
        let constraints = methods
            .iter()
            .map(|m| {
                // Every allow rule granting the method, by id, with its constraints resolved to
                // where each parameter's value is — up to the first without any, which admits
                // every call (so no later one can name a call).
                let mut alternatives = Vec::new();
                for rule in rules
                    .iter()
                    .filter(|r| r.effect == Effect::Allow && r.methods.contains(m.name))
                {
                    let checks: Vec<Compiled> = rule
                        .args
                        .iter()
                        .filter(|a| a.method == m.name)
                        .map(|a| Compiled {
                            param: a.param.clone(),
                            at: m.params.iter().find(|p| p.name == a.param).map(|p| p.at),
                            constraint: a.constraint.clone(),
                            audit: rule.audit || global,
                        })
                        .collect();
                    let unconstrained = checks.is_empty();
                    alternatives.push(Alternative {
                        rule: rule.id.clone(),
                        checks,
                    });
                    if unconstrained {
                        break;
                    }
                }
                // Only unconstrained: nothing to check at call time.
                if alternatives.first().is_some_and(|a| a.checks.is_empty()) {
                    alternatives.clear();
                }
                alternatives
            })
            .collect();
        let methods = methods
            .iter()
            .map(|m| {
                if let Some(r) = first(Effect::Forbid, &|r| r.methods.contains(m.name)) {
                    return Err(by(r, format!("method {} is forbidden", m.name)));
                }
                let Some(allow) = first(Effect::Allow, &|r| r.methods.contains(m.name)) else {
                    return Err(default(format!("no rule grants method {}", m.name)));
                };
                match m.privilege.map(privilege) {
                    Some(Err(d)) => Err(Denial {
                        reason: format!(
                            "method {} requires privilege {}, which is not granted",
                            m.name,
                            m.privilege.unwrap_or_default()
                        ),
                        ..d
                    }),
                    _ => Ok(allow.id.clone()),
                }
            })
            .collect();
        let memory = memory_types
            .iter()
            .map(|m| {
                if let Some(r) = first(Effect::Forbid, &|r| r.memory.iter().any(|x| x == m)) {
                    return Err(by(r, format!("mapping memory type {m} is forbidden")));
                }
                match first(Effect::Allow, &|r| r.memory.iter().any(|x| x == m)) {
                    Some(r) => Ok(r.id.clone()),
                    None => Err(default(format!("no rule grants memory type {m}"))),
                }
            })
            .collect();
        let rate = rules
            .iter()
            .filter(|r| r.effect == Effect::Allow)
            .filter_map(|r| r.rate.map(|rate| (rate, r.id.clone())))
            .reduce(|best, next| if next.0.tighter_than(best.0) { next } else { best });
        Ok(Grant {
            admitted_by,
            audited,
            memory,
            methods,
            constraints,
            rate,
            privileges,
        })
    }
}

#[cfg(test)]
mod tests {
    use portcullis_proto::property::PropValue;

    use super::*;
    use crate::Source;

    const PRINCIPALS: &str = r#"
[[principal]]
name = "anyone"

[[principal]]
name = "root"
uid = [0]

[[principal]]
name = "dialout"
groups = ["dialout"]

[[principal]]
name = "minicom"
exe = ["/usr/bin/minicom"]
"#;

    fn policy(rules: &str) -> Policy {
        let text = format!("{PRINCIPALS}\n{rules}");
        Policy::parse(&[Source {
            origin: "test.toml",
            text: &text,
        }])
        .unwrap()
    }

    fn task<'a>(uid: u32, groups: &'a [String], exe: Option<&'a str>) -> Task<'a> {
        Task {
            exe,
            ..Task::new(uid, uid, groups, AbiId::X86_64)
        }
    }

    fn tty_props() -> Properties {
        Properties::from([("usb.vendor".to_string(), PropValue::Text("0403".into()))])
    }

    fn tty(props: &Properties) -> ServiceView<'_> {
        ServiceView {
            name: "tty0",
            class: "TtyDevice",
            properties: props,
        }
    }

    const METHODS: [MethodRef<'static>; 3] = [
        MethodRef {
            name: "read",
            privilege: None,
            params: &[],
        },
        MethodRef {
            name: "write",
            privilege: None,
            params: &[],
        },
        MethodRef {
            name: "reset",
            privilege: Some("tty.admin"),
            params: &[],
        },
    ];

    #[test]
    fn admit_nothing_matches_is_default_deny() {
        let p = policy(
            r#"
[[rule]]
id = "other"
effect = "allow"
principals = ["anyone"]
service = { class = "BlockDevice" }
methods = ["*"]
"#,
        );
        let props = tty_props();
        let err = p
            .admit(&task(1000, &[], None), &tty(&props), false, &METHODS, &[])
            .unwrap_err();
        assert_eq!(err.rule, DEFAULT_DENY);
    }

    #[test]
    fn admit_forbid_beats_allow_for_methods() {
        let p = policy(
            r#"
[[rule]]
id = "allow-all"
effect = "allow"
principals = ["anyone"]
service = { class = "TtyDevice" }
methods = ["*"]

[[rule]]
id = "no-write"
effect = "forbid"
principals = ["anyone"]
service = { class = "TtyDevice" }
methods = ["write"]
"#,
        );
        let props = tty_props();
        let grant = p
            .admit(&task(1000, &[], None), &tty(&props), false, &METHODS, &[])
            .unwrap();
        assert_eq!(grant.check(0), Ok("allow-all"));
        assert_eq!(grant.check(1).unwrap_err().rule, "no-write");
        // reset needs a privilege nobody grants.
        let denial = grant.check(2).unwrap_err();
        assert_eq!(denial.rule, DEFAULT_DENY);
        assert!(denial.reason.contains("tty.admin"), "{}", denial.reason);
        assert_eq!(grant.check(3).unwrap_err().rule, DEFAULT_DENY);
    }

    #[test]
    fn admit_forbid_whole_service_hides_it_and_names_rule() {
        let p = policy(
            r#"
[[rule]]
id = "allow-all"
effect = "allow"
principals = ["anyone"]
methods = ["*"]

[[rule]]
id = "no-tty-for-anyone"
effect = "forbid"
principals = ["anyone"]
service = { class = "TtyDevice" }
"#,
        );
        let props = tty_props();
        let t = task(0, &[], None);
        assert!(!p.can_see(&t, &tty(&props)));
        assert_eq!(
            p.admit(&t, &tty(&props), false, &METHODS, &[]).unwrap_err().rule,
            "no-tty-for-anyone"
        );
    }

    #[test]
    fn admit_groups_match_any_listed() {
        let p = policy(
            r#"
[[rule]]
id = "serial"
effect = "allow"
principals = ["dialout"]
service = { class = "TtyDevice", properties = { "usb.vendor" = "0403" } }
methods = ["read"]
"#,
        );
        let props = tty_props();
        let groups = vec!["users".to_string(), "dialout".to_string()];
        let grant = p
            .admit(&task(1000, &groups, None), &tty(&props), false, &METHODS, &[])
            .unwrap();
        assert_eq!(grant.admitted_by(), "serial");
        let others = vec!["users".to_string()];
        assert_eq!(
            p.admit(&task(1000, &others, None), &tty(&props), false, &METHODS, &[])
                .unwrap_err()
                .rule,
            DEFAULT_DENY
        );
        let wrong_vendor = Properties::from([("usb.vendor".to_string(), PropValue::Text("1a86".into()))]);
        assert!(
            p.admit(&task(1000, &groups, None), &tty(&wrong_vendor), false, &METHODS, &[])
                .is_err()
        );
    }

    #[test]
    fn admit_exe_must_match_exactly_and_be_known() {
        let p = policy(
            r#"
[[rule]]
id = "minicom"
effect = "allow"
principals = ["minicom"]
methods = ["read"]
"#,
        );
        let props = tty_props();
        assert!(
            p.admit(
                &task(1000, &[], Some("/usr/bin/minicom")),
                &tty(&props),
                false,
                &METHODS,
                &[]
            )
            .is_ok()
        );
        assert!(
            p.admit(
                &task(1000, &[], Some("/tmp/minicom")),
                &tty(&props),
                false,
                &METHODS,
                &[]
            )
            .is_err()
        );
        assert!(
            p.admit(&task(1000, &[], None), &tty(&props), false, &METHODS, &[])
                .is_err()
        );
    }

    #[test]
    fn admit_memory_types_default_deny_and_forbid_wins() {
        let p = policy(
            r#"
[[rule]]
id = "use"
effect = "allow"
principals = ["anyone"]
methods = ["*"]
memory = ["registers", "dma"]

[[rule]]
id = "no-dma-for-dialout"
effect = "forbid"
principals = ["dialout"]
memory = ["dma"]
"#,
        );
        let props = tty_props();
        let kinds = ["registers", "dma", "scratch"];
        let g = p
            .admit(&task(1000, &[], None), &tty(&props), false, &METHODS, &kinds)
            .unwrap();
        assert_eq!((g.check_memory(0), g.check_memory(1)), (Ok("use"), Ok("use")));
        assert_eq!(g.check_memory(2).unwrap_err().rule, DEFAULT_DENY);
        assert_eq!(g.check_memory(3).unwrap_err().rule, DEFAULT_DENY);
        let groups = vec!["dialout".to_string()];
        let g = p
            .admit(&task(1000, &groups, None), &tty(&props), false, &METHODS, &kinds)
            .unwrap();
        assert_eq!(g.check_memory(1).unwrap_err().rule, "no-dma-for-dialout");
        assert!(
            p.can_see(&task(1000, &groups, None), &tty(&props)),
            "a memory-only forbid does not hide the service"
        );
    }

    #[test]
    fn admit_property_any_of_and_prefix() {
        let p = policy(
            r#"
[[rule]]
id = "ftdi-or-ch340"
effect = "allow"
principals = ["anyone"]
service = { class = "TtyDevice", properties = { "usb.vendor" = ["0403", "1a86"], "serial" = { prefix = "FT" } } }
methods = ["read"]
"#,
        );
        let with = |vendor: &str, serial: &str| {
            Properties::from([
                ("usb.vendor".to_string(), PropValue::Text(vendor.into())),
                ("serial".to_string(), PropValue::Text(serial.into())),
            ])
        };
        let t = task(1000, &[], None);
        for (vendor, serial, ok) in [
            ("0403", "FT12", true),
            ("1a86", "FTX", true),
            ("dead", "FT12", false),
            ("0403", "XX", false),
        ] {
            let props = with(vendor, serial);
            assert_eq!(
                p.admit(&t, &tty(&props), false, &METHODS, &[]).is_ok(),
                ok,
                "{vendor} {serial}"
            );
        }
        let bad = format!(
            "{PRINCIPALS}\n[[rule]]\nid = \"r\"\neffect = \"allow\"\nprincipals = [\"anyone\"]\nservice = {{ properties = {{ x = {{ suffix = \"a\" }} }} }}\n"
        );
        assert!(
            Policy::parse(&[Source {
                origin: "t",
                text: &bad
            }])
            .is_err()
        );
    }

    #[test]
    fn admit_exe_hash_cgroup_label_and_not() {
        let hash = "ab".repeat(32);
        let text = format!(
            "[[principal]]\nname = \"app\"\nexe_sha256 = [\"{hash}\"]\ncgroup = [\"/system.slice/app.service\"]\nlsm_label = [\"app_t\"]\nnot = {{ uid = [0] }}\n[[rule]]\nid = \"app-only\"\neffect = \"allow\"\nprincipals = [\"app\"]\nmethods = [\"*\"]\n"
        );
        let p = Policy::parse(&[Source {
            origin: "t",
            text: &text,
        }])
        .unwrap();
        let props = tty_props();
        let ok = Task {
            exe_sha256: Some(&hash),
            cgroup: Some("/system.slice/app.service/worker"),
            lsm_label: Some("app_t"),
            ..task(1000, &[], None)
        };
        assert!(p.admit(&ok, &tty(&props), false, &METHODS, &[]).is_ok());
        let other_hash = "cd".repeat(32);
        for bad in [
            Task {
                exe_sha256: Some(&other_hash),
                ..ok
            },
            Task { exe_sha256: None, ..ok },
            Task {
                cgroup: Some("/system.slice/app.service2"),
                ..ok
            },
            Task {
                cgroup: Some("/user.slice"),
                ..ok
            },
            Task {
                lsm_label: Some("unconfined"),
                ..ok
            },
            Task { uid: 0, ..ok },
        ] {
            assert_eq!(
                p.admit(&bad, &tty(&props), false, &METHODS, &[]).unwrap_err().rule,
                DEFAULT_DENY,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn parse_bad_hash_cgroup_and_empty_not_are_refused() {
        let err = Policy::parse(&[Source {
            origin: "t",
            text: "[[principal]]\nname = \"x\"\nexe_sha256 = [\"ABC\"]\ncgroup = [\"user.slice\"]\nnot = {}\n",
        }])
        .unwrap_err();
        assert_eq!(err.errors().len(), 3, "{err}");
    }

    #[test]
    fn admit_rate_is_the_tightest_applicable() {
        let p = policy(
            r#"
[[rule]]
id = "fast"
effect = "allow"
principals = ["anyone"]
methods = ["read"]
rate = "1000/s"

[[rule]]
id = "slow"
effect = "allow"
principals = ["root"]
methods = ["write"]
rate = "60/m"
"#,
        );
        let props = tty_props();
        let user = p
            .admit(&task(1000, &[], None), &tty(&props), false, &METHODS, &[])
            .unwrap();
        assert_eq!(
            user.rate_limit(),
            Some((
                Rate {
                    calls: 1000,
                    seconds: 1
                },
                "fast"
            ))
        );
        let root = p
            .admit(&task(0, &[], None), &tty(&props), false, &METHODS, &[])
            .unwrap();
        assert_eq!(
            root.rate_limit().map(|(r, rule)| (r.per_second(), rule)),
            Some((1.0, "slow"))
        );
        for bad in ["0/s", "10/d", "fast", "-1/s"] {
            let text = format!(
                "{PRINCIPALS}\n[[rule]]\nid = \"r\"\neffect = \"allow\"\nprincipals = [\"anyone\"]\nrate = \"{bad}\"\n"
            );
            assert!(
                Policy::parse(&[Source {
                    origin: "t",
                    text: &text
                }])
                .is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn admit_abi_attribute_matches_declared_abi() {
        let p = Policy::parse(&[Source {
            origin: "t",
            text: "[[principal]]\nname = \"legacy\"\nabi = [\"i386\", \"armhf\"]\n[[rule]]\nid = \"legacy-only\"\neffect = \"allow\"\nprincipals = [\"legacy\"]\nmethods = [\"*\"]\n",
        }])
        .unwrap();
        let props = tty_props();
        let i386 = Task {
            abi: AbiId::I386,
            ..task(1000, &[], None)
        };
        assert!(p.admit(&i386, &tty(&props), false, &METHODS, &[]).is_ok());
        assert_eq!(
            p.admit(&task(1000, &[], None), &tty(&props), false, &METHODS, &[])
                .unwrap_err()
                .rule,
            DEFAULT_DENY
        );
    }

    #[test]
    fn parse_unknown_abi_is_located_with_suggestion() {
        let err = Policy::parse(&[Source {
            origin: "t",
            text: "[[principal]]\nname = \"x\"\nabi = [\"i368\"]\n",
        }])
        .unwrap_err();
        let e = &err.errors()[0];
        assert_eq!((e.line, e.col), (3, 8));
        assert!(e.message.contains("did you mean \"i386\""), "{e}");
    }

    #[test]
    fn admit_privilege_granted_to_root_only() {
        let p = policy(
            r#"
[[rule]]
id = "use"
effect = "allow"
principals = ["anyone"]
methods = ["read", "write"]

[[rule]]
id = "admin"
effect = "allow"
principals = ["root"]
methods = ["reset"]
privileges = ["tty.admin"]
"#,
        );
        let props = tty_props();
        let root = p
            .admit(&task(0, &[], None), &tty(&props), false, &METHODS, &[])
            .unwrap();
        assert!(root.has_privilege("tty.admin"));
        assert_eq!(root.check(2), Ok("admin"));
        let user = p
            .admit(&task(1000, &[], None), &tty(&props), false, &METHODS, &[])
            .unwrap();
        assert!(!user.has_privilege("tty.admin"));
        assert_eq!(user.check(2).unwrap_err().rule, DEFAULT_DENY);
    }

    #[test]
    fn admit_forbidden_privilege_denies_method_naming_forbid() {
        let p = policy(
            r#"
[[rule]]
id = "admin"
effect = "allow"
principals = ["anyone"]
methods = ["*"]
privileges = ["tty.admin"]

[[rule]]
id = "no-admin-for-dialout"
effect = "forbid"
principals = ["dialout"]
privileges = ["tty.admin"]
"#,
        );
        let props = tty_props();
        let groups = vec!["dialout".to_string()];
        let grant = p
            .admit(&task(1000, &groups, None), &tty(&props), false, &METHODS, &[])
            .unwrap();
        assert!(!grant.has_privilege("tty.admin"));
        assert_eq!(grant.check(2).unwrap_err().rule, "no-admin-for-dialout");
        assert_eq!(grant.check(1), Ok("admin"));
    }

    #[test]
    fn admit_exclusive_needs_a_rule_that_grants_it() {
        let p = policy(
            r#"
[[rule]]
id = "shared-only"
effect = "allow"
principals = ["anyone"]
methods = ["read"]

[[rule]]
id = "exclusive-for-root"
effect = "allow"
principals = ["root"]
open = "exclusive"
"#,
        );
        let props = tty_props();
        assert!(
            p.admit(&task(1000, &[], None), &tty(&props), false, &METHODS, &[])
                .is_ok()
        );
        assert_eq!(
            p.admit(&task(1000, &[], None), &tty(&props), true, &METHODS, &[])
                .unwrap_err()
                .rule,
            DEFAULT_DENY
        );
        let grant = p.admit(&task(0, &[], None), &tty(&props), true, &METHODS, &[]).unwrap();
        assert_eq!(grant.admitted_by(), "exclusive-for-root");
        // The exclusive rule names no methods; the shared rule still grants read.
        assert_eq!(grant.check(0), Ok("shared-only"));
    }

    #[test]
    fn admit_forbid_exclusive_names_rule() {
        let p = policy(
            r#"
[[rule]]
id = "all"
effect = "allow"
principals = ["anyone"]
open = "exclusive"
methods = ["*"]

[[rule]]
id = "never-exclusive"
effect = "forbid"
principals = ["anyone"]
open = "exclusive"
"#,
        );
        let props = tty_props();
        assert!(p.can_see(&task(1, &[], None), &tty(&props)));
        assert_eq!(
            p.admit(&task(1, &[], None), &tty(&props), true, &METHODS, &[])
                .unwrap_err()
                .rule,
            "never-exclusive"
        );
        assert!(p.admit(&task(1, &[], None), &tty(&props), false, &METHODS, &[]).is_ok());
    }

    /// Allow rules are a union: a capped and an uncapped grant of the same method admit what
    /// the uncapped one admits, in either order, naming the first admitting rule by id; a
    /// refusal by every granting rule names the first and says why each refused.
    #[test]
    fn allow_rules_are_a_union_whatever_their_order() {
        const ECHO: [MethodRef<'static>; 1] = [MethodRef {
            name: "echo",
            privilege: None,
            params: &[crate::ParamRef {
                name: "len",
                at: crate::ParamAt::StructLen,
            }],
        }];
        let capped = "[[rule]]\nid = \"a-capped\"\neffect = \"allow\"\nprincipals = [\"anyone\"]\nmethods = [\"echo\"]\nargs.echo.len = { max = 512 }\n";
        let open = "[[rule]]\nid = \"b-open\"\neffect = \"allow\"\nprincipals = [\"anyone\"]\nmethods = [\"echo\"]\n";
        let tight = "[[rule]]\nid = \"c-tight\"\neffect = \"allow\"\nprincipals = [\"anyone\"]\nmethods = [\"echo\"]\nargs.echo.len = { max = 16 }\nmode = \"audit\"\n";
        let props = tty_props();
        let t = task(1000, &[], None);
        for rules in [format!("{capped}\n{open}"), format!("{open}\n{capped}")] {
            let grant = policy(&rules).admit(&t, &tty(&props), false, &ECHO, &[]).unwrap();
            assert_eq!(grant.check(0), Ok("a-capped"), "the method's rule: the first by id");
            assert_eq!(grant.check_args(0, &[], &[0; 4000]), Ok("b-open"), "{rules}");
            assert_eq!(grant.check_args(0, &[], &[0; 100]), Ok("a-capped"), "{rules}");
        }
        for rules in [format!("{capped}\n{tight}"), format!("{tight}\n{capped}")] {
            let grant = policy(&rules).admit(&t, &tty(&props), false, &ECHO, &[]).unwrap();
            assert_eq!(grant.check_args(0, &[], &[0; 100]), Ok("a-capped"));
            // Refused by both: the audited rule would let it through, so it decides.
            let d = grant.check_args(0, &[], &[0; 4000]).unwrap_err();
            assert_eq!((d.rule.as_str(), d.audit), ("c-tight", true), "{rules}");
            assert!(
                d.reason.contains("\"a-capped\"") && d.reason.contains("\"c-tight\""),
                "{}",
                d.reason
            );
        }
        let enforcing = tight.replace("mode = \"audit\"\n", "");
        let grant = policy(&format!("{enforcing}\n{capped}"))
            .admit(&t, &tty(&props), false, &ECHO, &[])
            .unwrap();
        let d = grant.check_args(0, &[], &[0; 4000]).unwrap_err();
        assert_eq!((d.rule.as_str(), d.audit), ("a-capped", false));
    }
}
