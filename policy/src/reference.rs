//! The reference evaluator: the rules interpreted directly, one request at a time, in the most
//! obvious way. It is slow on purpose and exists to be obviously right: the differential test
//! holds the compiled grants to its decisions and deciding rules.

use crate::{
    DEFAULT_DENY, Decision, Policy, ServiceView, Task,
    model::{Effect, OpenPermission, Rule},
};

/// One request, as the reference evaluator sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request<'a> {
    /// Admission with an open mode.
    Open {
        /// Exclusive rather than shared.
        exclusive: bool,
    },
    /// A method call on a shared open.
    Method {
        /// Method name.
        name: &'a str,
        /// Privilege the method requires.
        privilege: Option<&'a str>,
    },
    /// Mapping a memory type on a shared open.
    Memory {
        /// Memory type name.
        name: &'a str,
    },
}

fn allow(rule: &Rule) -> Decision {
    Decision {
        allowed: true,
        rule: rule.id.clone(),
        audit: false,
    }
}

impl Policy {
    fn deny(&self, rule: &Rule) -> Decision {
        Decision {
            allowed: false,
            rule: rule.id.clone(),
            audit: rule.audit || self.audit,
        }
    }

    fn default_deny(&self) -> Decision {
        Decision {
            allowed: false,
            rule: DEFAULT_DENY.into(),
            audit: self.audit,
        }
    }
}

/// An admission refusal: enforced ones end the evaluation (`Some`); the first audited one is
/// remembered and the evaluation goes on (`None`).
fn note(refusal: Decision, audited: &mut Option<Decision>) -> Option<Decision> {
    if refusal.audit {
        audited.get_or_insert(refusal);
        None
    } else {
        Some(refusal)
    }
}

impl Policy {
    fn applies(&self, rule: &Rule, task: &Task<'_>, service: &ServiceView<'_>) -> bool {
        let principal = rule
            .principals
            .iter()
            .any(|&i| self.principals.get(i).is_some_and(|p| p.matches(task)));
        principal && rule.service.matches(service)
    }

    /// The first applicable rule of `effect` satisfying `pred`, in file order.
    fn find(
        &self,
        task: &Task<'_>,
        service: &ServiceView<'_>,
        effect: Effect,
        pred: impl Fn(&Rule) -> bool,
    ) -> Option<&Rule> {
        self.rules
            .iter()
            .find(|r| r.effect == effect && self.applies(r, task, service) && pred(r))
    }

    /// Decides one request by reading the rules. A refusal in audit mode comes back with
    /// `audit` set: the broker lets such a request through and logs it as "would deny".
    pub fn evaluate(&self, task: &Task<'_>, service: &ServiceView<'_>, request: Request<'_>) -> Decision {
        // Admission first: a request on a service the task cannot open is refused as the open
        // is. Audited admission refusals let the admission go on; an open reports the first.
        let mut audited = None;
        if let Some(r) = self.find(task, service, Effect::Forbid, |r| r.forbids_service())
            && let Some(d) = note(self.deny(r), &mut audited)
        {
            return d;
        }
        let first_allow = self.find(task, service, Effect::Allow, |_| true);
        if first_allow.is_none()
            && let Some(d) = note(self.default_deny(), &mut audited)
        {
            return d;
        }
        match request {
            Request::Open { exclusive } => {
                let mut admitted = first_allow.map(allow);
                if exclusive {
                    if let Some(r) = self.find(task, service, Effect::Forbid, |r| {
                        r.open == Some(OpenPermission::Exclusive)
                    }) && let Some(d) = note(self.deny(r), &mut audited)
                    {
                        return d;
                    }
                    match self.find(task, service, Effect::Allow, |r| {
                        r.open == Some(OpenPermission::Exclusive)
                    }) {
                        Some(r) => admitted = Some(allow(r)),
                        None => {
                            if let Some(d) = note(self.default_deny(), &mut audited) {
                                return d;
                            }
                        }
                    }
                }
                audited.or(admitted).unwrap_or_else(|| self.default_deny())
            }
            Request::Method { name, privilege } => {
                if let Some(r) = self.find(task, service, Effect::Forbid, |r| r.methods.contains(name)) {
                    return self.deny(r);
                }
                let Some(granted) = self.find(task, service, Effect::Allow, |r| r.methods.contains(name)) else {
                    return self.default_deny();
                };
                if let Some(p) = privilege {
                    if let Some(r) = self.find(task, service, Effect::Forbid, |r| r.privileges.iter().any(|q| q == p)) {
                        return self.deny(r);
                    }
                    if self
                        .find(task, service, Effect::Allow, |r| r.privileges.iter().any(|q| q == p))
                        .is_none()
                    {
                        return self.default_deny();
                    }
                }
                allow(granted)
            }
            Request::Memory { name } => {
                if let Some(r) = self.find(task, service, Effect::Forbid, |r| r.memory.iter().any(|m| m == name)) {
                    return self.deny(r);
                }
                self.find(task, service, Effect::Allow, |r| r.memory.iter().any(|m| m == name))
                    .map_or_else(|| self.default_deny(), allow)
            }
        }
    }

