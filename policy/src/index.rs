//! Indexes that find the rules about one task and one service without reading every rule.
//!
//! Admission and visibility ask, for a task and a service, which rules apply. Reading every
//! rule and every principal makes that cost grow with the whole policy (774 µs per open at
//! 50,000 rules). The index answers from two sides and uses the narrower:
//! - **principals by attribute**: a local principal is filed under the first attribute it sets
//!   among uid, gid, groups, exe, exe_sha256 and lsm_label (under each value listed); a task
//!   looks up its own values and checks only those candidates and the principals that set none of
//!   these. A remote principal is filed by subject common name when it sets one. Rules are
//!   filed under each of their principals.
//! - **rules by service**: a rule that names a service is filed under its name, one that names
//!   only a class under the class, the rest together.
//!
//! The candidates of the narrower side are then checked against the other side exactly as
//! before, so the rules found are the rules a full scan finds, in policy order (the reference
//! scan in the tests and in `reference.rs` agrees on every generated policy).

use std::collections::{HashMap, HashSet};

use crate::{
    grant::{ServiceView, Task},
    model::{Principal, Rule},
};

/// Rule and principal indexes of one policy, built when it is parsed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct RuleIndex {
    uid: HashMap<u32, Vec<u32>>,
    gid: HashMap<u32, Vec<u32>>,
    group: HashMap<String, Vec<u32>>,
    exe: HashMap<String, Vec<u32>>,
    exe_sha256: HashMap<String, Vec<u32>>,
    lsm_label: HashMap<String, Vec<u32>>,
    /// Local principals filed under none of the above.
    local_rest: Vec<u32>,
    /// Remote principals by subject common name, and the rest.
    subject_cn: HashMap<String, Vec<u32>>,
    remote_rest: Vec<u32>,
    /// Rules per principal, ascending.
    rules_of: Vec<Vec<u32>>,
    /// Rules by the service name they name; by class when they name only a class; the rest.
    by_name: HashMap<String, Vec<u32>>,
    by_class: HashMap<String, Vec<u32>>,
    any_service: Vec<u32>,
    /// Every executable path a principal (or its `not` block) names.
    exes: HashSet<String>,
    /// Whether one names an `exe_sha256`.
    exe_sha256_named: bool,
}

/// The principals a task matches, found once and used for many services (visibility of every
/// service for one request).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PrincipalSet {
    /// Ascending principal indices.
    matched: Vec<u32>,
}

impl PrincipalSet {
    fn contains(&self, principal: usize) -> bool {
        u32::try_from(principal).is_ok_and(|p| self.matched.binary_search(&p).is_ok())
    }
}

fn file<K: std::hash::Hash + Eq + Clone>(map: &mut HashMap<K, Vec<u32>>, keys: &[K], at: u32) {
    for k in keys {
        let list = map.entry(k.clone()).or_default();
        if list.last() != Some(&at) {
            list.push(at);
        }
    }
}

