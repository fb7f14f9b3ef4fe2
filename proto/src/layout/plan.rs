//! Translation plans: one per (struct, client ABI, direction), compiled once, run per call.
//!
//! A plan reads a buffer of exactly the source layout's size and writes every field into a
//! **zeroed** buffer of the destination layout's size: padding is never copied. Integers are
//! sign- or zero-extended by type when they widen; when they narrow, a value that does not fit
//! is [`TranslateError::Overflow`], never a truncation. `bool` must be 0 or 1. Floats are
//! byte-swapped between byte orders and otherwise copied bit for bit.

use super::{Abi, Elem, Scalar, Schema};

/// One step of a plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    /// Bytes whose representation is the same on both sides.
    Copy { src: u32, dst: u32, len: u32 },
    /// An integer of `from` bytes to `to` bytes.
    Int {
        src: u32,
        dst: u32,
        from: u8,
        to: u8,
        signed: bool,
        field: u16,
    },
    /// A float of `len` bytes between byte orders.
    Swap { src: u32, dst: u32, len: u8 },
    /// A `bool`: checked to be 0 or 1.
    Bool { src: u32, dst: u32, field: u16 },
}

/// A compiled translation between two layouts of one struct.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    src_size: u32,
    dst_size: u32,
    src_be: bool,
    dst_be: bool,
    ops: Vec<Op>,
    /// Dotted field paths, for errors.
    fields: Vec<String>,
}

/// A translation refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TranslateError {
    /// The buffer is not exactly the source layout's size.
    #[error("struct is {got} bytes, expected exactly {expected} for this ABI")]
    Size {
        /// The layout's size.
        expected: usize,
        /// What was given.
        got: usize,
    },
    /// A value does not fit the destination type.
    #[error("field {field}: value does not fit the destination type")]
    Overflow {
        /// Dotted path of the field.
        field: String,
    },
    /// A `bool` byte other than 0 or 1.
    #[error("field {field}: bool byte is {value}, must be 0 or 1")]
    Bool {
        /// Dotted path of the field.
        field: String,
        /// The byte.
        value: u8,
    },
}

/// One leaf of a flattened struct: a scalar or a run of chars, at its offset on each side.
struct Leaf {
    elem: Elem,
    src: u32,
    dst: u32,
    len_src: u32,
    len_dst: u32,
    path: String,
}

impl Schema {
    /// The plan translating the struct at `index` from `from`'s layout to `to`'s.
    pub fn plan(&self, index: usize, from: &Abi, to: &Abi) -> Plan {
        let mut leaves = Vec::new();
        self.flatten(index, from, to, 0, 0, "", &mut leaves);
        let mut plan = Plan {
            src_size: self.layout(index, from).size,
            dst_size: self.layout(index, to).size,
            src_be: from.big_endian,
            dst_be: to.big_endian,
            ops: Vec::with_capacity(leaves.len()),
            fields: Vec::new(),
        };
        for leaf in leaves {
            let same_order = from.big_endian == to.big_endian;
            let op = match leaf.elem {
                Elem::Char => Op::Copy {
                    src: leaf.src,
                    dst: leaf.dst,
                    len: leaf.len_src,
                },
                Elem::Scalar(Scalar::U8 | Scalar::I8) => Op::Copy {
                    src: leaf.src,
                    dst: leaf.dst,
                    len: 1,
                },
                Elem::Scalar(Scalar::Bool) => Op::Bool {
                    src: leaf.src,
                    dst: leaf.dst,
                    field: plan.field(&leaf.path),
                },
                Elem::Scalar(Scalar::F32 | Scalar::F64) if same_order => Op::Copy {
                    src: leaf.src,
                    dst: leaf.dst,
                    len: leaf.len_src,
                },
                Elem::Scalar(Scalar::F32 | Scalar::F64) => Op::Swap {
                    src: leaf.src,
                    dst: leaf.dst,
                    len: leaf.len_src as u8,
                },
                Elem::Scalar(_) if same_order && leaf.len_src == leaf.len_dst => Op::Copy {
                    src: leaf.src,
                    dst: leaf.dst,
                    len: leaf.len_src,
                },
                Elem::Scalar(s) => Op::Int {
                    src: leaf.src,
                    dst: leaf.dst,
                    from: leaf.len_src as u8,
                    to: leaf.len_dst as u8,
                    signed: s.is_signed(),
                    field: plan.field(&leaf.path),
                },
                Elem::Struct(_) => continue,
            };
            plan.push(op);
        }
        plan
    }

    #[allow(clippy::too_many_arguments)]
    fn flatten(
        &self,
        index: usize,
        from: &Abi,
        to: &Abi,
        src_base: u32,
        dst_base: u32,
        prefix: &str,
        out: &mut Vec<Leaf>,
    ) {
        let (src, dst) = (self.layout(index, from), self.layout(index, to));
        for (fs, fd) in src.fields.iter().zip(&dst.fields) {
            let count = fs.count.unwrap_or(1);
            let (es, _) = self.elem_size_align(fs.elem, from);
            let (ed, _) = self.elem_size_align(fs.elem, to);
            if fs.elem == Elem::Char {
                let path = format!("{prefix}{}", fs.name);
                out.push(Leaf {
                    elem: Elem::Char,
                    src: src_base + fs.offset,
                    dst: dst_base + fd.offset,
                    len_src: fs.size,
                    len_dst: fd.size,
                    path,
                });
                continue;
            }
            for i in 0..count {
                let path = match fs.count {
                    Some(_) => format!("{prefix}{}[{i}]", fs.name),
                    None => format!("{prefix}{}", fs.name),
                };
                let (s, d) = (src_base + fs.offset + i * es, dst_base + fd.offset + i * ed);
                match fs.elem {
                    Elem::Struct(inner) => self.flatten(inner, from, to, s, d, &format!("{path}."), out),
                    elem => out.push(Leaf {
                        elem,
                        src: s,
                        dst: d,
                        len_src: es,
                        len_dst: ed,
                        path,
                    }),
                }
            }
        }
    }
}

