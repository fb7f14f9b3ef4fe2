//! Parsing: TOML sources → a validated [`Policy`]. Once parsed, a policy holds no dangling
//! principal names, no duplicate ids and no unknown keys.

use std::{collections::BTreeMap, fmt, ops::Range};

use crate::args::{Constraint, RawConstraint};
use portcullis_proto::{
    layout::{ABIS, AbiId},
    property::PropValue,
};
use serde::Deserialize;

/// One policy source: where it came from (for error messages) and its text.
#[derive(Clone, Debug)]
pub struct Source<'a> {
    /// File path or other label shown in errors.
    pub origin: &'a str,
    /// TOML text.
    pub text: &'a str,
}

/// The names the drivers define, to check a policy against (from `portcullis schema`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Catalog {
    pub(crate) classes: BTreeMap<String, ClassNames>,
}

/// The names one driver class defines.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClassNames {
    /// Method names.
    pub methods: std::collections::BTreeSet<String>,
    /// Privileges its methods require.
    pub privileges: std::collections::BTreeSet<String>,
    /// Memory type names.
    pub memory: std::collections::BTreeSet<String>,
    /// The parameter names of each method (scalars, `len`, struct fields).
    pub params: BTreeMap<String, std::collections::BTreeSet<String>>,
    /// The privilege each method requires, for the methods that require one.
    pub method_privileges: BTreeMap<String, String>,
    /// The parameters of each method that are `char[N]` text fields (the others are integers).
    pub text_params: BTreeMap<String, std::collections::BTreeSet<String>>,
}

impl Catalog {
    /// Adds (or extends) a class.
    pub fn add(&mut self, class: &str, names: ClassNames) {
        let entry = self.classes.entry(class.to_string()).or_default();
        entry.methods.extend(names.methods);
        entry.privileges.extend(names.privileges);
        entry.memory.extend(names.memory);
        entry.method_privileges.extend(names.method_privileges);
        for (method, params) in names.params {
            entry.params.entry(method).or_default().extend(params);
        }
        for (method, params) in names.text_params {
            entry.text_params.entry(method).or_default().extend(params);
        }
    }
}

/// One error in one source, located to line and column.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SourceError {
    /// The source's origin.
    pub origin: String,
    /// 1-based line, 0 when the error has no location.
    pub line: usize,
    /// 1-based column, 0 when the error has no location.
    pub col: usize,
    /// What is wrong.
    pub message: String,
}

impl SourceError {
    /// `file:line:col`, or the file alone.
    pub fn place(&self) -> String {
        if self.line == 0 {
            self.origin.clone()
        } else {
            format!("{}:{}:{}", self.origin, self.line, self.col)
        }
    }
}

impl fmt::Display for SourceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.origin, self.message)
        } else {
            write!(f, "{}:{}:{}: {}", self.origin, self.line, self.col, self.message)
        }
    }
}

/// Why a policy could not be loaded: every error found, not just the first.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// One or more sources are invalid.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<SourceError>),
}

impl PolicyError {
    /// The individual errors.
    pub fn errors(&self) -> &[SourceError] {
        match self {
            PolicyError::Invalid(errors) => errors,
        }
    }
}

/// `allow` or `forbid`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Effect {
    /// Grants what the rule names.
    Allow,
    /// Refuses what the rule names, whatever any allow rule says.
    Forbid,
}

/// Whether refusals are enforced or only logged ("would deny").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Refusals refuse.
    Enforce,
    /// Refusals are allowed and logged as "would deny".
    Audit,
}

/// The open modes a rule speaks of.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OpenPermission {
    /// Shared opens only.
    Shared,
    /// Exclusive opens (and shared ones).
    Exclusive,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    /// `mode = "audit"`: the whole policy in audit mode.
    mode: Option<Mode>,
    #[serde(default)]
    principal: Vec<RawPrincipal>,
    #[serde(default)]
    rule: Vec<RawRule>,
    /// `[[assert]]`: what must never be allowed.
    #[serde(default, rename = "assert")]
    asserts: Vec<RawAssert>,
}

/// `[[assert]]`: no task matching `principals` (every task when omitted) may be allowed the
/// requests named, on any service matching `service`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAssert {
    id: toml::Spanned<String>,
    /// What the assertion protects, for the reader (and the error message).
    description: Option<String>,
    principals: Option<Vec<toml::Spanned<String>>>,
    #[serde(default)]
    service: RawServiceMatch,
    #[serde(default)]
    methods: Vec<toml::Spanned<String>>,
    open: Option<OpenPermission>,
    #[serde(default)]
    privileges: Vec<toml::Spanned<String>>,
    #[serde(default)]
    memory: Vec<toml::Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrincipal {
    name: toml::Spanned<String>,
    #[serde(default)]
    uid: Vec<u32>,
    #[serde(default)]
    gid: Vec<u32>,
    #[serde(default)]
    groups: Vec<String>,
    #[serde(default)]
    exe: Vec<String>,
    #[serde(default)]
    exe_sha256: Vec<toml::Spanned<String>>,
    #[serde(default)]
    cgroup: Vec<toml::Spanned<String>>,
    #[serde(default)]
    lsm_label: Vec<String>,
    #[serde(default)]
    abi: Vec<toml::Spanned<String>>,
    #[serde(default)]
    tls_san_uri: Vec<String>,
    #[serde(default)]
    tls_san_dns: Vec<String>,
    #[serde(default)]
    tls_subject_cn: Vec<String>,
    /// Tasks that match this block are excluded.
    not: Option<toml::Spanned<RawAttrs>>,
}

/// The attributes of a `not = { ... }` block: those of a principal, without name or nesting.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAttrs {
    #[serde(default)]
    uid: Vec<u32>,
    #[serde(default)]
    gid: Vec<u32>,
    #[serde(default)]
    groups: Vec<String>,
    #[serde(default)]
    exe: Vec<String>,
    #[serde(default)]
    exe_sha256: Vec<toml::Spanned<String>>,
    #[serde(default)]
    cgroup: Vec<toml::Spanned<String>>,
    #[serde(default)]
    lsm_label: Vec<String>,
    #[serde(default)]
    abi: Vec<toml::Spanned<String>>,
    #[serde(default)]
    tls_san_uri: Vec<String>,
    #[serde(default)]
    tls_san_dns: Vec<String>,
    #[serde(default)]
    tls_subject_cn: Vec<String>,
}

impl RawPrincipal {
    fn split(self) -> (toml::Spanned<String>, RawAttrs, Option<toml::Spanned<RawAttrs>>) {
        let attrs = RawAttrs {
            uid: self.uid,
            gid: self.gid,
            groups: self.groups,
            exe: self.exe,
            exe_sha256: self.exe_sha256,
            cgroup: self.cgroup,
            lsm_label: self.lsm_label,
            abi: self.abi,
            tls_san_uri: self.tls_san_uri,
            tls_san_dns: self.tls_san_dns,
            tls_subject_cn: self.tls_subject_cn,
        };
        (self.name, attrs, self.not)
    }
}

impl RawAttrs {
    fn is_empty(&self) -> bool {
        !self.has_local() && !self.has_tls()
    }

    fn has_tls(&self) -> bool {
        !self.tls_san_uri.is_empty() || !self.tls_san_dns.is_empty() || !self.tls_subject_cn.is_empty()
    }

