//! Struct descriptions, the one format drivers, tools and testers share (docs/LAYOUT.md):
//! fixed-width integers, `c_long`/`c_ulong`, pointer-sized handles, `f32`/`f64`, `bool`,
//! `char[N]`, fixed arrays and nested structs. Refused, with a reason: `long double`, bitfields,
//! unions and raw pointers.

use std::{collections::BTreeMap, fmt};

use serde::Deserialize;

use super::Abi;

/// A scalar field kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scalar {
    /// `uint8_t`.
    U8,
    /// `int8_t`.
    I8,
    /// `uint16_t`.
    U16,
    /// `int16_t`.
    I16,
    /// `uint32_t`.
    U32,
    /// `int32_t`.
    I32,
    /// `uint64_t`.
    U64,
    /// `int64_t`.
    I64,
    /// `long`.
    CLong,
    /// `unsigned long`.
    CULong,
    /// `uintptr_t`: an opaque pointer-sized handle (never dereferenced).
    Handle,
    /// `intptr_t` (`ssize_t`, `ptrdiff_t`): a signed pointer-sized integer.
    ISize,
    /// `float`.
    F32,
    /// `double`.
    F64,
    /// `_Bool`: 0 or 1.
    Bool,
}

/// Names in descriptions, in the order `portcullis layout` lists them.
pub const SCALAR_NAMES: [(&str, Scalar); 15] = [
    ("u8", Scalar::U8),
    ("i8", Scalar::I8),
    ("u16", Scalar::U16),
    ("i16", Scalar::I16),
    ("u32", Scalar::U32),
    ("i32", Scalar::I32),
    ("u64", Scalar::U64),
    ("i64", Scalar::I64),
    ("c_long", Scalar::CLong),
    ("c_ulong", Scalar::CULong),
    ("handle", Scalar::Handle),
    ("isize", Scalar::ISize),
    ("f32", Scalar::F32),
    ("f64", Scalar::F64),
    ("bool", Scalar::Bool),
];

impl Scalar {
    /// Size in bytes under `abi`.
    pub fn size(self, abi: &Abi) -> u32 {
        match self {
            Scalar::U8 | Scalar::I8 | Scalar::Bool => 1,
            Scalar::U16 | Scalar::I16 => 2,
            Scalar::U32 | Scalar::I32 | Scalar::F32 => 4,
            Scalar::U64 | Scalar::I64 | Scalar::F64 => 8,
            Scalar::CLong | Scalar::CULong => u32::from(abi.long),
            Scalar::Handle | Scalar::ISize => u32::from(abi.pointer),
        }
    }

    /// In-struct alignment under `abi`.
    pub fn align(self, abi: &Abi) -> u32 {
        let natural = match self {
            Scalar::U64 | Scalar::I64 => u32::from(abi.align_i64),
            Scalar::F64 => u32::from(abi.align_f64),
            Scalar::CLong | Scalar::CULong | Scalar::Handle | Scalar::ISize if self.size(abi) == 8 => {
                u32::from(abi.align_i64)
            }
            other => other.size(abi),
        };
        natural.min(u32::from(abi.align_cap))
    }

    /// Signed integer kinds.
    pub fn is_signed(self) -> bool {
        matches!(
            self,
            Scalar::I8 | Scalar::I16 | Scalar::I32 | Scalar::I64 | Scalar::CLong | Scalar::ISize
        )
    }

    /// The name in descriptions.
    pub fn name(self) -> &'static str {
        SCALAR_NAMES.iter().find(|(_, s)| *s == self).map_or("?", |(n, _)| n)
    }

    /// The C type.
    pub fn c_type(self) -> &'static str {
        match self {
            Scalar::U8 => "uint8_t",
            Scalar::I8 => "int8_t",
            Scalar::U16 => "uint16_t",
            Scalar::I16 => "int16_t",
            Scalar::U32 => "uint32_t",
            Scalar::I32 => "int32_t",
            Scalar::U64 => "uint64_t",
            Scalar::I64 => "int64_t",
            Scalar::CLong => "long",
            Scalar::CULong => "unsigned long",
            Scalar::Handle => "uintptr_t",
            Scalar::ISize => "intptr_t",
            Scalar::F32 => "float",
            Scalar::F64 => "double",
            Scalar::Bool => "bool",
        }
    }
}

