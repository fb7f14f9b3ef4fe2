//! Entry point of the `policy_text` fuzz target (hidden: not part of the API): arbitrary text is
//! parsed and compiled; for a policy that compiles, the compiled grants must decide fuzzed
//! requests exactly as the reference evaluator does.

#![allow(clippy::indexing_slicing, clippy::panic)]

use portcullis_proto::{
    layout::ABIS,
    property::{PropValue, Properties},
};

use crate::{Decision, MethodRef, ParamAt, ParamRef, Policy, Remote, Request, ServiceView, Source, Task};

/// A compiled check's answer as a decision.
pub(crate) fn to_decision(r: Result<&str, crate::Denial>) -> Decision {
    match r {
        Ok(rule) => Decision {
            allowed: true,
            rule: rule.to_string(),
            audit: false,
        },
        Err(d) => Decision {
            allowed: false,
            rule: d.rule,
            audit: d.audit,
        },
    }
}

/// The compiled answer to a whole call: admission, the method, then its arguments.
pub(crate) fn compiled_call(
    policy: &Policy,
    task: &Task<'_>,
    service: &ServiceView<'_>,
    method: &MethodRef<'_>,
    scalars: &[u64],
    struct_in: &[u8],
) -> Decision {
    match policy.admit(task, service, false, std::slice::from_ref(method), &[]) {
        Err(d) => to_decision(Err(d)),
        Ok(grant) => to_decision(grant.check(0).and_then(|_| grant.check_args(0, scalars, struct_in))),
    }
}

/// The compiled answer to a reference request.
pub(crate) fn compiled(policy: &Policy, task: &Task<'_>, service: &ServiceView<'_>, request: Request<'_>) -> Decision {
    let (exclusive, methods, memory): (bool, Vec<MethodRef<'_>>, Vec<&str>) = match request {
        Request::Open { exclusive } => (exclusive, vec![], vec![]),
        Request::Method { name, privilege } => (
            false,
            vec![MethodRef {
                name,
                privilege,
                params: &[],
            }],
            vec![],
        ),
        Request::Memory { name } => (false, vec![], vec![name]),
    };
    match policy.admit(task, service, exclusive, &methods, &memory) {
        Err(d) => Decision {
            allowed: false,
            rule: d.rule,
            audit: d.audit,
        },
        Ok(grant) => match request {
            Request::Open { .. } => match grant.audited().first() {
                Some(d) => Decision {
                    allowed: false,
                    rule: d.rule.clone(),
                    audit: true,
                },
                None => Decision {
                    allowed: true,
                    rule: grant.admitted_by().to_string(),
                    audit: false,
                },
            },
            Request::Method { .. } => to_decision(grant.check(0)),
            Request::Memory { .. } => to_decision(grant.check_memory(0)),
        },
    }
}

/// Picks from the literals a policy uses, driven by fuzz bytes: requests that reach the rules.
struct Picker<'a> {
    bytes: &'a [u8],
}

impl Picker<'_> {
    fn byte(&mut self) -> u8 {
        let (first, rest) = self.bytes.split_first().unwrap_or((&0, &[]));
        self.bytes = rest;
        *first
    }

    /// One of `items` or (for the index past the end) none of them.
    fn pick<'b, T>(&mut self, items: &'b [T]) -> Option<&'b T> {
        let n = self.byte() as usize % (items.len() + 1);
        items.get(n)
    }
}

