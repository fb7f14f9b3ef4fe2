//! Static analysis of a policy: does any task and service exist for which a request is allowed
//! (assertions), or decided differently by two policies (diff)?
//!
//! A request's decision is written as a formula over *atoms* — "the task's uid is one of these",
//! "the task is in group g", "the service's property k matches this" — that mirrors the reference
//! evaluator's `allowed` exactly (a property test holds the two together). A small
//! backtracking solver then looks for an assignment. Each attribute takes a single value (or, for
//! groups, one boolean per named group), and an atom only ever compares it with literals written
//! in the policy, so a value can be found among the literals, a value that matches none, and (for
//! prefixes) a literal extended by text no literal has: the search is complete, not a heuristic.
//! Every witness is then checked against the reference evaluator before it is reported.

use std::collections::{BTreeMap, BTreeSet};

use portcullis_proto::{
    layout::{ABIS, AbiId},
    property::{PropValue, Properties},
};

use crate::{
    Decision, Policy, Request, ServiceView, SourceError, Task,
    model::{Assertion, Effect, Methods, OpenPermission, PropMatch, Rule},
};

/// How many solver steps one question may take before the analysis gives up (and says so).
const STEP_BUDGET: u64 = 2_000_000;

/// One comparison of one attribute of the task or the service with literals.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Atom {
    Uid(Vec<u32>),
    Gid(Vec<u32>),
    /// Member of this group.
    Member(String),
    Exe(Vec<String>),
    ExeSha256(Vec<String>),
    /// This cgroup or below one of these.
    Cgroup(Vec<String>),
    LsmLabel(Vec<String>),
    Abi(Vec<AbiId>),
    /// The service's registry name.
    Name(String),
    /// The service's property `key`, present and matching.
    Prop(String, PropMatch),
    /// A TCP client with a TLS certificate.
    Remote,
    /// The certificate has this SAN URI.
    SanUri(String),
    /// The certificate has this SAN DNS name.
    SanDns(String),
    /// The certificate's subject CN is one of these.
    SubjectCn(Vec<String>),
}

/// The attribute an atom reads.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Key {
    Uid,
    Gid,
    Member(String),
    Exe,
    ExeSha256,
    Cgroup,
    LsmLabel,
    Abi,
    Name,
    Prop(String),
    Remote,
    SanUri(String),
    SanDns(String),
    SubjectCn,
}

/// A value of one attribute.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Value {
    Num(u32),
    Text(Option<String>),
    Abi(AbiId),
    Flag(bool),
    Prop(Option<PropValue>),
}

impl Atom {
    fn key(&self) -> Key {
        match self {
            Atom::Uid(_) => Key::Uid,
            Atom::Gid(_) => Key::Gid,
            Atom::Member(g) => Key::Member(g.clone()),
            Atom::Exe(_) => Key::Exe,
            Atom::ExeSha256(_) => Key::ExeSha256,
            Atom::Cgroup(_) => Key::Cgroup,
            Atom::LsmLabel(_) => Key::LsmLabel,
            Atom::Abi(_) => Key::Abi,
            Atom::Name(_) => Key::Name,
            Atom::Prop(k, _) => Key::Prop(k.clone()),
            Atom::Remote => Key::Remote,
            Atom::SanUri(u) => Key::SanUri(u.clone()),
            Atom::SanDns(d) => Key::SanDns(d.clone()),
            Atom::SubjectCn(_) => Key::SubjectCn,
        }
    }

    fn holds(&self, value: &Value) -> bool {
        let text = |set: &[String]| matches!(value, Value::Text(Some(v)) if set.contains(v));
        match (self, value) {
            (Atom::Uid(set) | Atom::Gid(set), Value::Num(v)) => set.contains(v),
            (Atom::Member(_) | Atom::Remote | Atom::SanUri(_) | Atom::SanDns(_), Value::Flag(b)) => *b,
            (Atom::Exe(set) | Atom::ExeSha256(set) | Atom::LsmLabel(set) | Atom::SubjectCn(set), _) => text(set),
            (Atom::Cgroup(set), Value::Text(Some(v))) => set.iter().any(|p| crate::grant::cgroup_within(v, p)),
            (Atom::Abi(set), Value::Abi(a)) => set.contains(a),
            (Atom::Name(n), Value::Text(Some(v))) => n == v,
            (Atom::Prop(_, m), Value::Prop(Some(v))) => m.matches(v),
            _ => false,
        }
    }
}

/// A formula in negation normal form.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Formula {
    True,
    False,
    Lit(bool, Atom),
    And(Vec<Formula>),
    Or(Vec<Formula>),
}

impl Formula {
    pub(crate) fn and(parts: Vec<Formula>) -> Formula {
        let mut out = Vec::new();
        for p in parts {
            match p {
                Formula::True => {}
                Formula::False => return Formula::False,
                Formula::And(inner) => out.extend(inner),
                other => out.push(other),
            }
        }
        match out.len() {
            0 => Formula::True,
            1 => out.pop().unwrap_or(Formula::True),
            _ => Formula::And(out),
        }
    }

    pub(crate) fn or(parts: Vec<Formula>) -> Formula {
        let mut out = Vec::new();
        for p in parts {
            match p {
                Formula::False => {}
                Formula::True => return Formula::True,
                Formula::Or(inner) => out.extend(inner),
                other => out.push(other),
            }
        }
        match out.len() {
            0 => Formula::False,
            1 => out.pop().unwrap_or(Formula::False),
            _ => Formula::Or(out),
        }
    }

    fn lit(atom: Atom) -> Formula {
        Formula::Lit(true, atom)
    }