    /// Local attributes (those of a task on this machine).
    fn has_local(&self) -> bool {
        !(self.uid.is_empty()
            && self.gid.is_empty()
            && self.groups.is_empty()
            && self.exe.is_empty()
            && self.exe_sha256.is_empty()
            && self.cgroup.is_empty()
            && self.lsm_label.is_empty()
            && self.abi.is_empty())
    }

    /// A principal that names a program (`exe`, `exe_sha256`) but no uid, gid, group, cgroup or
    /// LSM label: any user can run that program, or make its own process look like it
    /// (`LD_PRELOAD`, `exec` after connecting), so the principal admits everyone.
    fn exe_without_owner(&self) -> Option<&'static str> {
        let names_program = !self.exe.is_empty() || !self.exe_sha256.is_empty();
        let names_owner = !(self.uid.is_empty()
            && self.gid.is_empty()
            && self.groups.is_empty()
            && self.cgroup.is_empty()
            && self.lsm_label.is_empty());
        (names_program && !names_owner).then_some(
            "relies on exe/exe_sha256 alone: any user who can run that program, or make a process of their own look like it (LD_PRELOAD, exec after connecting), matches it. Also name a uid, gid, group, cgroup or lsm_label that an attacker cannot use (docs/POLICY.md, \"What an executable proves\")",
        )
    }

    /// The attributes as a (nameless) principal; errors go to `errors`.
    fn build(self, name: String, source: &Located<'_>, errors: &mut Vec<SourceError>) -> Principal {
        let mut abi = Vec::new();
        for n in &self.abi {
            match AbiId::by_name(n.get_ref()) {
                Some(id) => abi.push(id),
                None => errors.push(locate(
                    source,
                    Some(n.span()),
                    format!(
                        "unknown ABI {:?}{} (known: {})",
                        n.get_ref(),
                        did_you_mean(n.get_ref(), ABIS.iter().map(|a| a.name)),
                        ABIS.iter().map(|a| a.name).collect::<Vec<_>>().join(", ")
                    ),
                )),
            }
        }
        for h in &self.exe_sha256 {
            let hex = h.get_ref();
            if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
                errors.push(locate(
                    source,
                    Some(h.span()),
                    format!("exe_sha256 {hex:?} is not 64 lowercase hex digits"),
                ));
            }
        }
        for c in &self.cgroup {
            if !c.get_ref().starts_with('/') {
                errors.push(locate(
                    source,
                    Some(c.span()),
                    format!("cgroup {:?} must be an absolute path", c.get_ref()),
                ));
            }
        }
        let plain = |v: Vec<toml::Spanned<String>>| v.into_iter().map(toml::Spanned::into_inner).collect::<Vec<_>>();
        Principal {
            name,
            uid: self.uid,
            gid: self.gid,
            groups: self.groups,
            exe: self.exe,
            exe_sha256: plain(self.exe_sha256),
            cgroup: plain(self.cgroup)
                .into_iter()
                .map(|c| c.trim_end_matches('/').to_string())
                .collect(),
            lsm_label: self.lsm_label,
            abi,
            not: None,
            tls_san_uri: self.tls_san_uri,
            tls_san_dns: self.tls_san_dns,
            tls_subject_cn: self.tls_subject_cn,
            remote: false,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    id: toml::Spanned<String>,
    effect: Effect,
    principals: Vec<toml::Spanned<String>>,
    #[serde(default)]
    service: RawServiceMatch,
    #[serde(default)]
    methods: Vec<toml::Spanned<String>>,
    open: Option<OpenPermission>,
    #[serde(default)]
    privileges: Vec<toml::Spanned<String>>,
    #[serde(default)]
    memory: Vec<toml::Spanned<String>>,
    /// `rate = "N/s"` (or `/m`, `/h`): calls per user client.
    rate: Option<toml::Spanned<String>>,
    /// `mode = "audit"`: refusals this rule decides are logged, not enforced.
    mode: Option<Mode>,
    /// `args.METHOD.PARAM = { ... }`.
    #[serde(default)]
    args: BTreeMap<String, BTreeMap<toml::Spanned<String>, toml::Spanned<RawConstraint>>>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServiceMatch {
    class: Option<toml::Spanned<String>>,
    name: Option<String>,
    #[serde(default)]
    properties: BTreeMap<String, toml::Spanned<toml::Value>>,
}

/// Who a rule is about. Every attribute that is set must match; within one attribute, any listed
/// value matches. A principal with no attributes matches every local task.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Principal {
    pub(crate) name: String,
    pub(crate) uid: Vec<u32>,
    pub(crate) gid: Vec<u32>,
    pub(crate) groups: Vec<String>,
    pub(crate) exe: Vec<String>,
    /// SHA-256 of the executable, lowercase hex.
    pub(crate) exe_sha256: Vec<String>,
    /// cgroup paths: the task's cgroup is one of them or below one.
    pub(crate) cgroup: Vec<String>,
    /// LSM labels, exactly.
    pub(crate) lsm_label: Vec<String>,
    pub(crate) abi: Vec<AbiId>,
    /// A task matching this block is excluded.
    pub(crate) not: Option<Box<Principal>>,
    /// TLS certificate SAN URIs (any of).
    pub(crate) tls_san_uri: Vec<String>,
    /// TLS certificate SAN DNS names (any of).
    pub(crate) tls_san_dns: Vec<String>,
    /// TLS certificate subject common names (any of).
    pub(crate) tls_subject_cn: Vec<String>,
    /// A principal of TCP clients (it names certificate attributes, itself or in its `not`
    /// block): it matches only them, and a local principal never matches them.
    pub(crate) remote: bool,
}

/// Which services a rule is about; unset fields match anything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct ServiceMatch {
    pub(crate) class: Option<String>,
    pub(crate) name: Option<String>,
    pub(crate) properties: BTreeMap<String, PropMatch>,
}

/// How a rule (or a driver personality) matches one property.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PropMatch {
    /// `key = value`: equal.
    Eq(PropValue),
    /// `key = [a, b]` or `key = { any_of = [a, b] }`: equal to one of them.
    AnyOf(Vec<PropValue>),
    /// `key = { prefix = "04" }`: a text value starting with this.
    Prefix(String),
}

impl PropMatch {
    /// A property match as written in TOML: a value, a list of values, `{ prefix = "…" }` or
    /// `{ any_of = […] }`; `None` for anything else.
    pub fn parse(v: &toml::Value) -> Option<PropMatch> {
        prop_match(v)
    }

    /// Whether two matches can both hold for one value (complete: a `false` is a proof).
    pub fn overlaps(&self, other: &PropMatch) -> bool {
        let values = |m: &PropMatch| match m {
            PropMatch::Eq(v) => Some(vec![v.clone()]),
            PropMatch::AnyOf(vs) => Some(vs.clone()),
            PropMatch::Prefix(_) => None,
        };
        match (self, other) {
            (PropMatch::Prefix(a), PropMatch::Prefix(b)) => a.starts_with(b.as_str()) || b.starts_with(a.as_str()),
            (PropMatch::Prefix(_), m) => values(m).unwrap_or_default().iter().any(|v| self.matches(v)),
            (m, PropMatch::Prefix(_)) => values(m).unwrap_or_default().iter().any(|v| other.matches(v)),
            (a, b) => {
                let (a, b) = (values(a).unwrap_or_default(), values(b).unwrap_or_default());
                a.iter().any(|x| b.iter().any(|y| x.matches(y)))
            }
        }
    }

