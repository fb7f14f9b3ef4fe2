//! Structs by field name, for `portcullis call`: a method's input struct built from
//! `--field NAME=VALUE`, its output struct printed field by field. Layouts come from the
//! drivers' own descriptions (the schema `portcullis schema` prints), in the broker's native
//! layout, which is what a gRPC client speaks.

use portcullis_proto::layout::{AbiId, Elem, Scalar, Schema, StructLayout};
use serde_json::{Value, json};

use portcullis_broker::drivers;

/// A struct of a family's schema, by the service class and the struct's name.
pub(crate) struct Described {
    schema: &'static Schema,
    layout: StructLayout,
    index: usize,
}

impl Described {
    /// The struct `name` of class `class`'s family, if the class is one of this build's.
    pub(crate) fn find(class: &str, name: &str) -> Option<Described> {
        let family = drivers::families().into_iter().find(|f| f.class == class)?;
        let schema = family.schema();
        let index = schema.index(name)?;
        Some(Described {
            schema,
            layout: schema.layout(index, AbiId::native().abi()),
            index,
        })
    }

    /// The struct's name.
    pub(crate) fn name(&self) -> &str {
        self.schema.get(self.index).map_or("", |s| s.name.as_str())
    }

    /// Its size.
    pub(crate) fn size(&self) -> usize {
        self.layout.size as usize
    }

    fn named_values(&self, field: &str) -> &[(String, u64)] {
        self.schema
            .get(self.index)
            .and_then(|s| s.fields.iter().find(|f| f.name == field))
            .map_or(&[], |f| f.values.as_slice())
    }

    /// `base` (or zeros) with each `NAME=VALUE` of `fields` written in.
    pub(crate) fn encode(&self, base: Option<Vec<u8>>, fields: &[String]) -> Result<Vec<u8>, String> {
        let mut bytes = base
            .filter(|b| b.len() == self.size())
            .unwrap_or_else(|| vec![0; self.size()]);
        for spec in fields {
            let (name, text) = spec
                .split_once('=')
                .ok_or_else(|| format!("--field {spec:?}: NAME=VALUE"))?;
            let field = self.layout.fields.iter().find(|f| f.name == name).ok_or_else(|| {
                let known: Vec<&str> = self.layout.fields.iter().map(|f| f.name.as_str()).collect();
                format!(
                    "struct {} has no field {name:?} (it has: {})",
                    self.name(),
                    known.join(", ")
                )
            })?;
            let at = field.offset as usize..(field.offset + field.size) as usize;
            let slot = bytes
                .get_mut(at)
                .ok_or_else(|| format!("field {name} is outside the struct"))?;
            match (field.elem, field.count) {
                (Elem::Char, Some(_)) => {
                    let text = text.as_bytes();
                    if text.len() > slot.len() {
                        return Err(format!("field {name} holds at most {} bytes", slot.len()));
                    }
                    slot.fill(0);
                    slot.get_mut(..text.len()).unwrap_or_default().copy_from_slice(text);
                }
                (Elem::Scalar(Scalar::F32), None) => {
                    let v: f32 = text
                        .parse()
                        .map_err(|_| format!("field {name}: {text:?} is not a number"))?;
                    slot.copy_from_slice(&v.to_ne_bytes());
                }
                (Elem::Scalar(Scalar::F64), None) => {
                    let v: f64 = text
                        .parse()
                        .map_err(|_| format!("field {name}: {text:?} is not a number"))?;
                    slot.copy_from_slice(&v.to_ne_bytes());
                }
                (Elem::Scalar(scalar), None) => {
                    let value = self.parse_integer(name, scalar, text)?;
                    let word = value.to_ne_bytes();
                    let width = slot.len();
                    let start = if cfg!(target_endian = "little") { 0 } else { 8 - width };
                    let high = if cfg!(target_endian = "little") {
                        word.get(width..)
                    } else {
                        word.get(..start)
                    }
                    .unwrap_or_default();
                    let sign_fill = if scalar.is_signed() && (value as i64) < 0 {
                        0xff
                    } else {
                        0
                    };
                    if high.iter().any(|b| *b != sign_fill) {
                        return Err(format!("field {name}: {text} does not fit {} bytes", width));
                    }
                    slot.copy_from_slice(word.get(start..start + width).unwrap_or_default());
                }
                _ => {
                    return Err(format!(
                        "field {name} is an array or a struct: give the whole input with --struct-hex"
                    ));
                }
            }
        }
        Ok(bytes)
    }

