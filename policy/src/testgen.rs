//! Random policies and requests for the property tests (the differential test and the
//! analysis tests share them).

use portcullis_proto::{layout::AbiId, property::PropValue};
use proptest::prelude::*;

use crate::{
    Policy,
    model::{Effect, Methods, OpenPermission, Principal, PropMatch, Rule, ServiceMatch},
};

pub(crate) const GROUPS: [&str; 3] = ["dialout", "video", "disk"];
pub(crate) const EXES: [&str; 2] = ["/usr/bin/app", "/usr/bin/other"];
pub(crate) const ABIS: [AbiId; 2] = [AbiId::X86_64, AbiId::I386];
pub(crate) const CLASSES: [&str; 2] = ["TtyDevice", "BlockDevice"];
pub(crate) const NAMES: [&str; 2] = ["dev0", "dev1"];
pub(crate) const METHODS: [&str; 3] = ["read", "write", "reset"];
pub(crate) const PRIVILEGES: [&str; 2] = ["admin", "raw"];
pub(crate) const MEMORY: [&str; 2] = ["registers", "dma"];
/// Parameters constraints may name; "ghost" is not a parameter of any method.
pub(crate) const PARAMS: [&str; 4] = ["a", "b", "len", "ghost"];
pub(crate) const PARAM_REFS: [crate::ParamRef<'static>; 3] = [
    crate::ParamRef {
        name: "a",
        at: crate::ParamAt::Scalar(0),
    },
    crate::ParamRef {
        name: "b",
        at: crate::ParamAt::Scalar(1),
    },
    crate::ParamRef {
        name: "len",
        at: crate::ParamAt::StructLen,
    },
];

pub(crate) fn pick<T: Clone>(items: &[T], mask: u8) -> Vec<T> {
    items
        .iter()
        .enumerate()
        .filter(|(i, _)| mask & (1 << i) != 0)
        .map(|(_, x)| x.clone())
        .collect()
}

pub(crate) fn principal() -> impl Strategy<Value = Principal> {
    (0u8..16, 0u8..8, 0u8..8, 0u8..4, 0u8..4, 0u8..6, 0u8..12).prop_map(|(uids, gids, groups, exes, abis, not, tls)| {
        // One principal in four is of TLS clients.
        if tls < 3 {
            return tls_principal(tls, not);
        }
        Principal {
            name: String::new(),
            uid: pick(&[0, 1000, 1001, 65534], uids),
            gid: pick(&[0, 100, 1000], gids),
            groups: pick(&GROUPS, groups).into_iter().map(String::from).collect(),
            exe: pick(&EXES, exes).into_iter().map(String::from).collect(),
            abi: pick(&ABIS, abis),
            exe_sha256: Vec::new(),
            cgroup: Vec::new(),
            lsm_label: Vec::new(),
            // Sometimes a `not` block: one uid, or one group.
            not: match not {
                1 => Some(Box::new(Principal { uid: vec![0], ..bare() })),
                2 => Some(Box::new(Principal {
                    groups: vec![GROUPS[1].to_string()],
                    ..bare()
                })),
                _ => None,
            },
            ..bare()
        }
    })
}

/// A principal of TLS clients: by SAN URI, SAN DNS or CN, sometimes with a `not` block.
fn tls_principal(kind: u8, not: u8) -> Principal {
    let mut p = Principal { remote: true, ..bare() };
    match kind {
        0 => p.tls_san_uri = vec![SAN_URIS[0].to_string(), SAN_URIS[1].to_string()],
        1 => p.tls_san_dns = vec![SAN_DNS[0].to_string()],
        _ => p.tls_subject_cn = vec![CNS[0].to_string()],
    }
    if not == 1 {
        p.not = Some(Box::new(Principal {
            remote: true,
            tls_subject_cn: vec![CNS[1].to_string()],
            ..bare()
        }));
    }
    p
}

pub(crate) const SAN_URIS: [&str; 2] = ["spiffe://test/a", "spiffe://test/b"];
pub(crate) const SAN_DNS: [&str; 2] = ["a.test", "b.test"];
pub(crate) const CNS: [&str; 2] = ["alice", "mallory"];