    /// Whether the value matches.
    pub fn matches(&self, have: &PropValue) -> bool {
        match self {
            PropMatch::Eq(v) => have.matches(v),
            PropMatch::AnyOf(values) => values.iter().any(|v| have.matches(v)),
            PropMatch::Prefix(p) => matches!(have, PropValue::Text(t) if t.starts_with(p.as_str())),
        }
    }
}

impl std::fmt::Display for PropMatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PropMatch::Eq(v) => write!(f, "{v}"),
            PropMatch::AnyOf(values) => write!(
                f,
                "one of [{}]",
                values.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
            ),
            PropMatch::Prefix(p) => write!(f, "a text starting with {p:?}"),
        }
    }
}

/// A property match as written: a value, a list of values, or `{ prefix }` / `{ any_of }`.
fn prop_match(v: &toml::Value) -> Option<PropMatch> {
    match v {
        toml::Value::Array(items) => items
            .iter()
            .map(prop_value)
            .collect::<Option<Vec<_>>>()
            .filter(|v| !v.is_empty())
            .map(PropMatch::AnyOf),
        toml::Value::Table(t) if t.len() == 1 => match (t.get("prefix"), t.get("any_of")) {
            (Some(toml::Value::String(p)), None) => Some(PropMatch::Prefix(p.clone())),
            (None, Some(list)) => prop_match(list).filter(|m| matches!(m, PropMatch::AnyOf(_))),
            _ => None,
        },
        other => prop_value(other).map(PropMatch::Eq),
    }
}

/// Methods a rule names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Methods {
    /// `"*"`: every method of the service.
    All,
    /// These names.
    Named(Vec<String>),
}

impl Methods {
    pub(crate) fn contains(&self, name: &str) -> bool {
        match self {
            Methods::All => true,
            Methods::Named(names) => names.iter().any(|n| n == name),
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        matches!(self, Methods::Named(names) if names.is_empty())
    }
}

/// A place in a policy source, kept by what lives as long as the policy (its file's name is
/// shared, not copied per rule).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Spot {
    pub(crate) origin: std::sync::Arc<str>,
    pub(crate) line: usize,
    pub(crate) col: usize,
}

impl Spot {
    /// An error or warning here.
    pub(crate) fn error(&self, message: String) -> SourceError {
        SourceError {
            origin: self.origin.to_string(),
            line: self.line,
            col: self.col,
            message,
        }
    }

    /// `file:line:col`.
    pub(crate) fn place(&self) -> String {
        self.error(String::new()).place()
    }
}

/// One rule, its principals resolved to indices into [`Policy::principals`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Rule {
    pub(crate) id: String,
    /// Where its id is written, for lints.
    pub(crate) at: Spot,
    pub(crate) effect: Effect,
    pub(crate) principals: Vec<usize>,
    pub(crate) service: ServiceMatch,
    pub(crate) methods: Methods,
    pub(crate) open: Option<OpenPermission>,
    pub(crate) privileges: Vec<String>,
    /// Memory types (clientMemoryForType) the rule allows or forbids mapping.
    pub(crate) memory: Vec<String>,
    /// Every driver-schema name the rule uses, with where it was written.
    pub(crate) names: Vec<NameUse>,
    /// Argument constraints on the methods this (allow) rule grants.
    pub(crate) args: Vec<ArgRule>,
    /// Calls a user client admitted under this rule may make, per period.
    pub(crate) rate: Option<Rate>,
    /// Refusals this rule decides are audited (allowed, logged as "would deny").
    pub(crate) audit: bool,
}

/// One argument constraint of a rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ArgRule {
    pub(crate) method: String,
    pub(crate) param: String,
    pub(crate) constraint: Constraint,
}

/// What kind of driver-schema name a rule uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum NameKind {
    Class,
    Method,
    Privilege,
    Memory,
    /// A parameter of the method named in `method`.
    Param,
}

/// One use of a driver-schema name, located for error messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct NameUse {
    pub(crate) kind: NameKind,
    /// Which of the rule's names of that kind it is: the class (0), or the `index`th method,
    /// privilege, memory type or argument constraint. A name is kept once, in the rule; a use
    /// only says where it was written (a big policy keeps one of these per name it uses).
    pub(crate) index: u32,
    /// Where it is written, in the rule's source.
    pub(crate) line: u32,
    pub(crate) col: u32,
}

impl Rule {
    /// The name a use stands for and, for a parameter, its method.
    pub(crate) fn name_of(&self, n: &NameUse) -> (&str, Option<&str>) {
        let i = n.index as usize;
        let none = ("", None);
        match n.kind {
            NameKind::Class => (self.service.class.as_deref().unwrap_or_default(), None),
            NameKind::Method => match &self.methods {
                Methods::Named(names) => names.get(i).map_or(none, |m| (m.as_str(), None)),
                Methods::All => none,
            },
            NameKind::Privilege => self.privileges.get(i).map_or(none, |p| (p.as_str(), None)),
            NameKind::Memory => self.memory.get(i).map_or(none, |m| (m.as_str(), None)),
            NameKind::Param => self
                .args
                .get(i)
                .map_or(none, |a| (a.param.as_str(), Some(a.method.as_str()))),
        }
    }

    /// An error about a use, at its place in the rule's source.
    fn error_at(&self, n: &NameUse, message: String) -> SourceError {
        SourceError {
            origin: self.at.origin.to_string(),
            line: n.line as usize,
            col: n.col as usize,
            message,
        }
    }

    /// A forbid rule that names no method, open mode or privilege forbids the whole service.
    pub(crate) fn forbids_service(&self) -> bool {
        self.effect == Effect::Forbid
            && self.methods.is_empty()
            && self.open.is_none()
            && self.privileges.is_empty()
            && self.memory.is_empty()
    }
}

/// A parsed, validated policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub(crate) principals: Vec<Principal>,
    /// Sorted by id (ids are unique).
    pub(crate) rules: Vec<Rule>,
    /// The whole policy is in audit mode: every refusal, default denies included, is audited.
    pub(crate) audit: bool,
    /// Assertions, checked at load.
    pub(crate) asserts: Vec<Assertion>,
    /// SHA-256 (hex) of the files' names and contents (see `revision`).
    pub(crate) revision: String,
    /// What is legal but probably not what the author meant (`policy check` prints these; the
    /// broker logs them when it loads the policy).
    pub(crate) warnings: Vec<SourceError>,
    /// Finds the rules about a task and a service without reading every rule.
    pub(crate) index: crate::index::RuleIndex,
}