/// The element type of a field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Elem {
    /// A scalar.
    Scalar(Scalar),
    /// `char`, only in `char[N]`: bytes copied as they are.
    Char,
    /// A struct described earlier in the same schema (its index).
    Struct(usize),
}

/// One field: an element, or a fixed array of them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Field {
    /// Field name, a C identifier.
    pub name: String,
    /// Element type.
    pub elem: Elem,
    /// Array length; `None` for a single element.
    pub count: Option<u32>,
    /// Names for the values of an integer field (`parity`: `none` = 0, `odd` = 1), for tools
    /// and the C header; the field still holds any integer, and drivers check the values.
    pub values: Vec<(String, u64)>,
}

/// One struct.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StructDesc {
    /// Struct name, a C identifier (the C tag is `struct NAME`).
    pub name: String,
    /// Fields in declaration order.
    pub fields: Vec<Field>,
}

/// A validated set of structs: names unique, nested structs described before use (so no cycles),
/// no empty structs, array lengths within bounds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Schema {
    structs: Vec<StructDesc>,
    /// Each struct's size and alignment under each ABI of the list (by wire number), computed
    /// once when it is added: nesting costs a lookup, not a recomputation.
    pub(super) sizes: Vec<[(u32, u32); super::ABIS.len()]>,
}