fn bare() -> Principal {
    Principal {
        name: String::new(),
        uid: Vec::new(),
        gid: Vec::new(),
        groups: Vec::new(),
        exe: Vec::new(),
        abi: Vec::new(),
        exe_sha256: Vec::new(),
        cgroup: Vec::new(),
        lsm_label: Vec::new(),
        not: None,
        tls_san_uri: Vec::new(),
        tls_san_dns: Vec::new(),
        tls_subject_cn: Vec::new(),
        remote: false,
    }
}

pub(crate) fn rule(principals: usize) -> impl Strategy<Value = Rule> {
    (
        any::<bool>(),
        proptest::collection::vec(0..principals, 1..3),
        (0u8..3, 0u8..3, 0u8..4),
        (0u8..16, 0u8..3, 0u8..4, 0u8..4),
        (
            proptest::collection::vec((0usize..3, 0usize..4, 0u8..3, 0i64..20, 0i64..20), 0..3),
            proptest::bool::weighted(0.25),
        ),
    )
        .prop_map(
            |(forbid, principals, (class, name, vendor), (methods, open, privileges, memory), (args, audit))| Rule {
                audit,
                id: String::new(),
                at: crate::model::Spot::default(),
                effect: if forbid { Effect::Forbid } else { Effect::Allow },
                principals,
                service: ServiceMatch {
                    class: CLASSES.get(usize::from(class)).map(|c| c.to_string()),
                    name: NAMES.get(usize::from(name)).map(|n| n.to_string()),
                    properties: match vendor {
                        0 => Default::default(),
                        1 => [("vendor".to_string(), PropMatch::Prefix("04".into()))].into(),
                        _ => [("vendor".to_string(), PropMatch::Eq(PropValue::Text("0403".into())))].into(),
                    },
                },
                methods: if methods == 15 {
                    Methods::All
                } else {
                    Methods::Named(pick(&METHODS, methods).into_iter().map(String::from).collect())
                },
                open: [None, Some(OpenPermission::Shared), Some(OpenPermission::Exclusive)]
                    .get(usize::from(open))
                    .copied()
                    .flatten(),
                privileges: pick(&PRIVILEGES, privileges).into_iter().map(String::from).collect(),
                memory: pick(&MEMORY, memory).into_iter().map(String::from).collect(),
                names: Vec::new(),
                rate: None,
                args: if forbid {
                    Vec::new()
                } else {
                    // One constraint per method and parameter, as the language writes them.
                    let mut seen = std::collections::BTreeSet::new();
                    args.into_iter()
                        .filter(|(m, ..)| methods == 15 || methods & (1 << m) != 0)
                        .filter(|(m, param, ..)| seen.insert((*m, *param)))
                        .map(|(m, param, kind, x, y)| crate::model::ArgRule {
                            method: METHODS[m].to_string(),
                            param: PARAMS[param].to_string(),
                            constraint: match kind {
                                0 => crate::args::Constraint::Range {
                                    min: Some(i128::from(x.min(y))),
                                    max: Some(i128::from(x.max(y))),
                                },
                                1 => crate::args::Constraint::OneOf(vec![i128::from(x), i128::from(y)]),
                                _ => crate::args::Constraint::Mask(u64::try_from(x | y).unwrap_or(0)),
                            },
                        })
                        .collect()
                },
            },
        )
}

pub(crate) fn policy() -> impl Strategy<Value = Policy> {
    proptest::collection::vec(principal(), 1..4).prop_flat_map(|principals| {
        let n = principals.len();
        (proptest::collection::vec(rule(n), 0..7), proptest::bool::weighted(0.25)).prop_map(
            move |(mut rules, audit)| {
                for (i, r) in rules.iter_mut().enumerate() {
                    r.id = format!("r{i}");
                }
                let mut principals = principals.clone();
                for (i, p) in principals.iter_mut().enumerate() {
                    p.name = format!("p{i}");
                }
                Policy {
                    index: crate::index::RuleIndex::build(&principals, &rules),
                    principals,
                    rules,
                    audit,
                    asserts: Vec::new(),
                    revision: String::new(),
                    warnings: Vec::new(),
                }
            },
        )
    })
}

/// A TOML list of strings.
fn list<S: AsRef<str>>(items: &[S]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| format!("{:?}", s.as_ref())).collect();
    format!("[{}]", quoted.join(", "))
}