impl Policy {
    /// Parses and validates sources, in order (a directory's files in lexical order). Principal
    /// names and rule ids are global across sources. Reports every error found.
    pub fn parse(sources: &[Source<'_>]) -> Result<Policy, PolicyError> {
        Policy::parse_checked(sources, None)
    }

    /// Parses like [`Policy::parse`] and, with a catalog, also checks every driver name the
    /// rules use (see [`Policy::check_names`]), reporting parse and name errors together.
    pub fn parse_checked(sources: &[Source<'_>], catalog: Option<&Catalog>) -> Result<Policy, PolicyError> {
        let mut errors = Vec::new();
        let mut warnings = Vec::new();
        let mut principals: Vec<Principal> = Vec::new();
        let mut raw_rules = Vec::new();
        let mut raw_asserts = Vec::new();
        let mut audit = false;
        let files: Vec<Located<'_>> = sources.iter().map(Located::new).collect();
        let mut principal_index: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
        let mut rule_ids: Ids = std::collections::HashMap::new();
        let mut principal_at: Ids = std::collections::HashMap::new();
        for source in &files {
            let raw: RawFile = match toml::from_str(source.text) {
                Ok(raw) => raw,
                Err(e) => {
                    errors.push(locate(
                        source,
                        e.span(),
                        format!("{}{}", e.message(), table_hint(source.text)),
                    ));
                    continue;
                }
            };
            audit |= raw.mode == Some(Mode::Audit);
            for p in raw.principal {
                if let Some(first) = principal_at.get(p.name.get_ref()) {
                    errors.push(locate(
                        source,
                        Some(p.name.span()),
                        format!("duplicate principal {:?} (first defined at {first})", p.name.get_ref()),
                    ));
                    continue;
                }
                principal_at.insert(
                    p.name.get_ref().clone(),
                    locate(source, Some(p.name.span()), String::new()).place(),
                );
                let (name, attrs, not) = p.split();
                let tls = attrs.has_tls() || not.as_ref().is_some_and(|n| n.get_ref().has_tls());
                let local = attrs.has_local() || not.as_ref().is_some_and(|n| n.get_ref().has_local());
                if tls && local {
                    errors.push(locate(
                        source,
                        Some(name.span()),
                        format!(
                            "principal {:?} mixes TLS certificate attributes with local ones: a TCP client has only a certificate, a local one has none",
                            name.get_ref()
                        ),
                    ));
                }
                if let Some(warning) = attrs.exe_without_owner() {
                    warnings.push(locate(
                        source,
                        Some(name.span()),
                        format!("warning: principal {:?} {warning}", name.get_ref()),
                    ));
                }
                if attrs.is_empty() && not.is_none() && !everyone_like(name.get_ref()) {
                    warnings.push(locate(
                        source,
                        Some(name.span()),
                        format!(
                            "warning: principal {:?} has no attributes, so it matches every task; if that is meant, say so in its name (everyone, any-local-task, ...)",
                            name.get_ref()
                        ),
                    ));
                }
                if let Some(relative) = attrs.exe.iter().find(|e| !e.starts_with('/')) {
                    warnings.push(locate(
                        source,
                        Some(name.span()),
                        format!(
                            "warning: principal {:?}: exe {relative:?} is not an absolute path, and never matches (the broker compares the absolute path of the program a task runs)",
                            name.get_ref()
                        ),
                    ));
                }
                let mut principal = attrs.build(name.into_inner(), source, &mut errors);
                principal.remote = tls;
                if let Some(not) = not {
                    let span = not.span();
                    let not = not.into_inner();
                    if not.is_empty() {
                        errors.push(locate(
                            source,
                            Some(span),
                            "an empty `not` block would exclude every task".into(),
                        ));
                    }
                    let mut not = not.build(String::new(), source, &mut errors);
                    not.remote = tls;
                    principal.not = Some(Box::new(not));
                }
                principal_index.insert(principal.name.clone(), principals.len());
                principals.push(principal);
            }
            raw_rules.extend(raw.rule.into_iter().map(|r| (source, r)));
            raw_asserts.extend(raw.asserts.into_iter().map(|a| (source, a)));
        }
        let known = Principals {
            index: &principal_index,
            all: &principals,
        };
        let mut rules: Vec<Rule> = raw_rules
            .into_iter()
            .map(|(source, r)| build_rule(source, r, "rule", &mut rule_ids, &known, &mut errors))
            .collect();
        // Every choice among rules is made in id order, never in file order: no decision, and
        // no rule a decision names, depends on the order of the rules or of the files.
        rules.sort_by(|a, b| a.id.cmp(&b.id));
        let mut assert_ids: Ids = std::collections::HashMap::new();
        let asserts: Vec<Assertion> = raw_asserts
            .into_iter()
            .map(|(source, a)| {
                let at = locate(source, Some(a.id.span()), String::new());
                let every_task = a.principals.is_none();
                let raw = RawRule {
                    id: a.id,
                    effect: Effect::Forbid,
                    principals: a.principals.unwrap_or_default(),
                    service: a.service,
                    methods: a.methods,
                    open: a.open,
                    privileges: a.privileges,
                    memory: a.memory,
                    rate: None,
                    mode: None,
                    args: BTreeMap::new(),
                };
                Assertion {
                    scope: build_rule(source, raw, "assert", &mut assert_ids, &known, &mut errors),
                    every_task,
                    description: a.description,
                    origin: at.origin,
                    line: at.line,
                    col: at.col,
                }
            })
            .collect();
        let index = crate::index::RuleIndex::build(&principals, &rules);
        let policy = Policy {
            index,
            principals,
            rules,
            audit,
            asserts,
            revision: revision(sources),
            warnings,
        };

        if let Some(catalog) = catalog {
            errors.extend(policy.check_names(catalog));
            if errors.is_empty() {
                errors.extend(policy.check_arg_kinds(catalog));
            }
        }
        if errors.is_empty() {
            errors.extend(policy.check_assertions(catalog));
        }
        if errors.is_empty() {
            Ok(policy)
        } else {
            Err(PolicyError::Invalid(errors))
        }
    }

    /// Constraints of the wrong kind for their parameter — `prefix`/`max_len` on an integer, a
    /// number range, `one_of` or `mask` on a `char[N]` text field — which would refuse every
    /// call at run time: load errors, located. A rule without a class is judged by the classes
    /// that have the parameter, when they agree on its kind.
    pub fn check_arg_kinds(&self, catalog: &Catalog) -> Vec<SourceError> {
        let mut errors = Vec::new();
        for rule in &self.rules {
            for (i, arg) in rule.args.iter().enumerate() {
                let classes: Vec<&ClassNames> = match rule.service.class.as_deref().and_then(|c| catalog.classes.get(c))
                {
                    Some(c) => vec![c],
                    None => catalog.classes.values().collect(),
                };
                let kinds: std::collections::BTreeSet<bool> = classes
                    .iter()
                    .filter(|c| c.params.get(&arg.method).is_some_and(|p| p.contains(&arg.param)))
                    .map(|c| c.text_params.get(&arg.method).is_some_and(|t| t.contains(&arg.param)))
                    .collect();
                let text_constraint = matches!(arg.constraint, crate::args::Constraint::Text { .. });
                let wrong = match kinds.iter().copied().collect::<Vec<_>>().as_slice() {
                    [is_text] => *is_text != text_constraint,
                    _ => false,
                };
                if !wrong {
                    continue;
                }
                let at = rule
                    .names
                    .iter()
                    .find(|n| n.kind == NameKind::Param && n.index as usize == i);
                let message = if text_constraint {
                    format!(
                        "rule {:?}: args.{}.{}: prefix and max_len constrain char[N] text fields; {} is an integer (use min/max, one_of or mask)",
                        rule.id, arg.method, arg.param, arg.param
                    )
                } else {
                    format!(
                        "rule {:?}: args.{}.{}: {} is a char[N] text field; constrain it with prefix and max_len",
                        rule.id, arg.method, arg.param, arg.param
                    )
                };
                errors.push(match at {
                    Some(n) => rule.error_at(n, message),
                    None => SourceError {
                        origin: rule.at.origin.to_string(),
                        line: 0,
                        col: 0,
                        message,
                    },
                });
            }
        }
        errors
    }

    /// Every driver-schema name the rules use that the catalog does not have: an unknown class,
    /// or a method, privilege or memory type its class (any class, when the rule names none)
    /// does not have. Each error is located and suggests the closest known name.
    pub fn check_names(&self, catalog: &Catalog) -> Vec<SourceError> {
        let mut errors = Vec::new();
        let scopes = (self.rules.iter().map(|r| ("rule", r))).chain(self.asserts.iter().map(|a| ("assert", &a.scope)));
        for (noun, rule) in scopes {
            let class = rule.service.class.as_deref().and_then(|c| catalog.classes.get(c));
            for n in &rule.names {
                let (name, method) = rule.name_of(n);
                let known: Vec<&str> = match n.kind {
                    NameKind::Class => catalog.classes.keys().map(String::as_str).collect(),
                    kind => {
                        let of = |c: &ClassNames| -> Vec<String> {
                            match kind {
                                NameKind::Method => c.methods.iter().cloned().collect(),
                                NameKind::Privilege => c.privileges.iter().cloned().collect(),
                                NameKind::Param => c
                                    .params
                                    .get(method.unwrap_or_default())
                                    .into_iter()
                                    .flatten()
                                    .cloned()
                                    .collect(),
                                _ => c.memory.iter().cloned().collect(),
                            }
                        };
                        let all: std::collections::BTreeSet<String> = match class {
                            Some(c) => of(c).into_iter().collect(),
                            None => catalog.classes.values().flat_map(of).collect(),
                        };
                        if all.contains(name) {
                            continue;
                        }
                        let subject = match kind {
                            NameKind::Method => format!("method {name:?}"),
                            NameKind::Privilege => format!("privilege {name:?}"),
                            NameKind::Param => {
                                format!("parameter {name:?} of {}", method.unwrap_or_default())
                            }
                            _ => format!("memory type {name:?}"),
                        };
                        // Only a class the catalog knows narrows the candidates.
                        let scope = match (class, rule.service.class.as_deref()) {
                            (Some(_), Some(c)) => format!("class {c}"),
                            _ => "any driver".to_string(),
                        };
                        errors.push(rule.error_at(
                            n,
                            format!(
                                "{noun} {:?}: {subject} is not in {scope}{}",
                                rule.id,
                                did_you_mean(name, all.iter().map(String::as_str))
                            ),
                        ));
                        continue;
                    }
                };
                if !known.contains(&name) {
                    errors.push(rule.error_at(
                        n,
                        format!(
                            "{noun} {:?}: class {name:?} is not a driver class{}",
                            rule.id,
                            did_you_mean(name, known.iter().copied())
                        ),
                    ));
                }
            }
        }
        errors
    }

    /// Whether the whole policy is in audit mode.
    pub fn is_audit(&self) -> bool {
        self.audit
    }

    /// Number of rules.
    pub fn rule_count(&self) -> usize {
        self.rules.len()
    }

    /// The policy's revision: SHA-256 (hex) of its sources, so that a decision-log record names
    /// the exact text that decided.
    pub fn revision(&self) -> &str {
        &self.revision
    }

    /// Whether `rule` of this policy says what `other` of policy `that` says: every field but
    /// where it is written, its principals compared by what they are (names included).
    pub(crate) fn same_rule(&self, rule: &Rule, that: &Policy, other: &Rule) -> bool {
        fn principals<'p>(p: &'p Policy, r: &Rule) -> Vec<&'p Principal> {
            let mut list: Vec<&Principal> = r.principals.iter().filter_map(|&i| p.principals.get(i)).collect();
            list.sort_by(|x, y| x.name.cmp(&y.name));
            list
        }
        rule.id == other.id
            && rule.effect == other.effect
            && rule.service == other.service
            && rule.methods == other.methods
            && rule.open == other.open
            && rule.privileges == other.privileges
            && rule.memory == other.memory
            && rule.args == other.args
            && rule.rate == other.rate
            && rule.audit == other.audit
            && principals(self, rule) == principals(that, other)
    }

