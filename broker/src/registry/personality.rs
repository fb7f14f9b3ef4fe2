//! Driver personalities (`drivers.d/*.toml`), the broker's `IOKitPersonalities`: which driver
//! may claim which nub, how strongly, and in which match category. An operator enables a real
//! device family by installing a personality; with none, the broker claims nothing on the host.
//!
//! ```toml
//! [[personality]]
//! id             = "org.example.scratch-disks"   # reverse DNS, unique
//! version        = "1.2.0"                       # 1 to 3 numbers
//! driver         = "block"                       # the family that starts on the nub
//! provider_class = "BlockNub"                    # the nubs it is a candidate for
//! match          = { devtype = "disk", "loop.backing_file" = { prefix = "/srv/scratch/" } }
//! probe_score    = 1000                          # the highest that starts wins
//! category       = "storage"                     # one driver per category [default: "default"]
//! properties     = { role = "scratch" }          # merged into the service it publishes
//! read_only      = true                          # block: open read-only
//! ```
//!
//! Loading checks everything `portcullis driver lint` does; a set with an error is refused
//! whole (the broker does not start on it), every error located `file:line:col`.

use std::{
    collections::BTreeMap,
    ops::Range,
    path::{Path, PathBuf},
};

use portcullis_policy::{PropMatch, SourceError, did_you_mean, locate_in, prop_value};
use portcullis_proto::property::Properties;
use serde::Deserialize;
use toml::Spanned;

use crate::bus::NUB_CLASSES;

/// The category of a personality that names none.
pub const DEFAULT_CATEGORY: &str = "default";

/// Most personalities one set may hold (each is matched against every nub of its class).
pub const MAX_PERSONALITIES: usize = 4096;

/// How a block driver opens the device a personality claims.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockOptions {
    /// Open it read-only; without this the probe refuses a read-only device.
    pub read_only: bool,
    /// Claim a device that is mounted or held by another kernel user (a holder); refused by
    /// the probe unless set.
    pub allow_mounted: bool,
    /// Open it `O_EXCL`: the kernel's exclusive claim, which fails while it is mounted or
    /// claimed by someone else, and keeps them out while the broker holds it.
    pub exclusive: bool,
}

/// One personality, checked.
#[derive(Clone, Debug, PartialEq)]
pub struct Personality {
    /// Reverse-DNS id, unique in the set.
    pub id: String,
    /// `1`, `1.2` or `1.2.3`.
    pub version: String,
    /// The driver family that starts on a matched nub.
    pub driver: String,
    /// The class of nub it is a candidate for.
    pub provider_class: String,
    /// Passive matching: each property of the nub must match.
    pub matching: BTreeMap<String, PropMatch>,
    /// Higher wins.
    pub probe_score: i64,
    /// One driver starts per category on a nub.
    pub category: String,
    /// Merged into the properties of the service it publishes.
    pub properties: Properties,
    /// Block devices only.
    pub block: BlockOptions,
    /// Where it is defined (the `id`'s place; `place()` says `file:line:col`).
    pub origin: SourceError,
}

impl Personality {
    /// Whether the nub's properties pass passive matching; the first property that does not,
    /// when one does not.
    pub fn passive(&self, properties: &Properties) -> Result<(), String> {
        for (key, want) in &self.matching {
            match properties.get(key) {
                None => return Err(format!("the nub has no {key:?}")),
                Some(have) if !want.matches(have) => {
                    return Err(format!("{key:?} is {have}, not {want}"));
                }
                Some(_) => {}
            }
        }
        Ok(())
    }
}

/// A checked set of personalities, sorted by id.
#[derive(Clone, Debug, Default)]
pub struct Personalities {
    all: Vec<Personality>,
    files: Vec<PathBuf>,
}

impl Personalities {
    /// Every personality, by id.
    pub fn all(&self) -> &[Personality] {
        &self.all
    }