/// Why a description was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// The text is not valid TOML/JSON of the description shape.
    #[error("{0}")]
    Syntax(String),
    /// A field type is refused or unknown.
    #[error("struct {strukt}, field {field}: {reason}")]
    Type {
        /// The struct.
        strukt: String,
        /// The field.
        field: String,
        /// Why.
        reason: String,
    },
    /// A name is not a C identifier, or is used twice.
    #[error("{0}")]
    Name(String),
    /// The struct would be larger than a method may carry.
    #[error("struct {0} is larger than {max} bytes on some ABI", max = crate::limits::MAX_STRUCT)]
    TooLarge(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSchema {
    #[serde(rename = "struct", default)]
    structs: Vec<RawStruct>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStruct {
    name: String,
    fields: Vec<RawField>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawField {
    name: String,
    #[serde(rename = "type")]
    ty: String,
    /// `values = { none = 0, odd = 1 }`: names of an integer field's values.
    #[serde(default)]
    values: BTreeMap<String, u64>,
}

/// Longest array any field may declare.
const MAX_ARRAY: u32 = 65_536;

impl Schema {
    /// Parses a TOML description (`[[struct]]` tables).
    pub fn from_toml(text: &str) -> Result<Schema, LayoutError> {
        let raw: RawSchema = toml::from_str(text).map_err(|e| LayoutError::Syntax(e.to_string()))?;
        Schema::build(raw)
    }

    /// Parses a JSON description (`{"struct": [...]}`).
    pub fn from_json(text: &str) -> Result<Schema, LayoutError> {
        let raw: RawSchema = serde_json::from_str(text).map_err(|e| LayoutError::Syntax(e.to_string()))?;
        Schema::build(raw)
    }

    fn build(raw: RawSchema) -> Result<Schema, LayoutError> {
        let mut schema = Schema::default();
        for s in raw.structs {
            if !is_identifier(&s.name) {
                return Err(LayoutError::Name(format!(
                    "struct name {:?} is not a C identifier",
                    s.name
                )));
            }
            if let Some(why) = reserved_name(&s.name) {
                return Err(LayoutError::Name(format!(
                    "struct name {:?} {why}: the generated C would not compile",
                    s.name
                )));
            }
            if SCALAR_NAMES.iter().any(|(n, _)| *n == s.name) || s.name == "char" {
                return Err(LayoutError::Name(format!(
                    "struct name {:?} names a scalar type: a field of that type would be ambiguous",
                    s.name
                )));
            }
            if schema.index(&s.name).is_some() {
                return Err(LayoutError::Name(format!("struct {} is described twice", s.name)));
            }
            if s.fields.is_empty() {
                return Err(LayoutError::Name(format!("struct {} has no fields", s.name)));
            }
            let mut fields: Vec<Field> = Vec::with_capacity(s.fields.len());
            for f in s.fields {
                let err = |reason: String| LayoutError::Type {
                    strukt: s.name.clone(),
                    field: f.name.clone(),
                    reason,
                };
                if !is_identifier(&f.name) {
                    return Err(LayoutError::Name(format!(
                        "struct {}: field name {:?} is not a C identifier",
                        s.name, f.name
                    )));
                }
                if let Some(why) = reserved_name(&f.name) {
                    return Err(LayoutError::Name(format!(
                        "struct {}: field name {:?} {why}: the generated C would not compile",
                        s.name, f.name
                    )));
                }
                if fields.iter().any(|g| g.name == f.name) {
                    return Err(LayoutError::Name(format!(
                        "struct {}: field {} appears twice",
                        s.name, f.name
                    )));
                }
                let (elem, count) = schema.parse_type(&f.ty, &s.name).map_err(err)?;
                let values = check_values(&f.values, elem, count).map_err(err)?;
                fields.push(Field {
                    name: f.name,
                    elem,
                    count,
                    values,
                });
            }
            schema.structs.push(StructDesc { name: s.name, fields });
            let index = schema.structs.len() - 1;
            let mut sizes = [(0, 1); super::ABIS.len()];
            for (size, abi) in sizes.iter_mut().zip(super::ABIS.iter()) {
                let layout = schema.layout(index, abi);
                *size = (layout.size, layout.align);
            }
            schema.sizes.push(sizes);
            if sizes.iter().any(|(size, _)| *size > crate::limits::MAX_STRUCT) {
                return Err(LayoutError::TooLarge(
                    schema.structs.last().map(|s| s.name.clone()).unwrap_or_default(),
                ));
            }
        }
        Ok(schema)
    }

    fn parse_type(&self, ty: &str, current: &str) -> Result<(Elem, Option<u32>), String> {
        let ty = ty.trim();
        if ty.contains('*') {
            return Err("raw pointers are refused: pass a `handle` (pointer-sized integer) instead".into());
        }
        if ty.contains(':') {
            return Err("bitfields are refused: their order and packing differ between ABIs".into());
        }
        let (base, count) = match ty.split_once('[') {
            Some((base, rest)) => {
                let n = rest
                    .strip_suffix(']')
                    .ok_or_else(|| format!("bad array syntax {ty:?}, expected NAME[N]"))?;
                let n: u32 = n
                    .trim()
                    .parse()
                    .map_err(|_| format!("array length {n:?} is not a number"))?;
                if n == 0 || n > MAX_ARRAY {
                    return Err(format!("array length must be 1..={MAX_ARRAY}"));
                }
                (base.trim(), Some(n))
            }
            None => (ty, None),
        };
        if base == "union" || base.starts_with("union ") {
            return Err("unions are refused: describe each interpretation as its own struct".into());
        }
        if base.contains("long double") || base == "f128" || base == "long_double" {
            return Err("long double is refused: its size and format differ between ABIs (12, 16 bytes; x87, IBM double-double, binary128)".into());
        }
        if base == "char" {
            return match count {
                Some(_) => Ok((Elem::Char, count)),
                None => Err("char needs a length: char[N] (use i8 or u8 for a single byte)".into()),
            };
        }
        if let Some((_, s)) = SCALAR_NAMES.iter().find(|(n, _)| *n == base) {
            return Ok((Elem::Scalar(*s), count));
        }
        let base = base.strip_prefix("struct ").unwrap_or(base).trim();
        if base == current {
            return Err("a struct cannot contain itself".into());
        }
        match self.index(base) {
            Some(i) => Ok((Elem::Struct(i), count)),
            None => Err(format!(
                "unknown type {base:?} (scalars: {}; char[N]; or a struct described earlier)",
                SCALAR_NAMES.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
            )),
        }
    }

    /// All structs, in description order.
    pub fn structs(&self) -> &[StructDesc] {
        &self.structs
    }

    /// The index of the struct named `name`.
    pub fn index(&self, name: &str) -> Option<usize> {
        self.structs.iter().position(|s| s.name == name)
    }

    /// The struct at `index`. Indices come from this schema.
    pub fn get(&self, index: usize) -> Option<&StructDesc> {
        self.structs.get(index)
    }

    /// Struct names by index, for messages.
    pub fn names(&self) -> BTreeMap<usize, &str> {
        self.structs
            .iter()
            .enumerate()
            .map(|(i, s)| (i, s.name.as_str()))
            .collect()
    }
}

/// Named values of a field: only for a single integer field, names that are identifiers, values
/// that fit the field on every ABI; ordered by value.
fn check_values(values: &BTreeMap<String, u64>, elem: Elem, count: Option<u32>) -> Result<Vec<(String, u64)>, String> {
    if values.is_empty() {
        return Ok(Vec::new());
    }
    let Elem::Scalar(scalar) = elem else {
        return Err("only integer fields have named values".into());
    };
    if count.is_some() || matches!(scalar, Scalar::F32 | Scalar::F64 | Scalar::Bool) {
        return Err("only single integer fields have named values".into());
    }
    // The narrowest width the field has on any ABI.
    let bits = super::ABIS.iter().map(|abi| scalar.size(abi) * 8).min().unwrap_or(64);
    let mut named: Vec<(String, u64)> = Vec::with_capacity(values.len());
    for (name, value) in values {
        if !is_identifier(name) {
            return Err(format!("value name {name:?} is not an identifier"));
        }
        if bits < 64 && *value >> bits != 0 {
            return Err(format!("value {name} = {value} does not fit the field"));
        }
        named.push((name.clone(), *value));
    }
    named.sort_by_key(|(_, v)| *v);
    Ok(named)
}

/// Why a C identifier cannot name a struct or a field of the generated C: a keyword, a name the
/// standard headers the generated code includes define, or one reserved for the implementation.
fn reserved_name(s: &str) -> Option<&'static str> {
    const KEYWORDS: &[&str] = &[
        "auto",
        "break",
        "case",
        "char",
        "const",
        "continue",
        "default",
        "do",
        "double",
        "else",
        "enum",
        "extern",
        "float",
        "for",
        "goto",
        "if",
        "inline",
        "int",
        "long",
        "register",
        "restrict",
        "return",
        "short",
        "signed",
        "sizeof",
        "static",
        "struct",
        "switch",
        "typedef",
        "union",
        "unsigned",
        "void",
        "volatile",
        "while",
        "_Alignas",
        "_Alignof",
        "_Atomic",
        "_Bool",
        "_Complex",
        "_Generic",
        "_Imaginary",
        "_Noreturn",
        "_Static_assert",
        "_Thread_local",
        "alignas",
        "alignof",
        "bool",
        "constexpr",
        "false",
        "nullptr",
        "static_assert",
        "thread_local",
        "true",
        "typeof",
        "typeof_unqual",
        "_BitInt",
        "_Decimal32",
        "_Decimal64",
        "_Decimal128",
    ];
    const STANDARD: &[&str] = &[
        "NULL",
        "offsetof",
        "size_t",
        "ssize_t",
        "ptrdiff_t",
        "wchar_t",
        "max_align_t",
        "intptr_t",
        "uintptr_t",
        "intmax_t",
        "uintmax_t",
        "__bool_true_false_are_defined",
    ];
    if KEYWORDS.contains(&s) {
        return Some("is a C keyword");
    }
    let int_type = |t: &str| {
        let t = t.strip_prefix('u').unwrap_or(t);
        let t = t.strip_prefix("int").and_then(|t| t.strip_suffix("_t"));
        let t = t.map(|t| t.strip_prefix("_least").or(t.strip_prefix("_fast")).unwrap_or(t));
        matches!(t, Some("8" | "16" | "32" | "64"))
    };
    let int_macro = |m: &str| {
        let prefixed = ["INT", "UINT", "SIZE_", "PTRDIFF_", "SIG_ATOMIC_", "WCHAR_", "WINT_"]
            .iter()
            .any(|p| m.starts_with(p));
        prefixed && (m.ends_with("_MAX") || m.ends_with("_MIN") || m.ends_with("_C") || m == "SIZE_MAX")
    };
    if STANDARD.contains(&s) || int_type(s) || int_macro(s) {
        return Some("is defined by the C standard headers");
    }
    let mut chars = s.chars();
    if s.starts_with("__") || (chars.next() == Some('_') && chars.next().is_some_and(|c| c.is_ascii_uppercase())) {
        return Some("is reserved for the C implementation");
    }
    None
}

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

impl fmt::Display for Elem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Elem::Scalar(s) => f.write_str(s.name()),
            Elem::Char => f.write_str("char"),
            Elem::Struct(i) => write!(f, "struct#{i}"),
        }
    }
}