    fn not(self) -> Formula {
        match self {
            Formula::True => Formula::False,
            Formula::False => Formula::True,
            Formula::Lit(b, a) => Formula::Lit(!b, a),
            Formula::And(parts) => Formula::or(parts.into_iter().map(Formula::not).collect()),
            Formula::Or(parts) => Formula::and(parts.into_iter().map(Formula::not).collect()),
        }
    }

    /// Every literal of the formula that reads `key`.
    fn lits_of<'f>(&'f self, key: &Key, out: &mut Vec<(bool, &'f Atom)>) {
        match self {
            Formula::True | Formula::False => {}
            Formula::Lit(b, a) if a.key() == *key => out.push((*b, a)),
            Formula::Lit(..) => {}
            Formula::And(parts) | Formula::Or(parts) => parts.iter().for_each(|p| p.lits_of(key, out)),
        }
    }

    /// The formula's value in a world (for generalising and checking witnesses).
    pub(crate) fn eval(&self, world: &World) -> bool {
        match self {
            Formula::True => true,
            Formula::False => false,
            Formula::Lit(b, a) => a.holds(&world.value(&a.key())) == *b,
            Formula::And(parts) => parts.iter().all(|p| p.eval(world)),
            Formula::Or(parts) => parts.iter().any(|p| p.eval(world)),
        }
    }
}

/// A concrete task and service: the answer the solver finds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct World {
    values: BTreeMap<Key, Value>,
    /// The attributes some atom constrained (the others are "anything").
    constrained: BTreeSet<Key>,
    /// The service class (fixed per question).
    pub class: String,
}

impl World {
    fn value(&self, key: &Key) -> Value {
        self.values.get(key).cloned().unwrap_or_else(|| default_value(key))
    }

    fn text(&self, key: &Key) -> Option<String> {
        match self.value(key) {
            Value::Text(t) => t,
            _ => None,
        }
    }

    /// The task's attributes as owned values; `task()` borrows from them.
    pub fn task_parts(&self) -> TaskParts {
        let num = |k: &Key| match self.value(k) {
            Value::Num(n) => n,
            _ => 0,
        };
        TaskParts {
            uid: num(&Key::Uid),
            gid: num(&Key::Gid),
            groups: self
                .values
                .iter()
                .filter_map(|(k, v)| match (k, v) {
                    (Key::Member(g), Value::Flag(true)) => Some(g.clone()),
                    _ => None,
                })
                .collect(),
            exe: self.text(&Key::Exe),
            exe_sha256: self.text(&Key::ExeSha256),
            cgroup: self.text(&Key::Cgroup),
            lsm_label: self.text(&Key::LsmLabel),
            abi: match self.value(&Key::Abi) {
                Value::Abi(a) => a,
                _ => AbiId::X86_64,
            },
            remote: (self.value(&Key::Remote) == Value::Flag(true)).then(|| {
                let named = |want: fn(&Key) -> Option<&String>| {
                    self.values
                        .iter()
                        .filter(|(_, v)| **v == Value::Flag(true))
                        .filter_map(|(k, _)| want(k).cloned())
                        .collect()
                };
                (
                    named(|k| if let Key::SanUri(u) = k { Some(u) } else { None }),
                    named(|k| if let Key::SanDns(d) = k { Some(d) } else { None }),
                    self.text(&Key::SubjectCn),
                )
            }),
        }
    }

    /// The service's name.
    pub fn service_name(&self) -> String {
        self.text(&Key::Name).unwrap_or_else(|| "any".into())
    }

    /// The service's properties.
    pub fn properties(&self) -> Properties {
        self.values
            .iter()
            .filter_map(|(k, v)| match (k, v) {
                (Key::Prop(name), Value::Prop(Some(p))) => Some((name.clone(), p.clone())),
                _ => None,
            })
            .collect()
    }

    /// The constrained attributes, as `uid=1000 groups=[wheel] …` for the task and
    /// `class=C name=N key=value` for the service.
    pub fn describe(&self) -> (String, String) {
        let parts = self.task_parts();
        let mut task = Vec::new();
        let mut members = Vec::new();
        let mut non_members = Vec::new();
        for key in &self.constrained {
            match key {
                Key::Uid => task.push(format!("uid={}", parts.uid)),
                Key::Gid => task.push(format!("gid={}", parts.gid)),
                Key::Member(g) => {
                    if parts.groups.contains(g) {
                        members.push(g.clone());
                    } else {
                        non_members.push(g.clone());
                    }
                }
                Key::Exe => task.push(format!("exe={}", show(parts.exe.as_deref()))),
                Key::ExeSha256 => task.push(format!("exe_sha256={}", show(parts.exe_sha256.as_deref()))),
                Key::Cgroup => task.push(format!("cgroup={}", show(parts.cgroup.as_deref()))),
                Key::LsmLabel => task.push(format!("lsm_label={}", show(parts.lsm_label.as_deref()))),
                Key::Abi => task.push(format!("abi={}", parts.abi)),
                Key::Remote if parts.remote.is_some() => task.push("TLS client".to_string()),
                Key::Remote => {}
                Key::SanUri(u) if self.value(key) == Value::Flag(true) => task.push(format!("san_uri={u}")),
                Key::SanDns(d) if self.value(key) == Value::Flag(true) => task.push(format!("san_dns={d}")),
                Key::SanUri(u) => task.push(format!("no san_uri {u}")),
                Key::SanDns(d) => task.push(format!("no san_dns {d}")),
                Key::SubjectCn => task.push(format!("cn={}", show(self.text(key).as_deref()))),
                Key::Name | Key::Prop(_) => {}
            }
        }
        if !members.is_empty() {
            task.push(format!("groups=[{}]", members.join(",")));
        }
        if !non_members.is_empty() {
            task.push(format!("not in groups [{}]", non_members.join(",")));
        }
        if task.is_empty() {
            let local = self.constrained.contains(&Key::Remote) && parts.remote.is_none();
            task.push(if local { "any local task" } else { "any task" }.into());
        }
        let mut service = vec![format!("class={}", self.class)];
        if self.constrained.contains(&Key::Name) {
            service.push(format!("name={}", self.service_name()));
        }
        for key in &self.constrained {
            if let Key::Prop(k) = key {
                match self.values.get(key) {
                    Some(Value::Prop(Some(v))) => service.push(format!("{k}={v}")),
                    _ => service.push(format!("no property {k}")),
                }
            }
        }
        (task.join(" "), service.join(" "))
    }
}