    /// The files they came from.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// The personalities that name this provider class (class matching).
    pub fn for_class<'a>(&'a self, class: &'a str) -> impl Iterator<Item = &'a Personality> + 'a {
        self.all.iter().filter(move |p| p.provider_class == class)
    }

    /// A set from TOML texts, each with its origin: every error found.
    pub fn parse(sources: &[(String, String)]) -> Result<Personalities, Vec<SourceError>> {
        let mut errors = Vec::new();
        let mut all: Vec<Personality> = Vec::new();
        for (origin, text) in sources {
            parse_file(origin, text, &mut all, &mut errors);
        }
        let mut first: BTreeMap<&str, String> = BTreeMap::new();
        for p in &all {
            if let Some(first_at) = first.get(p.id.as_str()) {
                errors.push(at(
                    &p.origin,
                    format!("duplicate id {:?} (first defined at {first_at})", p.id),
                ));
            } else {
                first.insert(&p.id, p.origin.place());
            }
        }
        if all.len() > MAX_PERSONALITIES {
            errors.push(SourceError {
                origin: "personalities".into(),
                message: format!("{} personalities; at most {MAX_PERSONALITIES}", all.len()),
                ..SourceError::default()
            });
        }
        errors.extend(ambiguities(&all));
        if !errors.is_empty() {
            errors.sort_by(|a, b| (&a.origin, a.line, a.col).cmp(&(&b.origin, b.line, b.col)));
            errors.dedup();
            return Err(errors);
        }
        all.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(Personalities { all, files: Vec::new() })
    }

    /// The set in a `drivers.d` directory (its `*.toml` files, in name order). A missing
    /// directory is an error; an empty one is an empty set. With `strict`, a file or directory
    /// anyone but root (or the broker's user) could change is an error too.
    pub fn load_dir(dir: &Path, strict: bool) -> Result<Personalities, Vec<SourceError>> {
        let whole = |message: String| SourceError {
            origin: dir.display().to_string(),
            message,
            ..SourceError::default()
        };
        let files = files_of(dir).map_err(|e| vec![whole(e)])?;
        let mut errors = Vec::new();
        let mut sources = Vec::new();
        if strict {
            let uid = crate::trust::broker_uid();
            for path in std::iter::once(dir).chain(files.iter().map(PathBuf::as_path)) {
                for problem in crate::trust::problems(path, uid) {
                    errors.push(SourceError {
                        origin: path.display().to_string(),
                        message: format!("refused: {problem}"),
                        ..SourceError::default()
                    });
                }
            }
        }
        for file in &files {
            match std::fs::read_to_string(file) {
                Ok(text) => sources.push((file.display().to_string(), text)),
                Err(e) => errors.push(SourceError {
                    origin: file.display().to_string(),
                    message: e.to_string(),
                    ..SourceError::default()
                }),
            }
        }
        match Personalities::parse(&sources) {
            Ok(mut set) if errors.is_empty() => {
                set.files = files;
                Ok(set)
            }
            Ok(_) => Err(errors),
            Err(more) => {
                errors.extend(more);
                Err(errors)
            }
        }
    }
}

/// The `*.toml` files of a directory, in name order.
fn files_of(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("cannot read the personality directory: {e}"))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml") && p.is_file())
        .collect();
    files.sort();
    Ok(files)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    personality: Vec<RawPersonality>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPersonality {
    id: Spanned<String>,
    version: Spanned<String>,
    driver: Spanned<String>,
    provider_class: Spanned<String>,
    #[serde(rename = "match", default)]
    matching: Option<Spanned<toml::Table>>,
    probe_score: Spanned<i64>,
    category: Option<Spanned<String>>,
    #[serde(default)]
    properties: Option<Spanned<toml::Table>>,
    read_only: Option<Spanned<bool>>,
    allow_mounted: Option<Spanned<bool>>,
    exclusive: Option<Spanned<bool>>,
}

/// Keys a personality may have, for did-you-mean.
const KEYS: &[&str] = &[
    "id",
    "version",
    "driver",
    "provider_class",
    "match",
    "probe_score",
    "category",
    "properties",
    "read_only",
    "allow_mounted",
    "exclusive",
];

