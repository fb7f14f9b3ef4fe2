//! Argument constraints: `args.METHOD.PARAM = { min, max } | { one_of } | { mask } |
//! { prefix, max_len }` on the allow rule that grants the method. A parameter is a scalar by
//! its name in the method table, `len` (the struct input's length), or a top-level field of the
//! method's input struct by name. Values are checked after translation, in the broker's layout.

use serde::Deserialize;

/// A constraint as written.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConstraint {
    min: Option<i64>,
    max: Option<i64>,
    one_of: Option<Vec<i64>>,
    mask: Option<i64>,
    prefix: Option<String>,
    max_len: Option<u32>,
}

/// A constraint on one parameter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Constraint {
    /// `min <= value <= max` (either may be absent).
    Range { min: Option<i128>, max: Option<i128> },
    /// One of these values.
    OneOf(Vec<i128>),
    /// No bit outside the mask.
    Mask(u64),
    /// A `char[N]` field: the text up to its first NUL starts with `prefix` and is at most
    /// `max_len` bytes.
    Text {
        prefix: Option<String>,
        max_len: Option<u32>,
    },
}

impl Constraint {
    /// The numbers the constraint names (bounds, values, mask; a text's length limit), to fuzz
    /// arguments near them.
    pub(crate) fn numbers(&self) -> Vec<u64> {
        let cut = |v: i128| v as i64 as u64;
        match self {
            Constraint::Range { min, max } => min.iter().chain(max).map(|v| cut(*v)).collect(),
            Constraint::OneOf(values) => values.iter().map(|v| cut(*v)).collect(),
            Constraint::Mask(m) => vec![*m, m.wrapping_add(1)],
            Constraint::Text { max_len, .. } => max_len.iter().map(|m| u64::from(*m)).collect(),
        }
    }
}

impl RawConstraint {
    pub(crate) fn parse(self) -> Result<Constraint, String> {
        let numeric = self.min.is_some() || self.max.is_some();
        let text = self.prefix.is_some() || self.max_len.is_some();
        let kinds = [numeric, self.one_of.is_some(), self.mask.is_some(), text]
            .iter()
            .filter(|k| **k)
            .count();
        if kinds != 1 {
            return Err("a constraint is exactly one of: min/max, one_of, mask, prefix/max_len".into());
        }
        if let (Some(min), Some(max)) = (self.min, self.max)
            && min > max
        {
            return Err(format!("min {min} is greater than max {max}"));
        }
        Ok(if numeric {
            Constraint::Range {
                min: self.min.map(i128::from),
                max: self.max.map(i128::from),
            }
        } else if let Some(values) = self.one_of {
            if values.is_empty() {
                return Err("one_of lists no values".into());
            }
            Constraint::OneOf(values.into_iter().map(i128::from).collect())
        } else if let Some(mask) = self.mask {
            Constraint::Mask(u64::from_ne_bytes(mask.to_ne_bytes()))
        } else {
            Constraint::Text {
                prefix: self.prefix,
                max_len: self.max_len,
            }
        })
    }
}

/// Where a parameter's value is, for one method (given by the broker at admission).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamAt {
    /// The scalar at this index.
    Scalar(usize),
    /// The struct input's length in bytes.
    StructLen,
    /// An integer field of the (native) struct input.
    Field {
        /// Byte offset.
        offset: u32,
        /// 1, 2, 4 or 8.
        size: u8,
        /// Signed integer.
        signed: bool,
    },
    /// A `char[N]` field of the struct input.
    Chars {
        /// Byte offset.
        offset: u32,
        /// N.
        len: u32,
    },
}

/// A parameter of a method, by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParamRef<'a> {
    /// The name constraints use.
    pub name: &'a str,
    /// Where its value is.
    pub at: ParamAt,
}

/// A parameter's value in one call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Value<'a> {
    Int(i128),
    Text(&'a [u8]),
}