fn show(v: Option<&str>) -> String {
    v.map_or_else(|| "(unreadable)".into(), str::to_string)
}

/// The task of a [`World`], owned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskParts {
    /// Effective uid.
    pub uid: u32,
    /// Effective gid.
    pub gid: u32,
    /// Group names.
    pub groups: Vec<String>,
    /// Executable path.
    pub exe: Option<String>,
    /// Executable hash.
    pub exe_sha256: Option<String>,
    /// cgroup path.
    pub cgroup: Option<String>,
    /// LSM label.
    pub lsm_label: Option<String>,
    /// Declared ABI.
    pub abi: AbiId,
    /// For a TCP client: its certificate's SAN URIs, SAN DNS names and subject CN.
    pub remote: Option<(Vec<String>, Vec<String>, Option<String>)>,
}

impl TaskParts {
    /// The task, borrowing from these parts.
    pub fn task(&self) -> Task<'_> {
        Task {
            uid: self.uid,
            gid: self.gid,
            groups: &self.groups,
            exe: self.exe.as_deref(),
            abi: self.abi,
            exe_sha256: self.exe_sha256.as_deref(),
            cgroup: self.cgroup.as_deref(),
            lsm_label: self.lsm_label.as_deref(),
            remote: self.remote.as_ref().map(|(san_uri, san_dns, cn)| crate::Remote {
                san_uri,
                san_dns,
                subject_cn: cn.as_deref(),
            }),
        }
    }
}

fn default_value(key: &Key) -> Value {
    match key {
        Key::Uid | Key::Gid => Value::Num(1000),
        Key::Member(_) | Key::Remote | Key::SanUri(_) | Key::SanDns(_) => Value::Flag(false),
        Key::Abi => Value::Abi(AbiId::X86_64),
        Key::Prop(_) => Value::Prop(None),
        Key::Name => Value::Text(Some("any".into())),
        Key::Exe | Key::ExeSha256 | Key::Cgroup | Key::LsmLabel | Key::SubjectCn => Value::Text(None),
    }
}

/// A text no literal equals or starts with, built from `base`.
fn fresh_text(base: &str, literals: &[&str]) -> String {
    let mut candidate = base.to_string();
    while literals
        .iter()
        .any(|l| l.starts_with(candidate.as_str()) || candidate == *l)
    {
        candidate.push('~');
    }
    candidate
}

/// Values of `key` among which, if any value satisfies `lits`, one does.
fn candidates(key: &Key, lits: &[(bool, &Atom)]) -> Vec<Value> {
    let atoms = lits.iter().map(|(_, a)| *a);
    match key {
        Key::Uid | Key::Gid => {
            let used: BTreeSet<u32> = atoms
                .flat_map(|a| match a {
                    Atom::Uid(s) | Atom::Gid(s) => s.clone(),
                    _ => Vec::new(),
                })
                .collect();
            let fresh = (1000..=u32::MAX).find(|v| !used.contains(v)).unwrap_or(0);
            used.into_iter().chain([fresh]).map(Value::Num).collect()
        }
        Key::Member(_) | Key::Remote | Key::SanUri(_) | Key::SanDns(_) => vec![Value::Flag(true), Value::Flag(false)],
        Key::Abi => ABIS.iter().map(|a| Value::Abi(a.id)).collect(),
        Key::Exe | Key::ExeSha256 | Key::LsmLabel | Key::Cgroup | Key::Name | Key::SubjectCn => {
            let used: BTreeSet<String> = atoms
                .flat_map(|a| match a {
                    Atom::Exe(s) | Atom::ExeSha256(s) | Atom::LsmLabel(s) | Atom::Cgroup(s) | Atom::SubjectCn(s) => {
                        s.clone()
                    }
                    Atom::Name(n) => vec![n.clone()],
                    _ => Vec::new(),
                })
                .collect();
            let refs: Vec<&str> = used.iter().map(String::as_str).collect();
            let fresh = match key {
                Key::Exe => fresh_text("/usr/bin/unlisted", &refs),
                Key::Cgroup => fresh_text("/unlisted", &refs),
                Key::ExeSha256 => fresh_text("0", &refs),
                Key::Name => fresh_text("unlisted", &refs),
                _ => fresh_text("unlisted_t", &refs),
            };
            let mut out: Vec<Value> = used.into_iter().map(|v| Value::Text(Some(v))).collect();
            out.push(Value::Text(Some(fresh)));
            if *key != Key::Name {
                out.push(Value::Text(None));
            }
            out
        }
        Key::Prop(_) => {
            let mut values = Vec::new();
            let mut prefixes = Vec::new();
            for a in atoms {
                if let Atom::Prop(_, m) = a {
                    match m {
                        PropMatch::Eq(v) => values.push(v.clone()),
                        PropMatch::AnyOf(vs) => values.extend(vs.iter().cloned()),
                        PropMatch::Prefix(p) => prefixes.push(p.clone()),
                    }
                }
            }
            // A character no literal has: a prefix followed by it starts no longer literal.
            let texts: Vec<&str> = values
                .iter()
                .filter_map(|v| match v {
                    PropValue::Text(t) => Some(t.as_str()),
                    _ => None,
                })
                .chain(prefixes.iter().map(String::as_str))
                .collect();
            let unused = ['~', '#', '%', '\u{7f}', '\u{1}']
                .into_iter()
                .find(|c| texts.iter().all(|t| !t.contains(*c)))
                .unwrap_or('~');
            let mut out: Vec<Value> = vec![Value::Prop(None)];
            for p in prefixes.iter().chain([&String::new()]) {
                out.push(Value::Prop(Some(PropValue::Text(p.clone()))));
                out.push(Value::Prop(Some(PropValue::Text(format!("{p}{unused}")))));
            }
            out.extend(values.into_iter().map(|v| Value::Prop(Some(v))));
            out
        }
    }
}