fn parse_file(origin: &str, text: &str, out: &mut Vec<Personality>, errors: &mut Vec<SourceError>) {
    let located = |span: Range<usize>, message: String| locate_in(origin, text, Some(span), message);
    let raw: RawFile = match toml::from_str(text) {
        Ok(raw) => raw,
        Err(e) => {
            let message = e.message().to_string();
            let hint = unknown_field(&message)
                .map(|name| did_you_mean(name, KEYS.iter().copied().chain(["personality"])))
                .unwrap_or_default();
            let table = if text.contains("[personality]") && !text.contains("[[personality]]") {
                " (personalities are an array of tables: write [[personality]])"
            } else {
                ""
            };
            errors.push(locate_in(origin, text, e.span(), format!("{message}{hint}{table}")));
            return;
        }
    };
    for p in raw.personality {
        let before = errors.len();
        let mut err = |span: Range<usize>, message: String| errors.push(located(span, message));
        if !is_reverse_dns(p.id.get_ref()) {
            err(
                p.id.span(),
                format!(
                    "id {:?} is not in reverse-DNS form (two or more dot-separated labels of letters, digits and '-', like \"org.example.scratch-disks\")",
                    p.id.get_ref()
                ),
            );
        }
        if !is_version(p.version.get_ref()) {
            err(
                p.version.span(),
                format!(
                    "version {:?} is not 1 to 3 dot-separated numbers (\"1.2.0\")",
                    p.version.get_ref()
                ),
            );
        }
        let family = crate::drivers::family(p.driver.get_ref());
        if family.is_none() {
            let known: Vec<&str> = crate::drivers::kinds().collect();
            err(
                p.driver.span(),
                format!(
                    "unknown driver {:?}{} (known: {})",
                    p.driver.get_ref(),
                    did_you_mean(p.driver.get_ref(), known.iter().copied()),
                    known.join(", ")
                ),
            );
        }
        let class = NUB_CLASSES.iter().find(|c| c.class == p.provider_class.get_ref());
        match class {
            None => err(
                p.provider_class.span(),
                format!(
                    "no bus publishes provider class {:?}{}, so this personality can never match (classes: {})",
                    p.provider_class.get_ref(),
                    did_you_mean(p.provider_class.get_ref(), NUB_CLASSES.iter().map(|c| c.class)),
                    NUB_CLASSES.iter().map(|c| c.class).collect::<Vec<_>>().join(", ")
                ),
            ),
            Some(c) if family.is_some() && !c.drivers.contains(&p.driver.get_ref().as_str()) => err(
                p.driver.span(),
                format!(
                    "driver {:?} cannot start on a {} (it takes: {})",
                    p.driver.get_ref(),
                    c.class,
                    c.drivers.join(", ")
                ),
            ),
            Some(_) => {}
        }
        let mut matching = BTreeMap::new();
        if let Some(table) = &p.matching {
            for (key, value) in table.get_ref() {
                if let Some(c) = class
                    && !c.properties.contains(&key.as_str())
                {
                    err(
                        table.span(),
                        format!(
                            "match key {key:?}: a {} never has this property, so this personality can never match{}",
                            c.class,
                            did_you_mean(key, c.properties.iter().copied())
                        ),
                    );
                    continue;
                }
                match PropMatch::parse(value) {
                    Some(m) => {
                        matching.insert(key.clone(), m);
                    }
                    None => err(
                        table.span(),
                        format!(
                            "match key {key:?}: a value, a list of values, {{ prefix = \"…\" }} or {{ any_of = […] }}"
                        ),
                    ),
                }
            }
        }
        let mut properties = Properties::new();
        if let Some(table) = &p.properties {
            for (key, value) in table.get_ref() {
                match prop_value(value) {
                    Some(v) => {
                        properties.insert(key.clone(), v);
                    }
                    None => err(
                        table.span(),
                        format!("property {key:?} must be a string, integer or boolean"),
                    ),
                }
            }
        }
        let category = p
            .category
            .as_ref()
            .map_or(DEFAULT_CATEGORY.to_string(), |c| c.get_ref().clone());
        if let Some(c) = &p.category
            && !is_label(c.get_ref())
        {
            err(
                c.span(),
                format!("category {:?}: letters, digits, '-' and '_', 1 to 64", c.get_ref()),
            );
        }
        for (flag, name) in [
            (&p.read_only, "read_only"),
            (&p.allow_mounted, "allow_mounted"),
            (&p.exclusive, "exclusive"),
        ] {
            if let Some(flag) = flag
                && p.driver.get_ref() != "block"
            {
                err(flag.span(), format!("{name} is for block personalities only"));
            }
        }
        if errors.len() != before {
            continue;
        }
        let origin = located(p.id.span(), String::new());
        out.push(Personality {
            id: p.id.into_inner(),
            version: p.version.into_inner(),
            driver: p.driver.into_inner(),
            provider_class: p.provider_class.into_inner(),
            matching,
            probe_score: p.probe_score.into_inner(),
            category,
            properties,
            block: BlockOptions {
                read_only: p.read_only.is_some_and(Spanned::into_inner),
                allow_mounted: p.allow_mounted.is_some_and(Spanned::into_inner),
                exclusive: p.exclusive.is_some_and(Spanned::into_inner),
            },
            origin,
        });
    }
}