impl RuleIndex {
    pub(crate) fn build(principals: &[Principal], rules: &[Rule]) -> RuleIndex {
        let mut index = RuleIndex {
            rules_of: vec![Vec::new(); principals.len()],
            ..RuleIndex::default()
        };
        for p in principals {
            for block in std::iter::once(p).chain(p.not.as_deref()) {
                index.exes.extend(block.exe.iter().cloned());
                index.exe_sha256_named |= !block.exe_sha256.is_empty();
            }
        }
        for (i, p) in principals.iter().enumerate() {
            let Ok(i) = u32::try_from(i) else { continue };
            if p.remote {
                match p.tls_subject_cn.as_slice() {
                    [] => index.remote_rest.push(i),
                    cns => file(&mut index.subject_cn, cns, i),
                }
            } else if !p.uid.is_empty() {
                file(&mut index.uid, &p.uid, i);
            } else if !p.gid.is_empty() {
                file(&mut index.gid, &p.gid, i);
            } else if !p.groups.is_empty() {
                file(&mut index.group, &p.groups, i);
            } else if !p.exe.is_empty() {
                file(&mut index.exe, &p.exe, i);
            } else if !p.exe_sha256.is_empty() {
                file(&mut index.exe_sha256, &p.exe_sha256, i);
            } else if !p.lsm_label.is_empty() {
                file(&mut index.lsm_label, &p.lsm_label, i);
            } else {
                index.local_rest.push(i);
            }
        }
        for (r, rule) in rules.iter().enumerate() {
            let Ok(r) = u32::try_from(r) else { continue };
            for &p in &rule.principals {
                if let Some(list) = index.rules_of.get_mut(p)
                    && list.last() != Some(&r)
                {
                    list.push(r);
                }
            }
            match (&rule.service.name, &rule.service.class) {
                (Some(name), _) => index.by_name.entry(name.clone()).or_default().push(r),
                (None, Some(class)) => index.by_class.entry(class.clone()).or_default().push(r),
                (None, None) => index.any_service.push(r),
            }
        }
        index
    }

    pub(crate) fn names_exe(&self, path: &str) -> bool {
        self.exes.contains(path)
    }

    pub(crate) fn uses_exe_sha256(&self) -> bool {
        self.exe_sha256_named
    }

    /// The principals `task` matches.
    pub(crate) fn principals_of(&self, principals: &[Principal], task: &Task<'_>) -> PrincipalSet {
        let mut candidates: Vec<u32> = Vec::new();
        let mut add = |list: Option<&Vec<u32>>| candidates.extend(list.into_iter().flatten().copied());
        match &task.remote {
            Some(remote) => {
                add(remote.subject_cn.and_then(|cn| self.subject_cn.get(cn)));
                add(Some(&self.remote_rest));
            }
            None => {
                add(self.uid.get(&task.uid));
                add(self.gid.get(&task.gid));
                for g in task.groups {
                    add(self.group.get(g));
                }
                add(task.exe.and_then(|e| self.exe.get(e)));
                add(task.exe_sha256.and_then(|h| self.exe_sha256.get(h)));
                add(task.lsm_label.and_then(|l| self.lsm_label.get(l)));
                add(Some(&self.local_rest));
            }
        }
        candidates.sort_unstable();
        candidates.dedup();
        candidates.retain(|&p| principals.get(p as usize).is_some_and(|p| p.matches(task)));
        PrincipalSet { matched: candidates }
    }

    /// The rules whose principals include one of `set` and whose service match takes
    /// `service`, in policy order.
    pub(crate) fn matching<'p>(
        &self,
        rules: &'p [Rule],
        set: &PrincipalSet,
        service: &ServiceView<'_>,
    ) -> Vec<&'p Rule> {
        let by_service = [
            self.by_name.get(service.name),
            self.by_class.get(service.class),
            Some(&self.any_service),
        ];
        let service_side: usize = by_service.iter().flatten().map(|l| l.len()).sum();
        let principal_side: usize = set
            .matched
            .iter()
            .filter_map(|&p| self.rules_of.get(p as usize))
            .map(Vec::len)
            .sum();
        let mut found: Vec<u32> = if principal_side <= service_side {
            let mut seen = HashSet::new();
            set.matched
                .iter()
                .filter_map(|&p| self.rules_of.get(p as usize))
                .flatten()
                .copied()
                .filter(|&r| seen.insert(r))
                .filter(|&r| rules.get(r as usize).is_some_and(|rule| rule.service.matches(service)))
                .collect()
        } else {
            by_service
                .iter()
                .flatten()
                .flat_map(|l| l.iter().copied())
                .filter(|&r| {
                    rules.get(r as usize).is_some_and(|rule| {
                        rule.service.matches(service) && rule.principals.iter().any(|&p| set.contains(p))
                    })
                })
                .collect()
        };
        found.sort_unstable();
        found.dedup();
        found.into_iter().filter_map(|r| rules.get(r as usize)).collect()
    }
}