impl Plan {
    fn field(&mut self, path: &str) -> u16 {
        self.fields.push(path.to_string());
        u16::try_from(self.fields.len() - 1).unwrap_or(u16::MAX)
    }

    /// Appends an op, merging a copy that continues the previous one on both sides.
    fn push(&mut self, op: Op) {
        if let (
            Some(Op::Copy { src, dst, len }),
            Op::Copy {
                src: s2,
                dst: d2,
                len: l2,
            },
        ) = (self.ops.last_mut(), op)
            && *src + *len == s2
            && *dst + *len == d2
        {
            *len += l2;
            return;
        }
        self.ops.push(op);
    }

    /// Size of the source layout: what a caller must supply exactly.
    pub fn src_size(&self) -> usize {
        self.src_size as usize
    }

    /// Size of the destination layout.
    pub fn dst_size(&self) -> usize {
        self.dst_size as usize
    }

    /// Translates `src` into a new zeroed buffer of the destination size.
    pub fn translate(&self, src: &[u8]) -> Result<Vec<u8>, TranslateError> {
        if src.len() != self.src_size() {
            return Err(TranslateError::Size {
                expected: self.src_size(),
                got: src.len(),
            });
        }
        let mut dst = vec![0u8; self.dst_size()];
        for op in &self.ops {
            self.run(*op, src, &mut dst)?;
        }
        Ok(dst)
    }

    fn name(&self, field: u16) -> String {
        self.fields.get(usize::from(field)).cloned().unwrap_or_default()
    }

    fn run(&self, op: Op, src: &[u8], dst: &mut [u8]) -> Result<(), TranslateError> {
        // Offsets come from the layouts the plan was compiled for, and `src`/`dst` have exactly
        // those sizes, so the ranges are in bounds; `get` keeps that a checked fact.
        let range = |at: u32, len: u32| at as usize..at as usize + len as usize;
        let size = |got: usize| TranslateError::Size {
            expected: self.src_size(),
            got,
        };
        match op {
            Op::Copy { src: s, dst: d, len } => {
                let from = src.get(range(s, len)).ok_or(size(src.len()))?;
                dst.get_mut(range(d, len)).ok_or(size(src.len()))?.copy_from_slice(from);
            }
            Op::Swap { src: s, dst: d, len } => {
                let from = src.get(range(s, u32::from(len))).ok_or(size(src.len()))?;
                let to = dst.get_mut(range(d, u32::from(len))).ok_or(size(src.len()))?;
                for (t, f) in to.iter_mut().zip(from.iter().rev()) {
                    *t = *f;
                }
            }
            Op::Bool { src: s, dst: d, field } => {
                let value = *src.get(s as usize).ok_or(size(src.len()))?;
                if value > 1 {
                    return Err(TranslateError::Bool {
                        field: self.name(field),
                        value,
                    });
                }
                *dst.get_mut(d as usize).ok_or(size(src.len()))? = value;
            }
            Op::Int {
                src: s,
                dst: d,
                from,
                to,
                signed,
                field,
            } => {
                let bytes = src.get(range(s, u32::from(from))).ok_or(size(src.len()))?;
                let value = read_int(bytes, self.src_be, signed);
                if !fits(value, to, signed) {
                    return Err(TranslateError::Overflow {
                        field: self.name(field),
                    });
                }
                write_int(
                    dst.get_mut(range(d, u32::from(to))).ok_or(size(src.len()))?,
                    value,
                    self.dst_be,
                );
            }
        }
        Ok(())
    }
}

/// Reads an integer, sign- or zero-extended to 64 bits (as raw bits in a `u64`).
fn read_int(bytes: &[u8], big_endian: bool, signed: bool) -> u64 {
    let mut v: u64 = 0;
    if big_endian {
        for b in bytes {
            v = v << 8 | u64::from(*b);
        }
    } else {
        for b in bytes.iter().rev() {
            v = v << 8 | u64::from(*b);
        }
    }
    let bits = bytes.len() as u32 * 8;
    if signed && bits < 64 && (v >> (bits - 1)) & 1 == 1 {
        v |= u64::MAX << bits;
    }
    v
}

/// Whether a 64-bit value (sign-extended when signed) fits `to` bytes.
fn fits(value: u64, to: u8, signed: bool) -> bool {
    if to >= 8 {
        return true;
    }
    let bits = u32::from(to) * 8;
    if signed {
        let v = value as i64;
        let half = 1i64 << (bits - 1);
        (-half..half).contains(&v)
    } else {
        value >> bits == 0
    }
}

fn write_int(out: &mut [u8], value: u64, big_endian: bool) {
    let n = out.len();
    for (i, b) in out.iter_mut().enumerate() {
        let shift = if big_endian { (n - 1 - i) * 8 } else { i * 8 };
        *b = (value >> shift) as u8;
    }
}