/// The field name in serde's "unknown field `x`, expected …".
fn unknown_field(message: &str) -> Option<&str> {
    message.strip_prefix("unknown field `")?.split('`').next()
}

/// An error at a personality's place.
fn at(origin: &SourceError, message: String) -> SourceError {
    SourceError {
        message,
        ..origin.clone()
    }
}

fn is_label(s: &str) -> bool {
    (1..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// `org.example.thing`: two or more labels of letters, digits and '-', none empty or starting
/// or ending with '-', 255 bytes at most.
fn is_reverse_dns(s: &str) -> bool {
    let labels: Vec<&str> = s.split('.').collect();
    s.len() <= 255
        && labels.len() >= 2
        && labels.iter().all(|l| {
            (1..=63).contains(&l.len())
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

/// `1`, `1.2` or `1.2.3`, each part a number of at most 9 digits.
fn is_version(s: &str) -> bool {
    let parts: Vec<&str> = s.split('.').collect();
    (1..=3).contains(&parts.len())
        && parts
            .iter()
            .all(|p| (1..=9).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()))
}

/// Two personalities that can match one nub at one score in one category: which starts would
/// depend on the probe's whims. Named at the second, pointing at the first.
fn ambiguities(all: &[Personality]) -> Vec<SourceError> {
    let mut out = Vec::new();
    for (i, a) in all.iter().enumerate() {
        for b in all.iter().skip(i + 1) {
            if a.provider_class == b.provider_class
                && a.category == b.category
                && a.probe_score == b.probe_score
                && can_overlap(a, b)
            {
                out.push(at(
                    &b.origin,
                    format!(
                        "{:?} and {:?} (at {}) can match the same {} at the same probe score ({}) in category {:?}: give one a higher score, or make their matches exclusive",
                        b.id,
                        a.id,
                        a.origin.place(),
                        a.provider_class,
                        a.probe_score,
                        a.category
                    ),
                ));
            }
        }
    }
    out
}

/// Whether one nub could pass both personalities' passive matching: every key both name can
/// hold a value both accept.
fn can_overlap(a: &Personality, b: &Personality) -> bool {
    a.matching
        .iter()
        .all(|(key, m)| b.matching.get(key).is_none_or(|n| m.overlaps(n)))
}

#[cfg(test)]
mod tests {
    use portcullis_proto::property::PropValue;

    use super::*;

    fn parse(text: &str) -> Result<Personalities, Vec<SourceError>> {
        Personalities::parse(&[("d/a.toml".into(), text.into())])
    }

    fn errors(text: &str) -> Vec<String> {
        parse(text).unwrap_err().iter().map(ToString::to_string).collect()
    }

    const GOOD: &str = r#"
[[personality]]
id = "org.example.loops"
version = "1.2.0"
driver = "block"
provider_class = "BlockNub"
match = { devtype = "disk", "loop.backing_file" = { prefix = "/srv/" } }
probe_score = 1000
properties = { role = "scratch" }
read_only = true
"#;

    #[test]
    fn a_personality_parses_with_every_field() {
        let set = parse(GOOD).unwrap();
        let p = &set.all()[0];
        assert_eq!(
            (p.id.as_str(), p.driver.as_str(), p.category.as_str()),
            ("org.example.loops", "block", "default")
        );
        assert_eq!(p.origin.place(), "d/a.toml:3:6");
        assert!(p.block.read_only && !p.block.exclusive);
        let mut nub = Properties::from([
            ("devtype".to_string(), PropValue::Text("disk".into())),
            ("loop.backing_file".to_string(), PropValue::Text("/srv/img".into())),
        ]);
        assert_eq!(p.passive(&nub), Ok(()));
        nub.insert("loop.backing_file".into(), PropValue::Text("/home/x".into()));
        assert!(p.passive(&nub).unwrap_err().contains("loop.backing_file"));
        assert_eq!(set.for_class("BlockNub").count(), 1);
        assert_eq!(set.for_class("TtyNub").count(), 0);
    }

    #[test]
    fn lint_errors_are_located_and_suggest() {
        let e = errors(GOOD.replace("probe_score", "probe_scor").as_str());
        assert!(e[0].starts_with("d/a.toml:8:1: unknown field `probe_scor`"), "{e:?}");
        assert!(e[0].contains("did you mean \"probe_score\"?"), "{e:?}");
        let e = errors(&GOOD.replace("\"block\"", "\"blok\""));
        assert!(
            e[0].starts_with("d/a.toml:5:10: unknown driver \"blok\" (did you mean \"block\"?)"),
            "{e:?}"
        );
        let e = errors(&GOOD.replace("org.example.loops", "loops"));
        assert!(e[0].contains("reverse-DNS"), "{e:?}");
        let e = errors(&GOOD.replace("1.2.0", "1.2.0-beta"));
        assert!(e[0].contains("version \"1.2.0-beta\""), "{e:?}");
        let e = errors(&GOOD.replace("BlockNub", "UsbNub"));
        assert!(e[0].contains("can never match"), "{e:?}");
        let e = errors(&GOOD.replace("BlockNub", "TtyNub"));
        assert!(e.iter().any(|e| e.contains("cannot start on a TtyNub")), "{e:?}");
        let e = errors(&GOOD.replace("devtype", "devtyp"));
        assert!(
            e[0].contains("never has this property") && e[0].contains("did you mean \"devtype\"?"),
            "{e:?}"
        );
        let e = errors(&GOOD.replace("[[personality]]", "[personality]"));
        assert!(e[0].contains("write [[personality]]"), "{e:?}");
    }

    #[test]
    fn duplicates_and_ambiguous_pairs_are_errors_naming_both() {
        let two = format!("{GOOD}{}", GOOD.replace("role", "other"));
        let e = errors(&two);
        assert!(
            e.iter()
                .any(|e| e.contains("duplicate id \"org.example.loops\" (first defined at d/a.toml:3:6)")),
            "{e:?}"
        );
        let ambiguous = format!("{GOOD}{}", GOOD.replace("org.example.loops", "org.example.other"));
        let e = errors(&ambiguous);
        assert!(
            e.iter()
                .any(|e| e.starts_with("d/a.toml:13:6:") && e.contains("same probe score (1000)")),
            "{e:?}"
        );
        // A different score, category or exclusive match is not ambiguous.
        for change in [("1000", "900"), ("role", "role")] {
            let other = GOOD
                .replace("org.example.loops", "org.example.other")
                .replace(change.0, change.1);
            let text = format!("{GOOD}{other}");
            assert_eq!(parse(&text).is_ok(), change.0 == "1000", "{change:?}");
        }
        let exclusive = GOOD
            .replace("org.example.loops", "org.example.other")
            .replace("/srv/", "/var/");
        assert!(parse(&format!("{GOOD}{exclusive}")).is_ok());
        let category = GOOD
            .replace("org.example.loops", "org.example.other")
            .replace("probe_score", "category = \"inspect\"\nprobe_score");
        assert!(parse(&format!("{GOOD}{category}")).is_ok());
    }

    #[test]
    fn block_options_on_other_drivers_are_errors() {
        let tty = GOOD
            .replace("\"block\"", "\"tty\"")
            .replace("BlockNub", "TtyNub")
            .replace(
                "devtype = \"disk\", \"loop.backing_file\" = { prefix = \"/srv/\" }",
                "devname = \"ttyUSB0\"",
            );
        let e = errors(&tty);
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].contains("read_only is for block personalities only"), "{e:?}");
    }
}