/// The backtracking search.
struct Solver {
    /// Literals taken so far, in order (popped on backtrack).
    store: Vec<(bool, Atom)>,
    steps: u64,
}

/// What the store says of a formula.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Status {
    /// Cannot hold any more.
    Conflict,
    /// Holds whatever the free attributes become.
    Entailed,
    /// Either way.
    Open,
}

/// The search ran out of steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GaveUp;

impl Solver {
    fn consistent(&self, key: &Key) -> Option<Value> {
        Solver::consistent_in(&self.store, key)
    }

    /// A value of `key` satisfying every literal about it in `store`.
    fn consistent_in(store: &[(bool, Atom)], key: &Key) -> Option<Value> {
        let lits: Vec<(bool, &Atom)> = store
            .iter()
            .filter(|(_, a)| a.key() == *key)
            .map(|(b, a)| (*b, a))
            .collect();
        candidates(key, &lits)
            .into_iter()
            .find(|v| lits.iter().all(|(b, a)| a.holds(v) == *b))
    }

    /// Whether a literal can still hold, and whether it must, given the store.
    fn lit_status(&mut self, b: bool, atom: &Atom) -> Status {
        let key = atom.key();
        let can = |value: bool, store: &mut Vec<(bool, Atom)>| {
            store.push((value, atom.clone()));
            let ok = Solver::consistent_in(store, &key).is_some();
            store.pop();
            ok
        };
        let mut store = std::mem::take(&mut self.store);
        let (holds, fails) = (can(b, &mut store), can(!b, &mut store));
        self.store = store;
        match (holds, fails) {
            (false, _) => Status::Conflict,
            (true, false) => Status::Entailed,
            (true, true) => Status::Open,
        }
    }

    /// A formula's status given the store (conservative: `Open` when unsure).
    fn status(&mut self, f: &Formula) -> Status {
        match f {
            Formula::True => Status::Entailed,
            Formula::False => Status::Conflict,
            Formula::Lit(b, a) => self.lit_status(*b, a),
            Formula::And(parts) => {
                let mut all = Status::Entailed;
                for p in parts {
                    match self.status(p) {
                        Status::Conflict => return Status::Conflict,
                        Status::Open => all = Status::Open,
                        Status::Entailed => {}
                    }
                }
                all
            }
            Formula::Or(parts) => {
                let mut any = Status::Conflict;
                for p in parts {
                    match self.status(p) {
                        Status::Entailed => return Status::Entailed,
                        Status::Open => any = Status::Open,
                        Status::Conflict => {}
                    }
                }
                any
            }
        }
    }

    /// Finds an assignment satisfying every goal: literals and conjunctions are taken at once;
    /// then disjunctions are simplified against the store (alternatives that conflict dropped,
    /// disjunctions already entailed dropped, one alternative left: taken) and the one with the
    /// fewest alternatives is branched on.
    fn solve(&mut self, mut goals: Vec<Formula>) -> Result<bool, GaveUp> {
        loop {
            self.steps += 1;
            if self.steps > STEP_BUDGET {
                return Err(GaveUp);
            }
            if let Some(pos) = goals.iter().position(|g| !matches!(g, Formula::Or(_))) {
                match goals.swap_remove(pos) {
                    Formula::True => {}
                    Formula::False => return Ok(false),
                    Formula::And(parts) => goals.extend(parts),
                    Formula::Lit(b, atom) => {
                        let key = atom.key();
                        self.store.push((b, atom));
                        if self.consistent(&key).is_none() {
                            return Ok(false);
                        }
                    }
                    Formula::Or(_) => {}
                }
                continue;
            }
            // Only disjunctions left: simplify each against the store.
            let mut simplified = Vec::with_capacity(goals.len());
            for goal in goals.drain(..) {
                let Formula::Or(parts) = goal else { continue };
                let mut open = Vec::new();
                let mut entailed = false;
                for part in parts {
                    match self.status(&part) {
                        Status::Conflict => {}
                        Status::Entailed => {
                            entailed = true;
                            break;
                        }
                        Status::Open => open.push(part),
                    }
                }
                if !entailed {
                    simplified.push(open);
                }
            }
            if simplified.iter().any(Vec::is_empty) {
                return Ok(false);
            }
            if let Some(pos) = simplified.iter().position(|alts| alts.len() == 1) {
                let mut unit = simplified.swap_remove(pos);
                goals = simplified.into_iter().map(Formula::Or).collect();
                goals.extend(unit.pop());
                continue;
            }
            let Some((pos, _)) = simplified.iter().enumerate().min_by_key(|(_, alts)| alts.len()) else {
                return Ok(true);
            };
            let alternatives = simplified.swap_remove(pos);
            let rest: Vec<Formula> = simplified.into_iter().map(Formula::Or).collect();
            let mark = self.store.len();
            for alt in alternatives {
                let mut next = rest.clone();
                next.push(alt);
                if self.solve(next)? {
                    return Ok(true);
                }
                self.store.truncate(mark);
            }
            return Ok(false);
        }
    }

