//! Registry property values: a plain type shared by the registry, matching and policy, with the
//! conversion to and from the gRPC message at the edge.

use std::{cmp::Ordering, collections::BTreeMap, fmt};

use crate::pb;

/// A typed registry property.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PropValue {
    /// A UTF-8 string.
    Text(String),
    /// An unsigned integer.
    Unsigned(u64),
    /// A signed integer.
    Signed(i64),
    /// A boolean.
    Flag(bool),
    /// Raw bytes.
    Data(Vec<u8>),
}

/// Properties of one service, ordered by key.
pub type Properties = BTreeMap<String, PropValue>;

impl PropValue {
    /// Matching equality: integers compare by value whatever their signedness.
    pub fn matches(&self, other: &PropValue) -> bool {
        match (self.as_integer(), other.as_integer()) {
            (Some(a), Some(b)) => a.cmp(&b) == Ordering::Equal,
            _ => self == other,
        }
    }

    fn as_integer(&self) -> Option<i128> {
        match *self {
            PropValue::Unsigned(u) => Some(i128::from(u)),
            PropValue::Signed(i) => Some(i128::from(i)),
            _ => None,
        }
    }
}

impl fmt::Display for PropValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PropValue::Text(s) => write!(f, "{s:?}"),
            PropValue::Unsigned(u) => write!(f, "{u}"),
            PropValue::Signed(i) => write!(f, "{i}"),
            PropValue::Flag(b) => write!(f, "{b}"),
            PropValue::Data(d) => {
                f.write_str("<")?;
                for byte in d {
                    write!(f, "{byte:02x}")?;
                }
                f.write_str(">")
            }
        }
    }
}

impl From<&PropValue> for pb::PropertyValue {
    fn from(v: &PropValue) -> Self {
        use pb::property_value::Kind;
        let kind = match v {
            PropValue::Text(s) => Kind::Text(s.clone()),
            PropValue::Unsigned(u) => Kind::Unsigned(*u),
            PropValue::Signed(i) => Kind::Signed(*i),
            PropValue::Flag(b) => Kind::Flag(*b),
            PropValue::Data(d) => Kind::Data(d.clone()),
        };
        pb::PropertyValue { kind: Some(kind) }
    }
}

/// A property message with no value set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("property value has no kind set")]
pub struct EmptyProperty;

impl TryFrom<&pb::PropertyValue> for PropValue {
    type Error = EmptyProperty;
    fn try_from(v: &pb::PropertyValue) -> Result<Self, EmptyProperty> {
        use pb::property_value::Kind;
        Ok(match v.kind.as_ref().ok_or(EmptyProperty)? {
            Kind::Text(s) => PropValue::Text(s.clone()),
            Kind::Unsigned(u) => PropValue::Unsigned(*u),
            Kind::Signed(i) => PropValue::Signed(*i),
            Kind::Flag(b) => PropValue::Flag(*b),
            Kind::Data(d) => PropValue::Data(d.clone()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prop_integers_match_across_signedness() {
        assert!(PropValue::Unsigned(7).matches(&PropValue::Signed(7)));
        assert!(!PropValue::Unsigned(7).matches(&PropValue::Signed(-7)));
        assert!(!PropValue::Text("7".into()).matches(&PropValue::Unsigned(7)));
    }

    #[test]
    fn prop_roundtrips_through_proto() {
        for v in [
            PropValue::Text("x".into()),
            PropValue::Unsigned(u64::MAX),
            PropValue::Signed(i64::MIN),
            PropValue::Flag(true),
            PropValue::Data(vec![0, 255]),
        ] {
            let wire = pb::PropertyValue::from(&v);
            assert_eq!(PropValue::try_from(&wire), Ok(v));
        }
        assert_eq!(
            PropValue::try_from(&pb::PropertyValue { kind: None }),
            Err(EmptyProperty)
        );
    }
}