    /// Whether two policies decide every request alike because they say the same: the same
    /// mode and the same rules (assertions decide nothing).
    pub(crate) fn same_decisions_as(&self, that: &Policy) -> bool {
        self.audit == that.audit
            && self.rules.len() == that.rules.len()
            && self
                .rules
                .iter()
                .zip(&that.rules)
                .all(|(a, b)| self.same_rule(a, that, b))
    }

    /// What changed between two policies besides decisions on requests: the whole policy's
    /// mode, and per rule (by id) its mode, argument constraints and rate; assertions added,
    /// removed or changed. One line each, `~` changed, `+` added, `-` removed.
    pub fn rule_changes(&self, new: &Policy) -> Vec<String> {
        let mode = |audit: bool| if audit { "audit" } else { "enforce" };
        let mut out = Vec::new();
        if self.audit != new.audit {
            out.push(format!("~ policy mode: {} -> {}", mode(self.audit), mode(new.audit)));
        }
        let by_id = |p: &Policy| {
            p.rules
                .iter()
                .map(|r| (r.id.clone(), r.clone()))
                .collect::<BTreeMap<_, _>>()
        };
        let (before, after) = (by_id(self), by_id(new));
        for (id, old) in &before {
            let Some(rule) = after.get(id) else { continue };
            if old.audit != rule.audit {
                out.push(format!(
                    "~ rule {id:?}: mode {} -> {}",
                    mode(old.audit),
                    mode(rule.audit)
                ));
            }
            let constraints = |r: &Rule| {
                r.args
                    .iter()
                    .map(|a| (format!("args.{}.{}", a.method, a.param), a.constraint.to_string()))
                    .collect::<BTreeMap<_, _>>()
            };
            let (was, now) = (constraints(old), constraints(rule));
            for key in was.keys().chain(now.keys()).collect::<std::collections::BTreeSet<_>>() {
                match (was.get(key), now.get(key)) {
                    (Some(a), Some(b)) if a != b => out.push(format!("~ rule {id:?}: {key} {a} -> {b}")),
                    (Some(a), None) => out.push(format!("~ rule {id:?}: {key} {a} removed")),
                    (None, Some(b)) => out.push(format!("~ rule {id:?}: {key} {b} added")),
                    _ => {}
                }
            }
            if old.rate != rule.rate {
                let show = |r: Option<Rate>| r.map_or_else(|| "none".to_string(), |r| r.to_string());
                out.push(format!("~ rule {id:?}: rate {} -> {}", show(old.rate), show(rule.rate)));
            }
        }
        let asserts = |p: &Policy| {
            p.asserts
                .iter()
                .map(|a| {
                    let mut scope = a.scope.clone();
                    scope.at = Spot::default();
                    scope.names.clear();
                    (a.scope.id.clone(), (scope, a.every_task, a.description.clone()))
                })
                .collect::<BTreeMap<_, _>>()
        };
        let (was, now) = (asserts(self), asserts(new));
        for id in was.keys().chain(now.keys()).collect::<std::collections::BTreeSet<_>>() {
            match (was.get(id), now.get(id)) {
                (Some(a), Some(b)) if a != b => out.push(format!("~ assertion {id:?} changed")),
                (Some(_), None) => out.push(format!("- assertion {id:?} removed")),
                (None, Some(_)) => out.push(format!("+ assertion {id:?} added")),
                _ => {}
            }
        }
        out
    }

    /// Whether the whole policy is in audit mode.
    pub fn audit_mode(&self) -> bool {
        self.audit
    }

    /// The rules' ids, in id order.
    pub fn rule_ids(&self) -> impl Iterator<Item = &str> {
        self.rules.iter().map(|r| r.id.as_str())
    }

    /// Number of `[[assert]]`s (all of which hold: a policy whose assertion fails is not loaded).
    pub fn assertion_count(&self) -> usize {
        self.asserts.len()
    }