    /// Decides a whole call: the method, then its arguments. Allow rules are a union: the call
    /// is allowed when some allow rule granting the method admits every argument constraint it
    /// has for that method — the first such rule by id decides. When none does, the first
    /// refusing rule in audit mode decides (the call goes through, as "would deny"), else the
    /// first refusing rule.
    pub fn evaluate_call(
        &self,
        task: &Task<'_>,
        service: &ServiceView<'_>,
        method: &crate::MethodRef<'_>,
        scalars: &[u64],
        struct_in: &[u8],
    ) -> Decision {
        let decision = self.evaluate(
            task,
            service,
            Request::Method {
                name: method.name,
                privilege: method.privilege,
            },
        );
        if !decision.allowed {
            return decision;
        }
        let mut refusing = Vec::new();
        for rule in self
            .rules
            .iter()
            .filter(|r| r.effect == Effect::Allow && self.applies(r, task, service) && r.methods.contains(method.name))
        {
            let admits = rule.args.iter().filter(|a| a.method == method.name).all(|arg| {
                method
                    .params
                    .iter()
                    .find(|p| p.name == arg.param)
                    .and_then(|p| p.at.value(scalars, struct_in))
                    .is_some_and(|v| arg.constraint.check(&arg.param, v).is_ok())
            });
            if admits {
                return allow(rule);
            }
            refusing.push(rule);
        }
        refusing
            .iter()
            .find(|r| r.audit || self.audit)
            .or(refusing.first())
            .map_or_else(|| self.default_deny(), |r| self.deny(r))
    }
}

#[cfg(test)]
mod tests {
    use portcullis_proto::property::{PropValue, Properties};
    use proptest::prelude::*;

    use super::*;
    use crate::{MethodRef, testgen::*};

    /// One request: kind, two selectors, and a call's arguments.
    type Req = (u8, u8, u8, (u64, u64, usize));

    /// A task, a service and ten requests.
    type Case = ((u32, u8, u8, u8, u8), (u8, u8, bool), Vec<Req>);

    /// The generated task and service of a case (the groups the task borrows first).
    fn groups(mask: u8) -> Vec<String> {
        pick(&GROUPS, mask).into_iter().map(String::from).collect()
    }