    fn world(&self, class: &str) -> World {
        let keys: BTreeSet<Key> = self.store.iter().map(|(_, a)| a.key()).collect();
        let mut world = World {
            class: class.to_string(),
            ..World::default()
        };
        for key in keys {
            if let Some(v) = self.consistent(&key) {
                world.values.insert(key.clone(), v);
            }
            world.constrained.insert(key);
        }
        world
    }
}

/// A world satisfying `formula` with the service of class `class`, if one exists.
pub(crate) fn solve(formula: Formula, class: &str) -> Result<Option<World>, GaveUp> {
    let mut solver = Solver {
        store: Vec::new(),
        steps: 0,
    };
    if !solver.solve(vec![formula.clone()])? {
        return Ok(None);
    }
    let mut world = solver.world(class);
    generalize(&mut world, &formula);
    Ok(Some(world))
}

/// Evaluations one generalisation may spend before it keeps what it has.
const GENERALIZE_BUDGET: usize = 20_000;

/// Frees the attributes the witness does not need: an attribute is reported as "anything" only
/// when the formula holds for **every** value of it — and of every attribute freed before it,
/// in every combination (atoms compare an attribute only with the literals they name, so a
/// literal of each and one value matching none stand for all its values). The search takes
/// the first value it finds; without this a witness could say "uid=0" where any task will do.
fn generalize(world: &mut World, formula: &Formula) {
    let mut freed: Vec<(Key, Vec<Value>)> = Vec::new();
    let mut spent = 0;
    for key in world.constrained.clone() {
        let mut lits = Vec::new();
        formula.lits_of(&key, &mut lits);
        let mut axes = freed.clone();
        axes.push((key.clone(), candidates(&key, &lits)));
        let combinations: usize = axes.iter().map(|(_, v)| v.len().max(1)).product();
        spent += combinations;
        if spent > GENERALIZE_BUDGET {
            break;
        }
        let mut trial = world.clone();
        let holds_everywhere = (0..combinations).all(|mut n| {
            for (k, values) in &axes {
                if let Some(v) = values.get(n % values.len().max(1)) {
                    trial.values.insert(k.clone(), v.clone());
                }
                n /= values.len().max(1);
            }
            formula.eval(&trial)
        });
        if holds_everywhere {
            freed.push(axes.pop().unwrap_or((key, Vec::new())));
        }
    }
    for (key, _) in freed {
        world.constrained.remove(&key);
    }
}

impl Policy {
    fn principal_formula(&self, index: usize) -> Formula {
        self.principals.get(index).map_or(Formula::False, |p| {
            let own = attrs_formula(p);
            let not = p.not.as_deref().map_or(Formula::True, |n| attrs_formula(n).not());
            Formula::and(vec![own, not])
        })
    }

    /// "Some principal of these matches the task".
    pub(crate) fn principals_formula(&self, indices: &[usize]) -> Formula {
        Formula::or(indices.iter().map(|&i| self.principal_formula(i)).collect())
    }

    /// "The rule applies" for a service of class `class`.
    pub(crate) fn applies_formula(&self, rule: &Rule, class: &str) -> Formula {
        Formula::and(vec![
            self.principals_formula(&rule.principals),
            service_formula(&rule.service, class),
        ])
    }

    fn any_applies(&self, class: &str, effect: Effect, pred: impl Fn(&Rule) -> bool) -> Formula {
        Formula::or(
            self.rules
                .iter()
                .filter(|r| r.effect == effect && pred(r))
                .map(|r| self.applies_formula(r, class))
                .collect(),
        )
    }

    /// "The request is allowed" (the reference evaluator's `allowed`), for a service of
    /// class `class`.
    pub(crate) fn allowed_formula(&self, class: &str, request: Request<'_>) -> Formula {
        let service_forbids: Vec<&Rule> = self.rules.iter().filter(|r| r.forbids_service()).collect();
        let allow_any = self.any_applies(class, Effect::Allow, |_| true);
        match request {
            Request::Open { exclusive } => {
                let none_forbids = Formula::and(
                    service_forbids
                        .iter()
                        .map(|r| self.applies_formula(r, class).not())
                        .collect(),
                );
                let mut parts = vec![none_forbids, allow_any];
                if exclusive {
                    let excl = |r: &Rule| r.open == Some(OpenPermission::Exclusive);
                    parts.push(self.any_applies(class, Effect::Forbid, excl).not());
                    parts.push(self.any_applies(class, Effect::Allow, excl));
                }
                Formula::and(parts)
            }
            Request::Method { .. } | Request::Memory { .. } => {
                // The first applicable service-wide forbid decides admission: enforced, it
                // refuses; audited, the evaluation goes on.
                let mut first_enforced = Vec::new();
                for (i, r) in service_forbids.iter().enumerate() {
                    if r.audit || self.audit {
                        continue;
                    }
                    let mut parts = vec![self.applies_formula(r, class)];
                    parts.extend(
                        service_forbids
                            .iter()
                            .take(i)
                            .map(|earlier| self.applies_formula(earlier, class).not()),
                    );
                    first_enforced.push(Formula::and(parts));
                }
                let mut parts = vec![Formula::or(first_enforced).not()];
                if !self.audit {
                    parts.push(allow_any);
                }
                match request {
                    Request::Method { name, privilege } => {
                        parts.push(
                            self.any_applies(class, Effect::Forbid, |r| r.methods.contains(name))
                                .not(),
                        );
                        parts.push(self.any_applies(class, Effect::Allow, |r| r.methods.contains(name)));
                        if let Some(p) = privilege {
                            let has = |r: &Rule| r.privileges.iter().any(|q| q == p);
                            parts.push(self.any_applies(class, Effect::Forbid, has).not());
                            parts.push(self.any_applies(class, Effect::Allow, has));
                        }
                    }
                    Request::Memory { name } => {
                        let has = |r: &Rule| r.memory.iter().any(|m| m == name);
                        parts.push(self.any_applies(class, Effect::Forbid, has).not());
                        parts.push(self.any_applies(class, Effect::Allow, has));
                    }
                    Request::Open { .. } => {}
                }
                Formula::and(parts)
            }
        }
    }

