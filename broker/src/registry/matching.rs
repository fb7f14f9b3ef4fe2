//! Matching dictionaries (IOServiceMatching, IOServiceNameMatching, property equality), and
//! driver matching: the four stages that pick the drivers of a nub.

use std::collections::BTreeMap;

use portcullis_proto::{
    pb,
    property::{EmptyProperty, PropValue, Properties},
};

use super::{Service, ServiceId, personality::Personality};

/// Every field that is set must match; an empty dictionary matches every service.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Matching {
    /// Exact class.
    pub class: Option<String>,
    /// Exact name.
    pub name: Option<String>,
    /// Each property must be present and equal.
    pub properties: Properties,
}

impl Matching {
    /// Matches by name.
    pub fn name(name: &str) -> Matching {
        Matching {
            name: Some(name.to_string()),
            ..Matching::default()
        }
    }

    /// Whether the service matches.
    pub fn matches(&self, service: &Service) -> bool {
        let properties = service.properties();
        self.class.as_deref().is_none_or(|c| c == service.class())
            && self.name.as_deref().is_none_or(|n| n == service.name())
            && self
                .properties
                .iter()
                .all(|(k, v)| properties.get(k).is_some_and(|have| have.matches(v)))
    }
}

impl TryFrom<Option<pb::Matching>> for Matching {
    type Error = EmptyProperty;
    fn try_from(m: Option<pb::Matching>) -> Result<Self, EmptyProperty> {
        let Some(m) = m else {
            return Ok(Matching::default());
        };
        let properties = m
            .properties
            .iter()
            .map(|(k, v)| PropValue::try_from(v).map(|v| (k.clone(), v)))
            .collect::<Result<Properties, _>>()?;
        Ok(Matching {
            class: Some(m.class).filter(|c| !c.is_empty()),
            name: Some(m.name).filter(|n| !n.is_empty()),
            properties,
        })
    }
}

/// What became of one personality considered for a nub.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Ruled out by passive matching: the reason.
    Passive(String),
    /// Its driver's probe refused the device: the reason.
    Probe(String),
    /// Its driver failed to start: the reason (the next candidate was tried).
    Start(String),
    /// Another candidate of its category started, or was already running.
    Outranked,
    /// It is the driver of its category: the service it published.
    Started(ServiceId),
}

/// One candidate of a matching run, for `portcullis ls`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// The personality.
    pub personality: String,
    /// Its driver family.
    pub driver: String,
    /// Its category.
    pub category: String,
    /// Its score (as the probe left it).
    pub probe_score: i64,
    /// The stage it reached.
    pub outcome: Outcome,
}

impl From<&Candidate> for pb::MatchCandidate {
    fn from(c: &Candidate) -> pb::MatchCandidate {
        let (outcome, reason, service_id) = match &c.outcome {
            Outcome::Passive(r) => ("passive", r.clone(), 0),
            Outcome::Probe(r) => ("probe", r.clone(), 0),
            Outcome::Start(r) => ("start", r.clone(), 0),
            Outcome::Outranked => ("outranked", String::new(), 0),
            Outcome::Started(id) => ("started", String::new(), id.0),
        };
        pb::MatchCandidate {
            personality: c.personality.clone(),
            driver: c.driver.clone(),
            category: c.category.clone(),
            probe_score: c.probe_score,
            outcome: outcome.into(),
            reason,
            service_id,
        }
    }
}

/// How matching went for one nub, the last time it ran.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MatchRecord {
    /// Every personality of the nub's class, by category, then as they were tried.
    pub candidates: Vec<Candidate>,
}

impl MatchRecord {
    /// The service started for each category.
    pub fn started(&self) -> impl Iterator<Item = (&str, ServiceId)> {
        self.candidates.iter().filter_map(|c| match c.outcome {
            Outcome::Started(id) => Some((c.category.as_str(), id)),
            _ => None,
        })
    }
}

/// What the matching stages ask of the drivers: the family's active probe, and starting (or
/// stopping) a driver on the nub.
pub trait Binder {
    /// The active probe: whether the driver can serve this device, and at what score (the
    /// personality's, or one the family adjusts).
    fn probe(&mut self, personality: &Personality) -> Result<i64, String>;
    /// Starts the driver and publishes its service.
    fn start(&mut self, personality: &Personality) -> Result<ServiceId, String>;
    /// Stops a running driver whose probe no longer passes (its service is terminated).
    fn stop(&mut self, service: ServiceId);
}

