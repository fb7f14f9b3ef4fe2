//! Matching dictionaries (IOServiceMatching, IOServiceNameMatching, property equality).

use portcullis_proto::{
    pb,
    property::{EmptyProperty, PropValue, Properties},
};

use super::Service;

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
        self.class.as_deref().is_none_or(|c| c == service.class())
            && self.name.as_deref().is_none_or(|n| n == service.name())
            && self
                .properties
                .iter()
                .all(|(k, v)| service.properties().get(k).is_some_and(|have| have.matches(v)))
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
