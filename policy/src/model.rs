//! Parsing: TOML sources → a validated [`Policy`]. Once parsed, a policy holds no dangling
//! principal names, no duplicate ids and no unknown keys.

use std::{collections::BTreeMap, fmt, ops::Range};

use portcullis_proto::{
    layout::{ABIS, AbiId},
    property::{PropValue, Properties},
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

/// One error in one source, located to line and column.
#[derive(Clone, Debug, PartialEq, Eq)]
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
    #[serde(default)]
    principal: Vec<RawPrincipal>,
    #[serde(default)]
    rule: Vec<RawRule>,
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
    abi: Vec<toml::Spanned<String>>,
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
    methods: Vec<String>,
    open: Option<OpenPermission>,
    #[serde(default)]
    privileges: Vec<String>,
    #[serde(default)]
    memory: Vec<String>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServiceMatch {
    class: Option<String>,
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
    pub(crate) abi: Vec<AbiId>,
}

/// Which services a rule is about; unset fields match anything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct ServiceMatch {
    pub(crate) class: Option<String>,
    pub(crate) name: Option<String>,
    pub(crate) properties: Properties,
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

    fn is_empty(&self) -> bool {
        matches!(self, Methods::Named(names) if names.is_empty())
    }
}

/// One rule, its principals resolved to indices into [`Policy::principals`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Rule {
    pub(crate) id: String,
    pub(crate) effect: Effect,
    pub(crate) principals: Vec<usize>,
    pub(crate) service: ServiceMatch,
    pub(crate) methods: Methods,
    pub(crate) open: Option<OpenPermission>,
    pub(crate) privileges: Vec<String>,
    /// Memory types (clientMemoryForType) the rule allows or forbids mapping.
    pub(crate) memory: Vec<String>,
}

impl Rule {
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
    pub(crate) rules: Vec<Rule>,
}

impl Policy {
    /// Parses and validates sources, in order (a directory's files in lexical order). Principal
    /// names and rule ids are global across sources. Reports every error found.
    pub fn parse(sources: &[Source<'_>]) -> Result<Policy, PolicyError> {
        let mut errors = Vec::new();
        let mut principals: Vec<Principal> = Vec::new();
        let mut raw_rules = Vec::new();
        for source in sources {
            let raw: RawFile = match toml::from_str(source.text) {
                Ok(raw) => raw,
                Err(e) => {
                    errors.push(locate(source, e.span(), e.message().to_string()));
                    continue;
                }
            };
            for p in raw.principal {
                if principals.iter().any(|q| q.name == *p.name.get_ref()) {
                    errors.push(locate(
                        source,
                        Some(p.name.span()),
                        format!("duplicate principal {:?}", p.name.get_ref()),
                    ));
                    continue;
                }
                let mut abi = Vec::new();
                for name in &p.abi {
                    match AbiId::by_name(name.get_ref()) {
                        Some(id) => abi.push(id),
                        None => errors.push(locate(
                            source,
                            Some(name.span()),
                            format!(
                                "unknown ABI {:?}{} (known: {})",
                                name.get_ref(),
                                did_you_mean(name.get_ref(), ABIS.iter().map(|a| a.name)),
                                ABIS.iter().map(|a| a.name).collect::<Vec<_>>().join(", ")
                            ),
                        )),
                    }
                }
                principals.push(Principal {
                    name: p.name.into_inner(),
                    uid: p.uid,
                    gid: p.gid,
                    groups: p.groups,
                    exe: p.exe,
                    abi,
                });
            }
            raw_rules.extend(raw.rule.into_iter().map(|r| (source, r)));
        }
        let mut rules: Vec<Rule> = Vec::new();
        for (source, r) in raw_rules {
            let id = r.id.get_ref().clone();
            if id.trim().is_empty() {
                errors.push(locate(source, Some(r.id.span()), "rule id is empty".into()));
            } else if id == crate::DEFAULT_DENY {
                errors.push(locate(source, Some(r.id.span()), format!("rule id {id:?} is reserved")));
            } else if rules.iter().any(|q| q.id == id) {
                errors.push(locate(source, Some(r.id.span()), format!("duplicate rule id {id:?}")));
            }
            let mut indices = Vec::new();
            if r.principals.is_empty() {
                errors.push(locate(
                    source,
                    Some(r.id.span()),
                    format!("rule {id:?} names no principals"),
                ));
            }
            for name in &r.principals {
                match principals.iter().position(|p| p.name == *name.get_ref()) {
                    Some(i) => indices.push(i),
                    None => errors.push(locate(
                        source,
                        Some(name.span()),
                        format!(
                            "rule {id:?} names unknown principal {:?}{}",
                            name.get_ref(),
                            did_you_mean(name.get_ref(), principals.iter().map(|p| p.name.as_str()))
                        ),
                    )),
                }
            }
            let mut properties = Properties::new();
            for (key, value) in r.service.properties {
                match prop_value(value.get_ref()) {
                    Some(v) => {
                        properties.insert(key, v);
                    }
                    None => errors.push(locate(
                        source,
                        Some(value.span()),
                        format!("property {key:?}: only strings, integers and booleans can be matched"),
                    )),
                }
            }
            let methods = if r.methods.iter().any(|m| m == "*") {
                Methods::All
            } else {
                Methods::Named(r.methods)
            };
            rules.push(Rule {
                id,
                effect: r.effect,
                principals: indices,
                service: ServiceMatch {
                    class: r.service.class,
                    name: r.service.name,
                    properties,
                },
                methods,
                open: r.open,
                privileges: r.privileges,
                memory: r.memory,
            });
        }
        if errors.is_empty() {
            Ok(Policy { principals, rules })
        } else {
            Err(PolicyError::Invalid(errors))
        }
    }

    /// Number of rules.
    pub fn rule_count(&self) -> usize {
        self.rules.len()
    }
}

fn prop_value(v: &toml::Value) -> Option<PropValue> {
    match v {
        toml::Value::String(s) => Some(PropValue::Text(s.clone())),
        toml::Value::Integer(i) => Some(u64::try_from(*i).map_or(PropValue::Signed(*i), PropValue::Unsigned)),
        toml::Value::Boolean(b) => Some(PropValue::Flag(*b)),
        _ => None,
    }
}

fn locate(source: &Source<'_>, span: Option<Range<usize>>, message: String) -> SourceError {
    let (line, col) = span.map_or((0, 0), |s| line_col(source.text, s.start));
    SourceError {
        origin: source.origin.to_string(),
        line,
        col,
        message,
    }
}

/// 1-based line and column (in characters) of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

/// `" (did you mean \"x\"?)"` for the closest candidate within a small edit distance.
fn did_you_mean<'a>(name: &str, candidates: impl Iterator<Item = &'a str>) -> String {
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
        assert_eq!(line_col("ab\ncé x", 7), (2, 4));
    }
}