/// A principal's attributes as TOML `key = value` pairs.
fn attrs(p: &Principal) -> Vec<String> {
    let mut out = Vec::new();
    let nums = |v: &[u32]| format!("[{}]", v.iter().map(u32::to_string).collect::<Vec<_>>().join(", "));
    if !p.uid.is_empty() {
        out.push(format!("uid = {}", nums(&p.uid)));
    }
    if !p.gid.is_empty() {
        out.push(format!("gid = {}", nums(&p.gid)));
    }
    for (key, values) in [
        ("groups", &p.groups),
        ("exe", &p.exe),
        ("tls_san_uri", &p.tls_san_uri),
        ("tls_san_dns", &p.tls_san_dns),
        ("tls_subject_cn", &p.tls_subject_cn),
    ] {
        if !values.is_empty() {
            out.push(format!("{key} = {}", list(values)));
        }
    }
    if !p.abi.is_empty() {
        let names: Vec<&str> = p.abi.iter().map(|a| a.abi().name).collect();
        out.push(format!("abi = {}", list(&names)));
    }
    out
}

/// A generated policy as TOML: the principals' text, and each rule's (`[[rule]]` tables), so
/// that a test can spread them over files in any order.
pub(crate) fn render(policy: &Policy) -> (String, Vec<String>) {
    let mut principals = String::new();
    for p in &policy.principals {
        principals.push_str(&format!("[[principal]]\nname = {:?}\n", p.name));
        for a in attrs(p) {
            principals.push_str(&a);
            principals.push('\n');
        }
        if let Some(not) = &p.not {
            principals.push_str(&format!("not = {{ {} }}\n", attrs(not).join(", ")));
        }
        principals.push('\n');
    }
    let rules = policy
        .rules
        .iter()
        .map(|r| {
            let mut t = format!("[[rule]]\nid = {:?}\n", r.id);
            t.push_str(if r.effect == Effect::Allow {
                "effect = \"allow\"\n"
            } else {
                "effect = \"forbid\"\n"
            });
            let names: Vec<&str> = r
                .principals
                .iter()
                .filter_map(|&i| policy.principals.get(i))
                .map(|p| p.name.as_str())
                .collect();
            t.push_str(&format!("principals = {}\n", list(&names)));
            let mut service = Vec::new();
            if let Some(c) = &r.service.class {
                service.push(format!("class = {c:?}"));
            }
            if let Some(n) = &r.service.name {
                service.push(format!("name = {n:?}"));
            }
            for (key, m) in &r.service.properties {
                let value = match m {
                    PropMatch::Prefix(p) => format!("{{ prefix = {p:?} }}"),
                    PropMatch::Eq(PropValue::Text(v)) => format!("{v:?}"),
                    other => panic!("generated property match {other:?}"),
                };
                service.push(format!("properties = {{ {key:?} = {value} }}"));
            }
            t.push_str(&format!("service = {{ {} }}\n", service.join(", ")));
            match &r.methods {
                Methods::All => t.push_str("methods = [\"*\"]\n"),
                Methods::Named(m) => t.push_str(&format!("methods = {}\n", list(m))),
            }
            match r.open {
                Some(OpenPermission::Shared) => t.push_str("open = \"shared\"\n"),
                Some(OpenPermission::Exclusive) => t.push_str("open = \"exclusive\"\n"),
                None => {}
            }
            t.push_str(&format!(
                "privileges = {}\nmemory = {}\n",
                list(&r.privileges),
                list(&r.memory)
            ));
            if r.audit {
                t.push_str("mode = \"audit\"\n");
            }
            for a in &r.args {
                let c = match &a.constraint {
                    crate::args::Constraint::Range { min, max } => format!(
                        "{{ min = {}, max = {} }}",
                        min.unwrap_or_default(),
                        max.unwrap_or_default()
                    ),
                    crate::args::Constraint::OneOf(v) => format!(
                        "{{ one_of = [{}] }}",
                        v.iter().map(i128::to_string).collect::<Vec<_>>().join(", ")
                    ),
                    crate::args::Constraint::Mask(m) => format!("{{ mask = {m} }}"),
                    other => panic!("generated constraint {other:?}"),
                };
                t.push_str(&format!("args.{}.{} = {c}\n", a.method, a.param));
            }
            t.push('\n');
            t
        })
        .collect();
    (principals, rules)
}