    /// The reference evaluator's decision in a world.
    pub(crate) fn decide(&self, world: &World, request: Request<'_>) -> Decision {
        let parts = world.task_parts();
        let props = world.properties();
        let name = world.service_name();
        let service = ServiceView {
            name: &name,
            class: &world.class,
            properties: &props,
        };
        self.evaluate(&parts.task(), &service, request)
    }
}

fn attrs_formula(p: &crate::model::Principal) -> Formula {
    // As `attrs_match`: the kind of task first, then that kind's attributes.
    let mut parts = vec![Formula::Lit(p.remote, Atom::Remote)];
    if p.remote {
        let some_of = |values: &[String], atom: fn(String) -> Atom| {
            Formula::or(values.iter().map(|v| Formula::lit(atom(v.clone()))).collect())
        };
        if !p.tls_san_uri.is_empty() {
            parts.push(some_of(&p.tls_san_uri, Atom::SanUri));
        }
        if !p.tls_san_dns.is_empty() {
            parts.push(some_of(&p.tls_san_dns, Atom::SanDns));
        }
        if !p.tls_subject_cn.is_empty() {
            parts.push(Formula::lit(Atom::SubjectCn(p.tls_subject_cn.clone())));
        }
        return Formula::and(parts);
    }
    let mut set = |nonempty: bool, atom: Atom| {
        if nonempty {
            parts.push(Formula::lit(atom));
        }
    };
    set(!p.uid.is_empty(), Atom::Uid(p.uid.clone()));
    set(!p.gid.is_empty(), Atom::Gid(p.gid.clone()));
    set(!p.exe.is_empty(), Atom::Exe(p.exe.clone()));
    set(!p.exe_sha256.is_empty(), Atom::ExeSha256(p.exe_sha256.clone()));
    set(!p.cgroup.is_empty(), Atom::Cgroup(p.cgroup.clone()));
    set(!p.lsm_label.is_empty(), Atom::LsmLabel(p.lsm_label.clone()));
    set(!p.abi.is_empty(), Atom::Abi(p.abi.clone()));
    if !p.groups.is_empty() {
        parts.push(Formula::or(
            p.groups.iter().map(|g| Formula::lit(Atom::Member(g.clone()))).collect(),
        ));
    }
    Formula::and(parts)
}

fn service_formula(m: &crate::model::ServiceMatch, class: &str) -> Formula {
    if m.class.as_deref().is_some_and(|c| c != class) {
        return Formula::False;
    }
    let mut parts: Vec<Formula> = m.name.iter().map(|n| Formula::lit(Atom::Name(n.clone()))).collect();
    parts.extend(
        m.properties
            .iter()
            .map(|(k, pm)| Formula::lit(Atom::Prop(k.clone(), pm.clone()))),
    );
    Formula::and(parts)
}

/// A request the analysis asks about, owned.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Question {
    /// Opening the service (shared or exclusive).
    Open {
        /// Exclusive rather than shared.
        exclusive: bool,
    },
    /// Calling a method, which requires `privilege`.
    Method {
        /// Method name.
        name: String,
        /// Privilege the method requires.
        privilege: Option<String>,
    },
    /// Mapping a memory type.
    Memory {
        /// Memory type name.
        name: String,
    },
}

impl Question {
    /// The question a request asks.
    pub fn of(request: Request<'_>) -> Question {
        match request {
            Request::Open { exclusive } => Question::Open { exclusive },
            Request::Method { name, privilege } => Question::Method {
                name: name.to_string(),
                privilege: privilege.map(str::to_string),
            },
            Request::Memory { name } => Question::Memory { name: name.to_string() },
        }
    }

    /// As a reference-evaluator request.
    pub fn request(&self) -> Request<'_> {
        match self {
            Question::Open { exclusive } => Request::Open { exclusive: *exclusive },
            Question::Method { name, privilege } => Request::Method {
                name,
                privilege: privilege.as_deref(),
            },
            Question::Memory { name } => Request::Memory { name },
        }
    }
}

impl std::fmt::Display for Question {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Question::Open { exclusive: false } => write!(f, "open"),
            Question::Open { exclusive: true } => write!(f, "open exclusive"),
            Question::Method {
                name,
                privilege: Some(p),
            } => write!(f, "method {name} (privilege {p})"),
            Question::Method { name, privilege: None } => write!(f, "method {name}"),
            Question::Memory { name } => write!(f, "map memory {name}"),
        }
    }
}

/// The classes and requests an analysis covers: the catalog's when there is one, else every name
/// the policies use plus one they don't.
pub(crate) struct Universe {
    pub(crate) classes: Vec<(String, Vec<Question>)>,
}