impl ParamAt {
    /// The value in a call, or `None` if the call does not carry it (which refuses the call).
    pub(crate) fn value<'a>(self, scalars: &[u64], struct_in: &'a [u8]) -> Option<Value<'a>> {
        match self {
            ParamAt::Scalar(i) => scalars.get(i).map(|v| Value::Int(i128::from(*v))),
            ParamAt::StructLen => Some(Value::Int(struct_in.len() as i128)),
            ParamAt::Field { offset, size, signed } => {
                let bytes = struct_in.get(offset as usize..offset as usize + usize::from(size))?;
                let mut raw = [0u8; 8];
                let (le, be) = (cfg!(target_endian = "little"), cfg!(target_endian = "big"));
                if le {
                    raw.get_mut(..bytes.len())?.copy_from_slice(bytes);
                } else if be {
                    raw.get_mut(8 - bytes.len()..)?.copy_from_slice(bytes);
                }
                let unsigned = u64::from_ne_bytes(raw);
                let bits = u32::from(size) * 8;
                let v = if signed && bits < 64 {
                    let shift = 64 - bits;
                    i128::from(((unsigned << shift) as i64) >> shift)
                } else if signed {
                    i128::from(unsigned as i64)
                } else {
                    i128::from(unsigned)
                };
                Some(Value::Int(v))
            }
            ParamAt::Chars { offset, len } => {
                let bytes = struct_in.get(offset as usize..(offset + len) as usize)?;
                let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
                bytes.get(..end).map(Value::Text)
            }
        }
    }
}

impl std::fmt::Display for Constraint {
    /// As written in a policy (`{ max = 512 }`).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let list = |v: &[i128]| v.iter().map(i128::to_string).collect::<Vec<_>>().join(", ");
        match self {
            Constraint::Range { min, max } => {
                let parts: Vec<String> = [("min", min), ("max", max)]
                    .into_iter()
                    .filter_map(|(k, v)| v.map(|v| format!("{k} = {v}")))
                    .collect();
                write!(f, "{{ {} }}", parts.join(", "))
            }
            Constraint::OneOf(values) => write!(f, "{{ one_of = [{}] }}", list(values)),
            Constraint::Mask(m) => write!(f, "{{ mask = {m:#x} }}"),
            Constraint::Text { prefix, max_len } => {
                let mut parts = Vec::new();
                if let Some(p) = prefix {
                    parts.push(format!("prefix = {p:?}"));
                }
                if let Some(n) = max_len {
                    parts.push(format!("max_len = {n}"));
                }
                write!(f, "{{ {} }}", parts.join(", "))
            }
        }
    }
}

impl Constraint {
    /// `Ok` if the value satisfies the constraint; else why not.
    pub(crate) fn check(&self, param: &str, value: Value<'_>) -> Result<(), String> {
        match (self, value) {
            (Constraint::Range { min, max }, Value::Int(v)) => match (min, max) {
                (Some(lo), Some(hi)) if v < *lo || v > *hi => {
                    Err(format!("argument {param} = {v} is outside {lo}..={hi}"))
                }
                (Some(lo), None) if v < *lo => Err(format!("argument {param} = {v} is less than {lo}")),
                (None, Some(hi)) if v > *hi => Err(format!("argument {param} = {v} is greater than {hi}")),
                _ => Ok(()),
            },
            (Constraint::OneOf(values), Value::Int(v)) => {
                if values.contains(&v) {
                    Ok(())
                } else {
                    Err(format!("argument {param} = {v} is not one of {values:?}"))
                }
            }
            (Constraint::Mask(mask), Value::Int(v)) => {
                let bits = u64::from_ne_bytes((v as i64).to_ne_bytes());
                if bits & !mask == 0 {
                    Ok(())
                } else {
                    Err(format!("argument {param} = {v:#x} sets bits outside {mask:#x}"))
                }
            }
            (Constraint::Text { prefix, max_len }, Value::Text(t)) => {
                if let Some(p) = prefix
                    && !t.starts_with(p.as_bytes())
                {
                    return Err(format!(
                        "argument {param} = {:?} does not start with {p:?}",
                        String::from_utf8_lossy(t)
                    ));
                }
                if let Some(m) = max_len
                    && t.len() > *m as usize
                {
                    return Err(format!("argument {param} is {} bytes long, more than {m}", t.len()));
                }
                Ok(())
            }
            (Constraint::Text { .. }, Value::Int(_)) => Err(format!("argument {param} is a number, not text")),
            (_, Value::Text(_)) => Err(format!("argument {param} is text, not a number")),
        }
    }
}

/// A constraint resolved for one method of one service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Compiled {
    pub(crate) param: String,
    /// `None`: the method has no such parameter, and the constraint can never hold.
    pub(crate) at: Option<ParamAt>,
    pub(crate) constraint: Constraint,
    /// The granting rule (or the whole policy) is in audit mode.
    pub(crate) audit: bool,
}