    /// What is legal but probably not meant, located like errors.
    pub fn warnings(&self) -> &[SourceError] {
        &self.warnings
    }

    /// Whether any principal (or `not` block) names an `exe_sha256`: only then does the broker
    /// hash executables.
    pub fn uses_exe_sha256(&self) -> bool {
        self.index.uses_exe_sha256()
    }

    /// Whether any principal (or `not` block) names this executable path: only then does the
    /// broker check that the path, in its own mount namespace, is the file a task runs.
    pub fn names_exe(&self, path: &str) -> bool {
        self.index.names_exe(path)
    }
}

/// Whether a principal's name says that it matches every task.
fn everyone_like(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    ["every", "any", "all", "local-tasks", "local_tasks", "world", "public"]
        .iter()
        .any(|word| name.contains(word))
}

/// Ids (rules', assertions', principals' names) seen so far, with where each was first defined.
type Ids = std::collections::HashMap<String, String>;

/// A hint for a file that writes `[rule]` (one table) where `[[rule]]` (an entry of the array of
/// rules) is meant: TOML then reports only "duplicate key" or a type error.
fn table_hint(text: &str) -> String {
    let single = text
        .lines()
        .map(str::trim)
        .find(|l| matches!(*l, "[rule]" | "[principal]" | "[assert]"));
    match single {
        Some(table) => {
            let name = table.trim_matches(|c| c == '[' || c == ']');
            format!(" (hint: `{table}` declares one table; each {name} is `[[{name}]]`, with double brackets)")
        }
        None => String::new(),
    }
}

/// Where principals are looked up while rules are built.
struct Principals<'p> {
    index: &'p std::collections::HashMap<String, usize>,
    all: &'p [Principal],
}

/// Builds a rule (or, with `noun` "assert", an assertion's scope) from its raw form; errors go
/// to `errors`.
fn build_rule(
    source: &Located<'_>,
    r: RawRule,
    noun: &str,
    ids: &mut Ids,
    known: &Principals<'_>,
    errors: &mut Vec<SourceError>,
) -> Rule {
    let id = r.id.get_ref().clone();
    if id.trim().is_empty() {
        errors.push(locate(source, Some(r.id.span()), format!("{noun} id is empty")));
    } else if id == crate::DEFAULT_DENY {
        errors.push(locate(
            source,
            Some(r.id.span()),
            format!("{noun} id {id:?} is reserved"),
        ));
    } else if let Some(first) = ids.get(&id) {
        errors.push(locate(
            source,
            Some(r.id.span()),
            format!("duplicate {noun} id {id:?} (first defined at {first})"),
        ));
    } else {
        ids.insert(id.clone(), locate(source, Some(r.id.span()), String::new()).place());
    }
    let mut indices = Vec::new();
    if r.principals.is_empty() && noun == "rule" {
        errors.push(locate(
            source,
            Some(r.id.span()),
            format!("{noun} {id:?} names no principals"),
        ));
    }
    for name in &r.principals {
        match known.index.get(name.get_ref()).copied() {
            Some(i) => indices.push(i),
            None => errors.push(locate(
                source,
                Some(name.span()),
                format!(
                    "{noun} {id:?} names unknown principal {:?}{}",
                    name.get_ref(),
                    did_you_mean(name.get_ref(), known.all.iter().map(|p| p.name.as_str()))
                ),
            )),
        }
    }
    let mut properties = BTreeMap::new();
    for (key, value) in r.service.properties {
        match prop_match(value.get_ref()) {
            Some(m) => {
                properties.insert(key, m);
            }
            None => errors.push(locate(
                source,
                Some(value.span()),
                format!("property {key:?}: a string, integer or boolean, a list of them, {{ prefix = \"…\" }} or {{ any_of = [...] }}"),
            )),
        }
    }
    let mut names = Vec::new();
    let place = |span: std::ops::Range<usize>| {
        let (line, col) = source.line_col(span.start);
        (
            u32::try_from(line).unwrap_or(u32::MAX),
            u32::try_from(col).unwrap_or(u32::MAX),
        )
    };
    let mut used = |kind: NameKind, index: usize, name: &toml::Spanned<String>| {
        let (line, col) = place(name.span());
        names.push(NameUse {
            kind,
            index: u32::try_from(index).unwrap_or(u32::MAX),
            line,
            col,
        });
    };
    if let Some(class) = &r.service.class {
        used(NameKind::Class, 0, class);
    }
    let star = r.methods.iter().find(|m| m.get_ref() == "*").map(toml::Spanned::span);
    match &star {
        Some(span) if r.methods.len() > 1 => errors.push(locate(
            source,
            Some(span.clone()),
            format!("{noun} {id:?}: \"*\" grants every method; list the methods, or \"*\" alone"),
        )),
        Some(_) => {}
        None => r
            .methods
            .iter()
            .enumerate()
            .for_each(|(i, m)| used(NameKind::Method, i, m)),
    }
    r.privileges
        .iter()
        .enumerate()
        .for_each(|(i, p)| used(NameKind::Privilege, i, p));
    r.memory
        .iter()
        .enumerate()
        .for_each(|(i, m)| used(NameKind::Memory, i, m));
    let plain = |v: Vec<toml::Spanned<String>>| v.into_iter().map(toml::Spanned::into_inner).collect::<Vec<_>>();
    let methods = if star.is_some() {
        Methods::All
    } else {
        Methods::Named(plain(r.methods))
    };
    let mut args = Vec::new();
    for (method, params) in r.args {
        for (param, raw) in params {
            let at = locate(source, Some(raw.span()), String::new());
            if r.effect == Effect::Forbid {
                errors.push(SourceError {
                    message: format!("rule {id:?}: argument constraints belong on allow rules"),
                    ..at
                });
                continue;
            }
            if !methods.contains(&method) {
                errors.push(SourceError {
                    message: format!("rule {id:?}: args.{method} constrains a method the rule does not grant"),
                    ..at
                });
                continue;
            }
            match raw.into_inner().parse() {
                Ok(constraint) => {
                    let (line, col) = place(param.span());
                    names.push(NameUse {
                        kind: NameKind::Param,
                        index: u32::try_from(args.len()).unwrap_or(u32::MAX),
                        line,
                        col,
                    });
                    args.push(ArgRule {
                        method: method.clone(),
                        param: param.into_inner(),
                        constraint,
                    });
                }
                Err(why) => errors.push(SourceError {
                    message: format!("rule {id:?}: args.{method}.{}: {why}", param.get_ref()),
                    ..at
                }),
            }
        }
    }
    let rate = match r.rate {
        None => None,
        Some(text) => match parse_rate(text.get_ref()) {
            Ok(_) if r.effect == Effect::Forbid => {
                errors.push(locate(
                    source,
                    Some(text.span()),
                    format!("rule {id:?}: rate limits belong on allow rules"),
                ));
                None
            }
            Ok(rate) => Some(rate),
            Err(why) => {
                errors.push(locate(source, Some(text.span()), format!("rule {id:?}: {why}")));
                None
            }
        },
    };
    Rule {
        at: source.spot(r.id.span().start),
        id,
        effect: r.effect,
        principals: indices,
        service: ServiceMatch {
            class: r.service.class.map(toml::Spanned::into_inner),
            name: r.service.name,
            properties,
        },
        methods,
        open: r.open,
        privileges: plain(r.privileges),
        memory: plain(r.memory),
        names,
        args,
        rate,
        audit: r.mode == Some(Mode::Audit),
    }
}