    fn parse_integer(&self, name: &str, scalar: Scalar, text: &str) -> Result<u64, String> {
        if scalar == Scalar::Bool {
            return match text {
                "true" | "1" => Ok(1),
                "false" | "0" => Ok(0),
                _ => Err(format!("field {name}: true or false")),
            };
        }
        if let Some((_, v)) = self.named_values(name).iter().find(|(n, _)| n == text) {
            return Ok(*v);
        }
        super::call::parse_scalar(text).map_err(|e| {
            let names: Vec<&str> = self.named_values(name).iter().map(|(n, _)| n.as_str()).collect();
            if names.is_empty() {
                format!("field {name}: {e}")
            } else {
                format!("field {name}: {e}, or one of {}", names.join(", "))
            }
        })
    }

    /// The fields of `bytes` (this struct, native layout), in order: name and value.
    pub(crate) fn decode(&self, bytes: &[u8]) -> Vec<(String, Value)> {
        self.layout
            .fields
            .iter()
            .map(|f| {
                let raw = bytes
                    .get(f.offset as usize..(f.offset + f.size) as usize)
                    .unwrap_or_default();
                let value = match (f.elem, f.count) {
                    (Elem::Char, Some(_)) => {
                        let end = raw.iter().position(|b| *b == 0).unwrap_or(raw.len());
                        json!(String::from_utf8_lossy(raw.get(..end).unwrap_or_default()))
                    }
                    (Elem::Scalar(Scalar::F32), None) => json!(f32::from_ne_bytes(raw.try_into().unwrap_or_default())),
                    (Elem::Scalar(Scalar::F64), None) => json!(f64::from_ne_bytes(raw.try_into().unwrap_or_default())),
                    (Elem::Scalar(Scalar::Bool), None) => json!(raw.first().is_some_and(|b| *b != 0)),
                    (Elem::Scalar(scalar), None) => {
                        let mut word = [0u8; 8];
                        let start = if cfg!(target_endian = "little") {
                            0
                        } else {
                            8 - raw.len()
                        };
                        if let Some(dst) = word.get_mut(start..start + raw.len()) {
                            dst.copy_from_slice(raw);
                        }
                        let value = u64::from_ne_bytes(word);
                        match self.named_values(&f.name).iter().find(|(_, v)| *v == value) {
                            Some((name, _)) => json!(name),
                            None if scalar.is_signed() => {
                                let shift = 64 - 8 * raw.len() as u32;
                                json!(((value << shift) as i64) >> shift)
                            }
                            None => json!(value),
                        }
                    }
                    _ => json!(super::json::hex(raw)),
                };
                (f.name.clone(), value)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_encode_by_name_and_value_names_and_decode_back() {
        let line = Described::find("TtyDevice", "tty_line").unwrap();
        let bytes = line
            .encode(
                None,
                &[
                    "baud=115200".into(),
                    "parity=even".into(),
                    "data_bits=8".into(),
                    "flow=rtscts".into(),
                ],
            )
            .unwrap();
        let fields: serde_json::Map<String, Value> = line.decode(&bytes).into_iter().collect();
        assert_eq!(fields["baud"], 115_200);
        assert_eq!(fields["parity"], "even");
        assert_eq!(fields["flow"], "rtscts");
        assert_eq!(fields["stop_bits"], 0);
        // A base keeps the fields not given.
        let again = line.encode(Some(bytes.clone()), &["baud=9600".into()]).unwrap();
        let fields: serde_json::Map<String, Value> = line.decode(&again).into_iter().collect();
        assert_eq!(
            (fields["baud"].clone(), fields["parity"].clone()),
            (json!(9600), json!("even"))
        );
    }

    #[test]
    fn fields_that_do_not_exist_or_fit_are_refused_with_what_would() {
        let line = Described::find("TtyDevice", "tty_line").unwrap();
        let e = line.encode(None, &["speed=1".into()]).unwrap_err();
        assert!(e.contains("has no field \"speed\"") && e.contains("baud"), "{e}");
        let e = line.encode(None, &["data_bits=256".into()]).unwrap_err();
        assert!(e.contains("does not fit 1 bytes"), "{e}");
        let e = line.encode(None, &["parity=sometimes".into()]).unwrap_err();
        assert!(e.contains("none, odd, even"), "{e}");
        let e = line.encode(None, &["baud".into()]).unwrap_err();
        assert!(e.contains("NAME=VALUE"), "{e}");
    }
}