impl Compiled {
    pub(crate) fn check(&self, scalars: &[u64], struct_in: &[u8]) -> Result<(), String> {
        let value = self.at.and_then(|at| at.value(scalars, struct_in));
        match value {
            Some(v) => self.constraint.check(&self.param, v),
            None => Err(format!("argument {} is not part of this call", self.param)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Policy, Source};

    fn raw(toml: &str) -> RawConstraint {
        toml::from_str(toml).unwrap()
    }

    #[test]
    fn constraint_forms_check_values() {
        let range = raw("min = 10\nmax = 20").parse().unwrap();
        assert!(range.check("x", Value::Int(10)).is_ok() && range.check("x", Value::Int(20)).is_ok());
        assert!(
            range
                .check("x", Value::Int(21))
                .unwrap_err()
                .contains("outside 10..=20")
        );
        let one_of = raw("one_of = [9600, 115200]").parse().unwrap();
        assert!(one_of.check("baud", Value::Int(9600)).is_ok());
        assert!(one_of.check("baud", Value::Int(1)).is_err());
        let mask = raw("mask = 0x0f").parse().unwrap();
        assert!(mask.check("flags", Value::Int(0x0a)).is_ok());
        assert!(
            mask.check("flags", Value::Int(0x10))
                .unwrap_err()
                .contains("outside 0xf")
        );
        let text = raw("prefix = \"ab\"\nmax_len = 4").parse().unwrap();
        assert!(text.check("name", Value::Text(b"abcd")).is_ok());
        assert!(text.check("name", Value::Text(b"abcde")).is_err());
        assert!(text.check("name", Value::Text(b"xbc")).is_err());
        assert!(text.check("name", Value::Int(1)).is_err());
        assert!(range.check("x", Value::Text(b"1")).is_err());
    }

    #[test]
    fn constraint_needs_exactly_one_form() {
        assert!(raw("").parse().is_err());
        assert!(raw("min = 1\none_of = [1]").parse().is_err());
        assert!(raw("min = 5\nmax = 1").parse().is_err());
        assert!(raw("one_of = []").parse().is_err());
    }

    #[test]
    fn param_values_come_from_scalars_length_and_fields() {
        let mut s = vec![0u8; 16];
        s[4..8].copy_from_slice(&(-3i32).to_ne_bytes());
        s[8..13].copy_from_slice(b"abc\0z");
        assert_eq!(ParamAt::Scalar(1).value(&[5, 6], &s), Some(Value::Int(6)));
        assert_eq!(ParamAt::Scalar(2).value(&[5, 6], &s), None);
        assert_eq!(ParamAt::StructLen.value(&[], &s), Some(Value::Int(16)));
        assert_eq!(
            ParamAt::Field {
                offset: 4,
                size: 4,
                signed: true
            }
            .value(&[], &s),
            Some(Value::Int(-3))
        );
        assert_eq!(
            ParamAt::Field {
                offset: 4,
                size: 4,
                signed: false
            }
            .value(&[], &s),
            Some(Value::Int(0xffff_fffd))
        );
        assert_eq!(
            ParamAt::Chars { offset: 8, len: 5 }.value(&[], &s),
            Some(Value::Text(b"abc"))
        );
        assert_eq!(
            ParamAt::Field {
                offset: 14,
                size: 4,
                signed: false
            }
            .value(&[], &s),
            None
        );
    }

    #[test]
    fn args_parse_errors_are_located() {
        let text = "[[principal]]\nname = \"a\"\n[[rule]]\nid = \"f\"\neffect = \"forbid\"\nprincipals = [\"a\"]\nmethods = [\"add\"]\nargs.add.a = { max = 1 }\n[[rule]]\nid = \"r\"\neffect = \"allow\"\nprincipals = [\"a\"]\nmethods = [\"echo\"]\nargs.add.a = { max = 1 }\nargs.echo.len = { min = 3, one_of = [1] }\n";
        let err = Policy::parse(&[Source { origin: "p", text }]).unwrap_err();
        let rendered: Vec<String> = err.errors().iter().map(ToString::to_string).collect();
        assert_eq!(rendered.len(), 3, "{rendered:#?}");
        assert!(
            rendered[0].starts_with("p:8:14:") && rendered[0].contains("belong on allow rules"),
            "{}",
            rendered[0]
        );
        assert!(
            rendered[1].starts_with("p:14:14:") && rendered[1].contains("does not grant"),
            "{}",
            rendered[1]
        );
        assert!(
            rendered[2].starts_with("p:15:17:") && rendered[2].contains("exactly one of"),
            "{}",
            rendered[2]
        );
    }
}