/// `[[assert]]`: no task matching the scope's principals (every task, with `every_task`) may be
/// allowed what the scope names on a service it matches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Assertion {
    /// Id, principals, service and requests, in a rule's shape.
    pub(crate) scope: Rule,
    pub(crate) every_task: bool,
    pub(crate) description: Option<String>,
    pub(crate) origin: String,
    pub(crate) line: usize,
    pub(crate) col: usize,
}

/// The policy's revision: SHA-256 over each file's name and contents, in name order. The name
/// is the last component of the origin — a file's own name, which for a policy directory is its
/// name relative to that directory — so the revision depends on what the policy says and how
/// its files are named, never on how the path to it is spelled or where it is.
fn revision(sources: &[Source<'_>]) -> String {
    use sha2::{Digest, Sha256};
    let mut named: Vec<(&str, &str)> = sources
        .iter()
        .map(|s| {
            let name = std::path::Path::new(s.origin)
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or(s.origin);
            (name, s.text)
        })
        .collect();
    named.sort();
    let mut hash = Sha256::new();
    for (name, text) in named {
        for part in [name, text] {
            hash.update((part.len() as u64).to_le_bytes());
            hash.update(part.as_bytes());
        }
    }
    hash.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// A rate limit: `calls` per `seconds`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    /// Calls allowed per period (also the burst).
    pub calls: u32,
    /// The period, in seconds.
    pub seconds: u32,
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.seconds {
            1 => write!(f, "{}/s", self.calls),
            60 => write!(f, "{}/m", self.calls),
            3600 => write!(f, "{}/h", self.calls),
            s => write!(f, "{} per {s} s", self.calls),
        }
    }
}

impl Rate {
    /// Calls per second.
    pub fn per_second(self) -> f64 {
        f64::from(self.calls) / f64::from(self.seconds)
    }

    /// Whether this rate is tighter than `other`.
    pub(crate) fn tighter_than(self, other: Rate) -> bool {
        u64::from(self.calls) * u64::from(other.seconds) < u64::from(other.calls) * u64::from(self.seconds)
    }
}

/// `"N/s"`, `"N/m"` or `"N/h"`.
fn parse_rate(text: &str) -> Result<Rate, String> {
    let bad = || format!("rate {text:?} is not N/s, N/m or N/h with N a positive whole number");
    let (n, unit) = text.split_once('/').ok_or_else(bad)?;
    let n: u32 = n.trim().parse().map_err(|_| bad())?;
    let seconds = match unit.trim() {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ => return Err(bad()),
    };
    if n == 0 {
        return Err(bad());
    }
    Ok(Rate { calls: n, seconds })
}

/// A property value as written in TOML: a string, an integer or a boolean.
pub fn prop_value(v: &toml::Value) -> Option<PropValue> {
    match v {
        toml::Value::String(s) => Some(PropValue::Text(s.clone())),
        toml::Value::Integer(i) => Some(u64::try_from(*i).map_or(PropValue::Signed(*i), PropValue::Unsigned)),
        toml::Value::Boolean(b) => Some(PropValue::Flag(*b)),
        _ => None,
    }
}

/// A source with the offsets its lines start at, to locate errors in O(log n).
struct Located<'a> {
    origin: &'a str,
    /// The origin once, shared by every spot in the source.
    shared: std::sync::Arc<str>,
    text: &'a str,
    line_starts: Vec<usize>,
}

impl<'a> Located<'a> {
    fn new(source: &Source<'a>) -> Located<'a> {
        let line_starts = std::iter::once(0)
            .chain(source.text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        Located {
            origin: source.origin,
            shared: source.origin.into(),
            text: source.text,
            line_starts,
        }
    }

    /// Where a byte offset is.
    fn spot(&self, offset: usize) -> Spot {
        let (line, col) = self.line_col(offset);
        Spot {
            origin: self.shared.clone(),
            line,
            col,
        }
    }

    /// 1-based line and column (in characters) of a byte offset.
    fn line_col(&self, offset: usize) -> (usize, usize) {
        let line = self.line_starts.partition_point(|start| *start <= offset).max(1);
        let start = self.line_starts.get(line - 1).copied().unwrap_or(0);
        let col = self.text.get(start..offset).map_or(0, |l| l.chars().count()) + 1;
        (line, col)
    }
}

/// An error at a byte span of a source's text, located to line and column.
pub fn locate_in(origin: &str, text: &str, span: Option<Range<usize>>, message: String) -> SourceError {
    locate(&Located::new(&Source { origin, text }), span, message)
}

fn locate(source: &Located<'_>, span: Option<Range<usize>>, message: String) -> SourceError {
    let (line, col) = span.map_or((0, 0), |s| source.line_col(s.start));
    SourceError {
        origin: source.origin.to_string(),
        line,
        col,
        message,
    }
}

/// `" (did you mean \"x\"?)"` for the closest candidate within a small edit distance.
pub fn did_you_mean<'a>(name: &str, candidates: impl Iterator<Item = &'a str>) -> String {
    candidates
        .map(|c| (edit_distance(name, c), c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 4))
        .min()
        .map(|(_, c)| format!(" (did you mean {c:?}?)"))
        .unwrap_or_default()
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = Vec::with_capacity(b.len() + 1);
        cur.push(i + 1);
        for (j, cb) in b.iter().enumerate() {
            let sub = prev.get(j).copied().unwrap_or(0) + usize::from(ca != *cb);
            let del = prev.get(j + 1).copied().unwrap_or(0) + 1;
            let ins = cur.last().copied().unwrap_or(0) + 1;
            cur.push(sub.min(del).min(ins));
        }
        prev = cur;
    }
    prev.last().copied().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Policy, PolicyError> {
        Policy::parse(&[Source { origin: "p.toml", text }])
    }

    #[test]
    fn parse_unknown_principal_is_located_with_suggestion() {
        let err = parse("[[principal]]\nname = \"dialout\"\n\n[[rule]]\nid = \"r\"\neffect = \"allow\"\nprincipals = [\"dialuot\"]\n").unwrap_err();
        let e = &err.errors()[0];
        assert_eq!((e.line, e.col), (7, 15));
        assert!(e.message.contains("did you mean \"dialout\""), "{e}");
    }

    #[test]
    fn exe_principal_without_an_owner_is_warned_about_and_with_one_is_not() {
        let policy = parse("[[principal]]\nname = \"minicom\"\nexe = [\"/usr/bin/minicom\"]\n\n[[principal]]\nname = \"hashed\"\nexe_sha256 = [\"0000000000000000000000000000000000000000000000000000000000000000\"]\nnot = { uid = [0] }\n\n[[principal]]\nname = \"owned\"\nexe = [\"/usr/bin/minicom\"]\ngroups = [\"dialout\"]\n").unwrap();
        let warnings: Vec<String> = policy.warnings().iter().map(ToString::to_string).collect();
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(
            warnings[0].starts_with("p.toml:2:8: warning: principal \"minicom\" relies on exe/exe_sha256 alone"),
            "{warnings:?}"
        );
        assert!(warnings[1].contains("\"hashed\""), "{warnings:?}");
        assert!(policy.names_exe("/usr/bin/minicom"));
        assert!(!policy.names_exe("/usr/bin/other"));
        assert!(policy.uses_exe_sha256());
        assert!(
            !parse("[[principal]]\nname = \"a\"\nuid = [1]\n")
                .unwrap()
                .uses_exe_sha256()
        );
    }