impl Universe {
    pub(crate) fn new(policies: &[&Policy], catalog: Option<&crate::Catalog>, extra: &[&Rule]) -> Universe {
        if let Some(catalog) = catalog
            && !catalog.classes.is_empty()
        {
            let classes = catalog
                .classes
                .iter()
                .map(|(class, names)| {
                    let mut qs = vec![Question::Open { exclusive: false }, Question::Open { exclusive: true }];
                    qs.extend(names.methods.iter().map(|m| Question::Method {
                        name: m.clone(),
                        privilege: names.method_privileges.get(m).cloned(),
                    }));
                    qs.extend(names.memory.iter().map(|m| Question::Memory { name: m.clone() }));
                    (class.clone(), qs)
                })
                .collect();
            return Universe { classes };
        }
        let rules: Vec<&Rule> = policies
            .iter()
            .flat_map(|p| p.rules.iter())
            .chain(extra.iter().copied())
            .collect();
        let mut classes: BTreeSet<String> = rules.iter().filter_map(|r| r.service.class.clone()).collect();
        classes.insert(fresh_text(
            "UnlistedClass",
            &classes.iter().map(String::as_str).collect::<Vec<_>>(),
        ));
        let mut methods: BTreeSet<String> = rules
            .iter()
            .flat_map(|r| match &r.methods {
                Methods::Named(n) => n.clone(),
                Methods::All => Vec::new(),
            })
            .collect();
        methods.insert(fresh_text(
            "unlisted_method",
            &methods.iter().map(String::as_str).collect::<Vec<_>>(),
        ));
        let privileges: BTreeSet<String> = rules.iter().flat_map(|r| r.privileges.iter().cloned()).collect();
        let memory: BTreeSet<String> = rules.iter().flat_map(|r| r.memory.iter().cloned()).collect();
        let mut qs = vec![Question::Open { exclusive: false }, Question::Open { exclusive: true }];
        for m in &methods {
            qs.push(Question::Method {
                name: m.clone(),
                privilege: None,
            });
            qs.extend(privileges.iter().map(|p| Question::Method {
                name: m.clone(),
                privilege: Some(p.clone()),
            }));
        }
        qs.extend(memory.iter().map(|m| Question::Memory { name: m.clone() }));
        Universe {
            classes: classes.into_iter().map(|c| (c, qs.clone())).collect(),
        }
    }
}

/// A request decided differently by two policies, with a task and service showing it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    /// The request.
    pub question: Question,
    /// A task and service for which the decision changes.
    pub world: World,
    /// The old policy's decision there.
    pub old: Decision,
    /// The new policy's decision there.
    pub new: Decision,
}

/// Why the analysis could not finish.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the analysis gave up on {class} / {question} after {STEP_BUDGET} steps")]
pub struct TooHard {
    /// The class being analysed.
    pub class: String,
    /// The request being analysed.
    pub question: Question,
}

/// Every change of decision between `old` and `new`: per class and request, one witness for
/// each allow rule (of either side) under which the decision flips.
pub fn diff(old: &Policy, new: &Policy, catalog: Option<&crate::Catalog>) -> Result<Vec<Change>, TooHard> {
    // Policies that say the same decide the same: nothing to search.
    if old.same_decisions_as(new) {
        return Ok(Vec::new());
    }
    let changed = changed_rules(old, new);
    let universe = Universe::new(&[old, new], catalog, &[]);
    let mut changes: Vec<Change> = Vec::new();
    let mut seen: BTreeMap<_, usize> = BTreeMap::new();
    for (class, questions) in &universe.classes {
        for question in questions {
            let request = question.request();
            let a_old = old.allowed_formula(class, request);
            let a_new = new.allowed_formula(class, request);
            // The same formula is the same decision in every world: most requests are untouched
            // by an edit (a rule's mode, constraints or rate are not in the formula at all).
            if a_old == a_new {
                continue;
            }
            let too_hard = |GaveUp| TooHard {
                class: class.clone(),
                question: question.clone(),
            };
            // Lost: allowed by old, not by new; gained: the other way round. Each side's
            // negation is built once per request, not once per rule.
            let (lost, gained) = (
                Formula::and(vec![a_old.clone(), a_new.clone().not()]),
                Formula::and(vec![a_new, a_old.not()]),
            );
            for (from, differs) in [(old, &lost), (new, &gained)] {
                // One search says whether the request changes at all (most do not); only then
                // is each changed allow rule asked for a witness under which it applies, so
                // that every pair of deciding rules the edits bring is reported.
                let Some(world) = solve(differs.clone(), class).map_err(too_hard)? else {
                    continue;
                };
                let mut worlds = vec![world];
                for rule in from
                    .rules
                    .iter()
                    .filter(|r| r.effect == Effect::Allow && changed.contains(r.id.as_str()))
                {
                    let f = Formula::and(vec![from.applies_formula(rule, class), differs.clone()]);
                    if let Some(world) = solve(f, class).map_err(too_hard)? {
                        worlds.push(world);
                    }
                }
                for world in worlds {
                    let (o, n) = (old.decide(&world, request), new.decide(&world, request));
                    if o.allowed == n.allowed {
                        continue;
                    }
                    // One change per request and pair of deciding rules, with the most general
                    // witness found for it (whatever order the rules are in).
                    let key = (class.clone(), question.clone(), o.rule.clone(), n.rule.clone());
                    match seen.get(&key) {
                        Some(&i) => {
                            if let Some(change) = changes.get_mut(i)
                                && world.constrained.len() < change.world.constrained.len()
                            {
                                change.world = world;
                            }
                        }
                        None => {
                            seen.insert(key, changes.len());
                            changes.push(Change {
                                question: question.clone(),
                                world,
                                old: o,
                                new: n,
                            });
                        }
                    }
                }
            }
        }
    }
    Ok(changes)
}