    fn task(groups: &[String], (uid, gid, _, exe, abi): (u32, u8, u8, u8, u8)) -> Task<'_> {
        Task {
            exe: EXES.get(usize::from(exe)).copied(),
            ..Task::new(
                [0, 1000, 1001, 65534][uid as usize],
                [0, 100, 1000][usize::from(gid)],
                groups,
                ABIS[usize::from(abi)],
            )
        }
    }

    fn props(vendor: bool) -> Properties {
        if vendor {
            Properties::from([("vendor".to_string(), PropValue::Text("0403".into()))])
        } else {
            Properties::new()
        }
    }

    fn service(props: &Properties, class: u8, name: u8) -> ServiceView<'_> {
        ServiceView {
            class: CLASSES[usize::from(class)],
            name: NAMES[usize::from(name)],
            properties: props,
        }
    }

    fn call_method(a: u8, b: u8) -> MethodRef<'static> {
        MethodRef {
            name: METHODS[usize::from(a)],
            privilege: PRIVILEGES.get(usize::from(b)).copied(),
            params: &PARAM_REFS,
        }
    }

    fn case() -> impl Strategy<Value = Case> {
        (
            (0u32..4, 0u8..3, 0u8..8, 0u8..3, 0u8..2),
            (0u8..2, 0u8..2, any::<bool>()),
            proptest::collection::vec((0u8..4, 0u8..3, 0u8..3, (0u64..20, 0u64..20, 0usize..20)), 10),
        )
    }

    proptest! {
        // 10,000 random policies × 10 requests each: 100,000 decisions compared.
        #![proptest_config(ProptestConfig { cases: 10_000, failure_persistence: None, ..ProptestConfig::default() })]
        #[test]
        fn compiled_grants_equal_reference_evaluator(policy in policy(), (who, (class, name, vendor), requests) in case()) {
            let groups = groups(who.2);
            let task = task(&groups, who);
            let props = props(vendor);
            let service = service(&props, class, name);
            let ids = |rules: Vec<&crate::model::Rule>| rules.iter().map(|r| r.id.clone()).collect::<Vec<_>>();
            prop_assert_eq!(ids(policy.matching(&task, &service)), ids(policy.matching_by_scan(&task, &service)), "the index finds what a scan finds");
            let (uris, dns) = ([SAN_URIS[0].to_string()], [SAN_DNS[0].to_string()]);
            for (san_uri, san_dns, subject_cn) in [(&uris[..], &[][..], None), (&[][..], &dns[..], Some(CNS[0])), (&[][..], &[][..], Some(CNS[1]))] {
                let remote = Task { remote: Some(crate::Remote { san_uri, san_dns, subject_cn }), ..task };
                prop_assert_eq!(ids(policy.matching(&remote, &service)), ids(policy.matching_by_scan(&remote, &service)), "remote {:?}", subject_cn);
            }
            for (kind, a, b, (x, y, len)) in requests {
                if kind == 2 {
                    // A whole call: method and argument constraints.
                    let method = call_method(a, b);
                    let struct_in = vec![0u8; len];
                    let compiled = crate::fuzzing::compiled_call(&policy, &task, &service, &method, &[x, y], &struct_in);
                    prop_assert_eq!(compiled, policy.evaluate_call(&task, &service, &method, &[x, y], &struct_in), "call {:?}", (a, b, x, y, len));
                    continue;
                }
                let request = match kind {
                    0 => Request::Open { exclusive: a % 2 == 1 },
                    1 | 2 => Request::Method { name: METHODS[usize::from(a)], privilege: PRIVILEGES.get(usize::from(b)).copied() },
                    _ => Request::Memory { name: MEMORY[usize::from(a) % 2] },
                };
                prop_assert_eq!(crate::fuzzing::compiled(&policy, &task, &service, request), policy.evaluate(&task, &service, request), "{:?}", request);
            }
        }
    }

    /// Every decision a policy makes on one task, one service and some requests, by the
    /// compiled grants (which the differential test holds to the reference evaluator).
    fn decisions(policy: &Policy, task: &Task<'_>, service: &ServiceView<'_>, requests: &[Req]) -> Vec<Decision> {
        requests
            .iter()
            .map(|&(kind, a, b, (x, y, len))| {
                if kind == 2 {
                    let method = call_method(a, b);
                    return crate::fuzzing::compiled_call(policy, task, service, &method, &[x, y], &vec![0u8; len]);
                }
                let request = match kind {
                    0 => Request::Open { exclusive: a % 2 == 1 },
                    1 => Request::Method {
                        name: METHODS[usize::from(a)],
                        privilege: PRIVILEGES.get(usize::from(b)).copied(),
                    },
                    _ => Request::Memory {
                        name: MEMORY[usize::from(a) % 2],
                    },
                };
                crate::fuzzing::compiled(policy, task, service, request)
            })
            .collect()
    }

    /// A permutation of `0..n` from a seed (xorshift, Fisher–Yates).
    fn permutation(n: usize, mut seed: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            order.swap(i, (seed % (i as u64 + 1)) as usize);
        }
        order
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2_000, failure_persistence: None, ..ProptestConfig::default() })]
        /// A policy means the same whatever the order of its rules and of its files: the same
        /// policy, written as text, parsed once in order and once with its rules shuffled and
        /// spread over files given in shuffled order, decides every request alike, naming the
        /// same rules.
        #[test]
        fn shuffling_rules_and_files_changes_no_decision(policy in policy(), seed in 1u64.., files in 1usize..4, (who, (class, name, vendor), requests) in case()) {
            let (principals, rules) = render(&policy);
            let mode = if policy.audit { "mode = \"audit\"\n\n" } else { "" };
            let in_order = format!("{mode}{principals}{}", rules.concat());
            let base = Policy::parse(&[crate::Source { origin: "in-order.toml", text: &in_order }]).unwrap();
            // The rules shuffled and dealt to the files; the principals and the mode to one of
            // them; the files given in a shuffled order.
            let mut texts = vec![String::new(); files];
            let first = seed as usize % files;
            texts[first] = format!("{mode}{principals}");
            for (n, i) in permutation(rules.len(), seed).into_iter().enumerate() {
                texts[(n + (seed >> 8) as usize) % files].push_str(&rules[i]);
            }
            let names: Vec<String> = (0..files).map(|i| format!("{i}.toml")).collect();
            let sources: Vec<crate::Source<'_>> = permutation(files, seed.rotate_left(17))
                .into_iter()
                .map(|i| crate::Source { origin: &names[i], text: &texts[i] })
                .collect();
            let shuffled = Policy::parse(&sources).unwrap();
            let groups = groups(who.2);
            let task = task(&groups, who);
            let props = props(vendor);
            let service = service(&props, class, name);
            let want = decisions(&base, &task, &service, &requests);
            prop_assert_eq!(&decisions(&shuffled, &task, &service, &requests), &want);
            // The text says what the generated policy says.
            prop_assert_eq!(&decisions(&policy, &task, &service, &requests), &want);
        }
    }
}