    #[test]
    fn parse_reports_every_error_not_just_the_first() {
        let err = parse("[[principal]]\nname = \"a\"\n[[rule]]\nid = \"r\"\neffect = \"allow\"\nprincipals = [\"x\"]\n[[rule]]\nid = \"r\"\neffect = \"allow\"\nprincipals = [\"y\"]\n").unwrap_err();
        assert_eq!(err.errors().len(), 3, "{err}");
    }

    #[test]
    fn parse_unknown_key_is_refused_with_location() {
        let err = parse("[[rule]]\nid = \"r\"\neffect = \"allow\"\nprincipals = []\nmethod = [\"x\"]\n").unwrap_err();
        let e = &err.errors()[0];
        assert_eq!(e.line, 5, "{e}");
        assert!(e.message.contains("unknown field"), "{e}");
    }

    #[test]
    fn parse_bad_effect_is_refused() {
        assert!(
            parse("[[principal]]\nname=\"a\"\n[[rule]]\nid = \"r\"\neffect = \"permit\"\nprincipals = [\"a\"]\n")
                .is_err()
        );
    }

    #[test]
    fn the_revision_is_the_files_names_and_contents_never_the_path_spelling() {
        let text = "[[principal]]\nname = \"a\"\n";
        let at = |origin: &str| {
            Policy::parse(&[Source { origin, text }])
                .unwrap()
                .revision()
                .to_string()
        };
        let one = at("lab.toml");
        for spelling in ["./lab.toml", "/etc/portcullis/lab.toml", "../x/./lab.toml"] {
            assert_eq!(at(spelling), one, "{spelling}");
        }
        assert_ne!(at("other.toml"), one, "a file's name is part of the policy");
        let changed = Policy::parse(&[Source {
            origin: "lab.toml",
            text: "[[principal]]\nname = \"b\"\n",
        }])
        .unwrap();
        assert_ne!(changed.revision(), one);
    }

    #[test]
    fn parse_duplicate_principal_across_sources_is_refused() {
        let a = "[[principal]]\nname = \"a\"\n";
        let err = Policy::parse(&[
            Source {
                origin: "1.toml",
                text: a,
            },
            Source {
                origin: "2.toml",
                text: a,
            },
        ])
        .unwrap_err();
        assert_eq!(err.errors()[0].origin, "2.toml");
    }

    #[test]
    fn parse_reserved_rule_id_is_refused() {
        assert!(
            parse(
                "[[principal]]\nname=\"a\"\n[[rule]]\nid = \"default deny\"\neffect = \"allow\"\nprincipals = [\"a\"]\n"
            )
            .is_err()
        );
    }

    #[test]
    fn line_col_counts_characters() {
        let text = "ab\ncé x\n\nz";
        let located = Located::new(&Source { origin: "t", text });
        assert_eq!(located.line_col(7), (2, 4));
        assert_eq!(located.line_col(0), (1, 1));
        assert_eq!(located.line_col(3), (2, 1));
        assert_eq!(located.line_col(9), (3, 1));
        assert_eq!(located.line_col(10), (4, 1));
    }
}

#[cfg(test)]
mod catalog_tests {
    use super::*;

    fn catalog() -> Catalog {
        let mut c = Catalog::default();
        c.add(
            "SampleDevice",
            ClassNames {
                methods: ["add", "reset"].map(String::from).into(),
                privileges: ["sample.admin"].map(String::from).into(),
                memory: ["dma"].map(String::from).into(),
                params: [("add".to_string(), ["a", "b"].map(String::from).into())].into(),
                method_privileges: [("reset".to_string(), "sample.admin".to_string())].into(),
                text_params: [("add".to_string(), ["b"].map(String::from).into())].into(),
            },
        );
        c
    }

    #[test]
    fn a_constraint_of_the_wrong_kind_is_a_load_error() {
        let rule = |arg: &str| {
            format!(
                "[[principal]]\nname = \"everyone\"\n[[rule]]\nid = \"r\"\neffect = \"allow\"\nprincipals = [\"everyone\"]\nservice = {{ class = \"SampleDevice\" }}\nmethods = [\"add\"]\n{arg}\n"
            )
        };
        for (arg, says) in [
            ("args.add.a = { prefix = \"x\" }", "a is an integer"),
            ("args.add.b = { max = 3 }", "b is a char[N] text field"),
        ] {
            let text = rule(arg);
            let err = Policy::parse_checked(
                &[Source {
                    origin: "p.toml",
                    text: &text,
                }],
                Some(&catalog()),
            )
            .unwrap_err();
            let e = err.errors()[0].to_string();
            assert!(e.starts_with("p.toml:9:10:") && e.contains(says), "{e}");
        }
        for fine in ["args.add.a = { max = 3 }", "args.add.b = { prefix = \"x\" }"] {
            let text = rule(fine);
            assert!(
                Policy::parse_checked(
                    &[Source {
                        origin: "p.toml",
                        text: &text
                    }],
                    Some(&catalog())
                )
                .is_ok(),
                "{fine}"
            );
        }
    }

    #[test]
    fn star_mixed_with_method_names_is_a_load_error() {
        let text = "[[principal]]\nname = \"a\"\n[[rule]]\nid = \"r\"\neffect = \"allow\"\nprincipals = [\"a\"]\nservice = { class = \"SampleDevice\" }\nmethods = [\"ad\", \"*\"]\n";
        let err = Policy::parse(&[Source { origin: "p.toml", text }]).unwrap_err();
        let e = err.errors()[0].to_string();
        assert!(e.starts_with("p.toml:8:18:") && e.contains("\"*\" alone"), "{e}");
        let alone = text.replace("[\"ad\", \"*\"]", "[\"*\"]");
        assert!(
            Policy::parse(&[Source {
                origin: "p.toml",
                text: &alone
            }])
            .is_ok()
        );
    }

    #[test]
    fn check_names_finds_typos_with_location_and_suggestion() {
        let text = "[[principal]]\nname = \"a\"\n[[rule]]\nid = \"r\"\neffect = \"allow\"\nprincipals = [\"a\"]\nservice = { class = \"SampleDevise\" }\nmethods = [\"ad\"]\nprivileges = [\"sample.admn\"]\nmemory = [\"dma\", \"dmx\"]\n";
        let p = Policy::parse(&[Source { origin: "p.toml", text }]).unwrap();
        let errors = p.check_names(&catalog());
        let rendered: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(errors.len(), 4, "{rendered:#?}");
        assert!(
            rendered[0].starts_with("p.toml:7:21: rule \"r\": class \"SampleDevise\""),
            "{}",
            rendered[0]
        );
        assert!(rendered[0].contains("did you mean \"SampleDevice\""));
        assert!(
            rendered[1].contains("method \"ad\"") && rendered[1].contains("did you mean \"add\""),
            "{}",
            rendered[1]
        );
        assert!(rendered[2].contains("privilege \"sample.admn\""), "{}", rendered[2]);
        assert!(
            rendered[3].starts_with("p.toml:10:18:") && rendered[3].contains("did you mean \"dma\""),
            "{}",
            rendered[3]
        );
    }

    #[test]
    fn check_names_accepts_known_names_in_any_class() {
        let text = "[[principal]]\nname = \"a\"\n[[rule]]\nid = \"r\"\neffect = \"allow\"\nprincipals = [\"a\"]\nmethods = [\"reset\"]\nmemory = [\"dma\"]\n";
        let p = Policy::parse(&[Source { origin: "p.toml", text }]).unwrap();
        assert!(p.check_names(&catalog()).is_empty());
    }
}