/// The ids of the rules that differ between two policies in what they say (present on one
/// side only, or written differently).
fn changed_rules<'p>(old: &'p Policy, new: &'p Policy) -> BTreeSet<&'p str> {
    let by_id = |p: &'p Policy| p.rules.iter().map(|r| (r.id.as_str(), r)).collect::<BTreeMap<_, _>>();
    let (a, b) = (by_id(old), by_id(new));
    a.keys()
        .chain(b.keys())
        .copied()
        .filter(|id| match (a.get(id), b.get(id)) {
            (Some(x), Some(y)) => !old.same_rule(x, new, y),
            _ => true,
        })
        .collect()
}

/// A principal that can reach a request through an allow rule: a task of it that is allowed,
/// and the decision there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reach {
    /// The principal's name.
    pub principal: String,
    /// The allow rule that grants the request and names the principal.
    pub via: String,
    /// A task of the principal, and the service, for which the request is allowed.
    pub world: World,
    /// The decision there (allowed, with the rule that decides it).
    pub decision: Decision,
}

impl Policy {
    /// `who-can`: for each allow rule that grants `request` on a service of class `class` (with
    /// this registry name, if given) and each principal it names, a task of that principal the
    /// policy allows it to — `sesearch --allow` for this policy. A principal whose every task a
    /// forbid (or a missing privilege) stops is not listed; neither is a refusal in audit mode,
    /// which lets the request through without allowing it.
    pub fn who_can(&self, class: &str, name: Option<&str>, request: Request<'_>) -> Result<Vec<Reach>, TooHard> {
        let question = Question::of(request);
        let allowed = self.allowed_formula(class, request);
        let service = name.map_or(Formula::True, |n| Formula::lit(Atom::Name(n.to_string())));
        let grants = |r: &Rule| match request {
            Request::Open { exclusive } => !exclusive || r.open == Some(OpenPermission::Exclusive),
            Request::Method { name, .. } => r.methods.contains(name),
            Request::Memory { name } => r.memory.iter().any(|m| m == name),
        };
        let mut out = Vec::new();
        for rule in self.rules.iter().filter(|r| r.effect == Effect::Allow && grants(r)) {
            for &index in &rule.principals {
                let f = Formula::and(vec![
                    self.principal_formula(index),
                    service_formula(&rule.service, class),
                    service.clone(),
                    allowed.clone(),
                ]);
                let found = solve(f, class).map_err(|GaveUp| TooHard {
                    class: class.to_string(),
                    question: question.clone(),
                })?;
                if let (Some(world), Some(principal)) = (found, self.principals.get(index)) {
                    let decision = self.decide(&world, request);
                    if decision.allowed {
                        out.push(Reach {
                            principal: principal.name.clone(),
                            via: rule.id.clone(),
                            world,
                            decision,
                        });
                    }
                }
            }
        }
        Ok(out)
    }
}

impl Assertion {
    /// Whether the assertion speaks of this request.
    fn covers(&self, question: &Question) -> bool {
        let s = &self.scope;
        let names_request = !s.methods.is_empty() || !s.privileges.is_empty() || !s.memory.is_empty();
        match question {
            Question::Open { exclusive } => match s.open {
                Some(OpenPermission::Exclusive) => *exclusive,
                Some(OpenPermission::Shared) => true,
                // Naming nothing else: the service may not be opened at all.
                None => !names_request && !exclusive,
            },
            Question::Method { name, privilege } => {
                s.methods.contains(name) || privilege.as_ref().is_some_and(|p| s.privileges.contains(p))
            }
            Question::Memory { name } => s.memory.contains(name),
        }
    }
}

impl Policy {
    /// Checks every `[[assert]]`: an error, located at the assertion, with a counterexample (a
    /// task, a service, the request and the rule that allows it) for each one that fails.
    pub(crate) fn check_assertions(&self, catalog: Option<&crate::Catalog>) -> Vec<SourceError> {
        if self.asserts.is_empty() {
            return Vec::new();
        }
        let scopes: Vec<&Rule> = self.asserts.iter().map(|a| &a.scope).collect();
        let universe = Universe::new(&[self], catalog, &scopes);
        let mut errors = Vec::new();
        for assertion in &self.asserts {
            let error = |message: String| SourceError {
                origin: assertion.origin.clone(),
                line: assertion.line,
                col: assertion.col,
                message,
            };
            let who = if assertion.every_task {
                Formula::True
            } else {
                self.principals_formula(&assertion.scope.principals)
            };
            'classes: for (class, questions) in &universe.classes {
                for question in questions.iter().filter(|q| assertion.covers(q)) {
                    let request = question.request();
                    let f = Formula::and(vec![
                        who.clone(),
                        service_formula(&assertion.scope.service, class),
                        self.allowed_formula(class, request),
                    ]);
                    match solve(f, class) {
                        Err(GaveUp) => {
                            errors.push(error(format!(
                                "assert {:?} could not be checked: the analysis gave up on {class} / {question} after {STEP_BUDGET} steps",
                                assertion.scope.id
                            )));
                            break 'classes;
                        }
                        Ok(None) => {}
                        Ok(Some(world)) => {
                            let decision = self.decide(&world, request);
                            let (task, service) = world.describe();
                            let why = assertion
                                .description
                                .as_deref()
                                .map(|d| format!(" ({d})"))
                                .unwrap_or_default();
                            errors.push(error(if decision.allowed {
                                format!(
                                    "assert {:?} fails{why}: rule {:?} allows {question} to {task} on {service}",
                                    assertion.scope.id, decision.rule
                                )
                            } else {
                                format!(
                                    "assert {:?}: internal error, the analysis and the evaluator disagree on {question} for {task} on {service}",
                                    assertion.scope.id
                                )
                            }));
                            break 'classes;
                        }
                    }
                }
            }
        }
        errors
    }
}

#[cfg(test)]
mod tests;