/// `policy_text`: the text up to the first NUL byte is a policy; the bytes after it choose
/// tasks, services and requests among the policy's own literals.
pub fn policy_text(data: &[u8]) {
    let split = data.iter().position(|b| *b == 0).unwrap_or(data.len());
    let Ok(text) = std::str::from_utf8(&data[..split]) else {
        return;
    };
    let Ok(policy) = Policy::parse(&[Source { origin: "fuzz", text }]) else {
        return;
    };
    let mut p = Picker {
        bytes: data.get(split + 1..).unwrap_or(&[]),
    };
    let lits = |f: fn(&crate::model::Principal) -> Vec<String>| -> Vec<String> {
        policy
            .principals
            .iter()
            .flat_map(|pr| f(pr).into_iter().chain(pr.not.as_deref().map(f).unwrap_or_default()))
            .collect()
    };
    let uids: Vec<u32> = policy.principals.iter().flat_map(|pr| pr.uid.clone()).collect();
    let groups = lits(|pr| pr.groups.clone());
    let exes = lits(|pr| pr.exe.clone());
    let cgroups = lits(|pr| pr.cgroup.clone());
    let sans = lits(|pr| pr.tls_san_uri.clone());
    let cns = lits(|pr| pr.tls_subject_cn.clone());
    let classes: Vec<String> = policy.rules.iter().filter_map(|r| r.service.class.clone()).collect();
    let names: Vec<String> = policy.rules.iter().filter_map(|r| r.service.name.clone()).collect();
    let methods: Vec<String> = policy
        .rules
        .iter()
        .flat_map(|r| match &r.methods {
            crate::model::Methods::Named(n) => n.clone(),
            crate::model::Methods::All => vec!["any".to_string()],
        })
        .collect();
    let privileges: Vec<String> = policy.rules.iter().flat_map(|r| r.privileges.clone()).collect();
    let memory: Vec<String> = policy.rules.iter().flat_map(|r| r.memory.clone()).collect();
    let props: Vec<(String, PropValue)> = policy
        .rules
        .iter()
        .flat_map(|r| r.service.properties.iter())
        .map(|(k, m)| {
            let v = match m {
                crate::model::PropMatch::Eq(v) => v.clone(),
                crate::model::PropMatch::AnyOf(vs) => vs.first().cloned().unwrap_or(PropValue::Flag(true)),
                crate::model::PropMatch::Prefix(t) => PropValue::Text(format!("{t}x")),
            };
            (k.clone(), v)
        })
        .collect();
    // The parameters the policy constrains (each a scalar, `len` the struct length) and the
    // numbers its constraints name.
    let mut param_names: Vec<&str> = policy
        .rules
        .iter()
        .flat_map(|r| r.args.iter().map(|a| a.param.as_str()))
        .collect();
    param_names.sort_unstable();
    param_names.dedup();
    let params: Vec<ParamRef<'_>> = param_names
        .iter()
        .enumerate()
        .map(|(i, n)| ParamRef {
            name: n,
            at: if *n == "len" {
                ParamAt::StructLen
            } else {
                ParamAt::Scalar(i)
            },
        })
        .collect();
    let bounds: Vec<u64> = policy
        .rules
        .iter()
        .flat_map(|r| r.args.iter())
        .flat_map(|a| a.constraint.numbers())
        .collect();
    for _ in 0..8 {
        if p.bytes.is_empty() {
            break;
        }
        let member: Vec<String> = groups.iter().filter(|_| p.byte() & 1 == 1).cloned().collect();
        let san: Vec<String> = p.pick(&sans).cloned().into_iter().collect();
        let cn = p.pick(&cns).cloned();
        let remote = p.byte() & 3 == 0;
        let task = Task {
            exe: p.pick(&exes).map(String::as_str),
            cgroup: p.pick(&cgroups).map(String::as_str),
            remote: remote.then(|| Remote {
                san_uri: &san,
                san_dns: &[],
                subject_cn: cn.as_deref(),
            }),
            ..Task::new(
                p.pick(&uids).copied().unwrap_or(4242),
                1000,
                &member,
                ABIS[usize::from(p.byte()) % ABIS.len()].id,
            )
        };
        let properties: Properties = props.iter().filter(|_| p.byte() & 1 == 1).cloned().collect();
        let class = p.pick(&classes).map_or("Other", String::as_str);
        let name = p.pick(&names).map_or("other0", String::as_str);
        let service = ServiceView {
            name,
            class,
            properties: &properties,
        };
        if p.byte().is_multiple_of(3) {
            // A whole call: the method decision, then the granting rule's argument constraints,
            // on arguments near the constraints' own bounds.
            let name = p.pick(&methods).map_or("other", String::as_str);
            let method = MethodRef {
                name,
                privilege: p.pick(&privileges).map(String::as_str),
                params: &params,
            };
            let scalars: Vec<u64> = (0..params.len())
                .map(|_| {
                    let base = p.pick(&bounds).copied().unwrap_or(0);
                    base.wrapping_add(u64::from(p.byte() % 3)).wrapping_sub(1)
                })
                .collect();
            let struct_in = vec![0u8; usize::from(p.byte())];
            let expected = policy.evaluate_call(&task, &service, &method, &scalars, &struct_in);
            let got = compiled_call(&policy, &task, &service, &method, &scalars, &struct_in);
            assert_eq!(got, expected, "call {name} {scalars:?} len {}", struct_in.len());
            continue;
        }
        let request = match p.byte() % 4 {
            0 => Request::Open { exclusive: false },
            1 => Request::Open { exclusive: true },
            2 => Request::Method {
                name: p.pick(&methods).map_or("other", String::as_str),
                privilege: p.pick(&privileges).map(String::as_str),
            },
            _ => Request::Memory {
                name: p.pick(&memory).map_or("other", String::as_str),
            },
        };
        let expected = policy.evaluate(&task, &service, request);
        let got = compiled(&policy, &task, &service, request);
        assert_eq!(got, expected, "{request:?}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fuzzing_policy_text_compares_calls_and_requests() {
        let policy = "[[principal]]\nname = \"u\"\nuid = [1000]\n\n[[rule]]\nid = \"r\"\neffect = \"allow\"\nprincipals = [\"u\"]\nservice = { class = \"C\" }\nmethods = [\"add\"]\nargs.add.a = { max = 10 }\nargs.add.len = { max = 4 }\n";
        // Every byte pattern: calls (first byte % 3 == 0) and requests, on both sides of the bounds.
        for seed in 0..=255u8 {
            let requests: Vec<u8> = (0..64u8).map(|i| i.wrapping_mul(seed).wrapping_add(seed)).collect();
            policy_text(&[policy.as_bytes(), &[0], &requests].concat());
        }
    }
}