/// A driver running on a nub, from an earlier matching run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Running {
    /// Its personality's id.
    pub personality: String,
    /// Its service.
    pub service: ServiceId,
}

/// I/O Kit's four stages for one nub, independently per category: class matching (the
/// personalities given are those naming the nub's class), passive matching on `properties`,
/// the active probe, then start in score order (ties by id), falling back to the next candidate
/// when a start fails. A category whose driver is `running` keeps it while its personality
/// still passes passive matching and probe; one that no longer does is stopped and the category
/// matched afresh.
pub fn match_nub<'a>(
    personalities: impl IntoIterator<Item = &'a Personality>,
    properties: &Properties,
    running: &BTreeMap<String, Running>,
    binder: &mut dyn Binder,
) -> MatchRecord {
    let mut by_category: BTreeMap<&str, Vec<&Personality>> = BTreeMap::new();
    for p in personalities {
        by_category.entry(p.category.as_str()).or_default().push(p);
    }
    let mut candidates = Vec::new();
    for (category, mut list) in by_category {
        list.sort_by(|a, b| b.probe_score.cmp(&a.probe_score).then_with(|| a.id.cmp(&b.id)));
        let mut probed: Vec<(&Personality, i64)> = Vec::new();
        let mut settled = Vec::new();
        for p in list {
            let candidate = |outcome| Candidate {
                personality: p.id.clone(),
                driver: p.driver.clone(),
                category: category.to_string(),
                probe_score: p.probe_score,
                outcome,
            };
            if let Err(why) = p.passive(properties) {
                settled.push(candidate(Outcome::Passive(why)));
                continue;
            }
            match binder.probe(p) {
                Ok(score) => probed.push((p, score)),
                Err(why) => settled.push(candidate(Outcome::Probe(why))),
            }
        }
        let kept = running
            .get(category)
            .filter(|r| probed.iter().any(|(p, _)| p.id == r.personality));
        if let Some(r) = running.get(category)
            && kept.is_none()
        {
            binder.stop(r.service);
        }
        probed.sort_by(|(a, sa), (b, sb)| sb.cmp(sa).then_with(|| a.id.cmp(&b.id)));
        let mut tried = Vec::new();
        let mut winner = kept.map(|r| r.service);
        for (p, score) in probed {
            let outcome = match (winner, kept) {
                (Some(service), Some(r)) if r.personality == p.id => Outcome::Started(service),
                (Some(_), _) => Outcome::Outranked,
                (None, _) => match binder.start(p) {
                    Ok(service) => {
                        winner = Some(service);
                        Outcome::Started(service)
                    }
                    Err(why) => Outcome::Start(why),
                },
            };
            tried.push(Candidate {
                personality: p.id.clone(),
                driver: p.driver.clone(),
                category: category.to_string(),
                probe_score: score,
                outcome,
            });
        }
        candidates.extend(tried);
        candidates.extend(settled);
    }
    MatchRecord { candidates }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use portcullis_proto::property::PropValue;

    use super::*;
    use crate::registry::personality::Personalities;

    /// A driver whose probes and starts do what the test says.
    #[derive(Default)]
    struct Scripted {
        refuse_probe: BTreeSet<&'static str>,
        refuse_start: BTreeSet<&'static str>,
        started: Vec<String>,
        stopped: Vec<ServiceId>,
        next: u64,
    }

    impl Binder for Scripted {
        fn probe(&mut self, p: &Personality) -> Result<i64, String> {
            if self.refuse_probe.contains(p.id.as_str()) {
                return Err("not this device".into());
            }
            Ok(p.probe_score)
        }
        fn start(&mut self, p: &Personality) -> Result<ServiceId, String> {
            if self.refuse_start.contains(p.id.as_str()) {
                return Err("EBUSY".into());
            }
            self.started.push(p.id.clone());
            self.next += 1;
            Ok(ServiceId(100 + self.next))
        }
        fn stop(&mut self, service: ServiceId) {
            self.stopped.push(service);
        }
    }

    fn set(entries: &[(&str, i64, &str, &str)]) -> Personalities {
        let text: String = entries
            .iter()
            .map(|(id, score, category, devtype)| {
                format!(
                    "[[personality]]\nid = \"org.test.{id}\"\nversion = \"1\"\ndriver = \"block\"\nprovider_class = \"BlockNub\"\nprobe_score = {score}\ncategory = \"{category}\"\nmatch = {{ devtype = \"{devtype}\" }}\n"
                )
            })
            .collect();
        Personalities::parse(&[("t.toml".into(), text)]).unwrap()
    }

    fn disk() -> Properties {
        Properties::from([("devtype".to_string(), PropValue::Text("disk".into()))])
    }

    fn outcomes(record: &MatchRecord) -> Vec<(String, Outcome)> {
        record
            .candidates
            .iter()
            .map(|c| {
                (
                    c.personality.trim_start_matches("org.test.").to_string(),
                    c.outcome.clone(),
                )
            })
            .collect()
    }

    #[test]
    fn the_highest_score_that_probes_and_starts_wins_with_fallback() {
        let set = set(&[
            ("top", 3000, "default", "disk"),
            ("busy", 2000, "default", "disk"),
            ("fine", 1000, "default", "disk"),
            ("low", 10, "default", "disk"),
            ("partition", 5000, "default", "partition"),
        ]);
        let mut binder = Scripted {
            refuse_probe: BTreeSet::from(["org.test.top"]),
            refuse_start: BTreeSet::from(["org.test.busy"]),
            ..Scripted::default()
        };
        let record = match_nub(set.all(), &disk(), &BTreeMap::new(), &mut binder);
        assert_eq!(binder.started, vec!["org.test.fine"]);
        assert_eq!(
            outcomes(&record),
            vec![
                ("busy".into(), Outcome::Start("EBUSY".into())),
                ("fine".into(), Outcome::Started(ServiceId(101))),
                ("low".into(), Outcome::Outranked),
                (
                    "partition".into(),
                    Outcome::Passive("\"devtype\" is \"disk\", not \"partition\"".into())
                ),
                ("top".into(), Outcome::Probe("not this device".into())),
            ]
        );
    }

    #[test]
    fn each_category_gets_its_own_driver() {
        let set = set(&[("a", 10, "storage", "disk"), ("b", 20, "inspect", "disk")]);
        let mut binder = Scripted::default();
        let record = match_nub(set.all(), &disk(), &BTreeMap::new(), &mut binder);
        assert_eq!(binder.started, vec!["org.test.b", "org.test.a"]);
        assert_eq!(record.started().count(), 2);
    }

    #[test]
    fn a_running_driver_is_kept_while_it_probes_and_stopped_when_it_does_not() {
        let set = set(&[("a", 10, "default", "disk"), ("b", 20, "default", "disk")]);
        let running = BTreeMap::from([(
            "default".to_string(),
            Running {
                personality: "org.test.a".into(),
                service: ServiceId(7),
            },
        )]);
        // Still passes: kept, although "b" now scores higher (a running driver is not replaced).
        let mut binder = Scripted::default();
        let record = match_nub(set.all(), &disk(), &running, &mut binder);
        assert!(binder.started.is_empty() && binder.stopped.is_empty());
        assert_eq!(
            outcomes(&record),
            vec![
                ("b".into(), Outcome::Outranked),
                ("a".into(), Outcome::Started(ServiceId(7)))
            ]
        );
        // Its probe fails now (the media went): stopped, and the category matched afresh.
        let mut binder = Scripted {
            refuse_probe: BTreeSet::from(["org.test.a"]),
            ..Scripted::default()
        };
        match_nub(set.all(), &disk(), &running, &mut binder);
        assert_eq!(binder.stopped, vec![ServiceId(7)]);
        assert_eq!(binder.started, vec!["org.test.b"]);
        // Nothing passes: stopped, nothing started.
        let mut binder = Scripted::default();
        match_nub(set.all(), &Properties::new(), &running, &mut binder);
        assert_eq!(binder.stopped, vec![ServiceId(7)]);
        assert!(binder.started.is_empty());
    }
}
