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
    Copy {
        src: u32,
        dst: u32,
        len: u32,
    },
    /// An integer of `from` bytes to `to` bytes.
    Int {
        src: u32,
        dst: u32,
        from: u8,
        to: u8,
        signed: bool,
        field: u16,
    },
    /// A float, or an integer of the same width on both sides, between byte orders.
    Swap {
        src: u32,
        dst: u32,
        len: u8,
    },
    /// Fixed-width forms of the two above, compiled from them: straight-line code per op.
    /// A 4-byte integer widened to 8 bytes (a 32-bit client's `long` into a 64-bit broker's):
    /// it always fits.
    Widen4 {
        src: u32,
        dst: u32,
        signed: bool,
    },
    Move1 {
        src: u32,
        dst: u32,
    },
    Move2 {
        src: u32,
        dst: u32,
    },
    Move4 {
        src: u32,
        dst: u32,
    },
    Move8 {
        src: u32,
        dst: u32,
    },
    Swap2 {
        src: u32,
        dst: u32,
    },
    Swap4 {
        src: u32,
        dst: u32,
    },
    Swap8 {
        src: u32,
        dst: u32,
    },
    /// A `bool`: checked to be 0 or 1.
    Bool {
        src: u32,
        dst: u32,
        field: u16,
    },
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

/// What went wrong in one op, cheap to return.
#[derive(Clone, Copy)]
enum Fault {
    Size,
    Overflow(u16),
    Bool(u16, u8),
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
                // Same width, other byte order: nothing can overflow, only the order changes.
                Elem::Scalar(_) if leaf.len_src == leaf.len_dst => Op::Swap {
                    src: leaf.src,
                    dst: leaf.dst,
                    len: leaf.len_src as u8,
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
        for op in &mut plan.ops {
            *op = match *op {
                Op::Int {
                    src,
                    dst,
                    from: 4,
                    to: 8,
                    signed,
                    ..
                } => Op::Widen4 { src, dst, signed },
                Op::Copy { src, dst, len: 1 } => Op::Move1 { src, dst },
                Op::Copy { src, dst, len: 2 } => Op::Move2 { src, dst },
                Op::Copy { src, dst, len: 4 } => Op::Move4 { src, dst },
                Op::Copy { src, dst, len: 8 } => Op::Move8 { src, dst },
                Op::Swap { src, dst, len: 2 } => Op::Swap2 { src, dst },
                Op::Swap { src, dst, len: 4 } => Op::Swap4 { src, dst },
                Op::Swap { src, dst, len: 8 } => Op::Swap8 { src, dst },
                other => other,
            };
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

    /// Whether a translation by this plan can fail with [`TranslateError::Overflow`]: some
    /// integer narrows (a 64-bit `long` into a 32-bit client's).
    pub fn can_overflow(&self) -> bool {
        self.ops
            .iter()
            .any(|op| matches!(op, Op::Int { from, to, .. } if to < from))
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
            if let Err(fault) = self.run(*op, src, &mut dst) {
                return Err(self.error(fault, src.len()));
            }
        }
        Ok(dst)
    }

    fn error(&self, fault: Fault, got: usize) -> TranslateError {
        match fault {
            Fault::Size => TranslateError::Size {
                expected: self.src_size(),
                got,
            },
            Fault::Overflow(field) => TranslateError::Overflow {
                field: self.name(field),
            },
            Fault::Bool(field, value) => TranslateError::Bool {
                field: self.name(field),
                value,
            },
        }
    }

    fn name(&self, field: u16) -> String {
        self.fields.get(usize::from(field)).cloned().unwrap_or_default()
    }

    /// One op. Faults are small codes, made into errors only when one happens.
    #[inline]
    fn run(&self, op: Op, src: &[u8], dst: &mut [u8]) -> Result<(), Fault> {
        // Offsets come from the layouts the plan was compiled for, and `src`/`dst` have exactly
        // those sizes, so every range is in bounds; `get` keeps that a checked fact.
        let size = || Fault::Size;
        let range = |at: u32, len: usize| at as usize..at as usize + len;
        match op {
            Op::Widen4 { src: s, dst: d, signed } => {
                let b = get::<4>(src, s)?;
                let v = if self.src_be {
                    u32::from_be_bytes(b)
                } else {
                    u32::from_le_bytes(b)
                };
                let wide = if signed { v as i32 as i64 as u64 } else { u64::from(v) };
                put::<8>(
                    dst,
                    d,
                    if self.dst_be {
                        wide.to_be_bytes()
                    } else {
                        wide.to_le_bytes()
                    },
                )?
            }
            Op::Move1 { src: s, dst: d } => put::<1>(dst, d, get::<1>(src, s)?)?,
            Op::Move2 { src: s, dst: d } => put::<2>(dst, d, get::<2>(src, s)?)?,
            Op::Move4 { src: s, dst: d } => put::<4>(dst, d, get::<4>(src, s)?)?,
            Op::Move8 { src: s, dst: d } => put::<8>(dst, d, get::<8>(src, s)?)?,
            Op::Swap2 { src: s, dst: d } => put::<2>(dst, d, reversed(get::<2>(src, s)?))?,
            Op::Swap4 { src: s, dst: d } => put::<4>(dst, d, reversed(get::<4>(src, s)?))?,
            Op::Swap8 { src: s, dst: d } => put::<8>(dst, d, reversed(get::<8>(src, s)?))?,
            Op::Copy { src: s, dst: d, len } => {
                let from = src.get(range(s, len as usize)).ok_or_else(size)?;
                let to = dst.get_mut(range(d, len as usize)).ok_or_else(size)?;
                match len {
                    // Word-sized copies as moves, not memcpy calls.
                    1 | 2 | 4 | 8 => store(to, load(from, false), false),
                    _ => to.copy_from_slice(from),
                }
            }
            Op::Swap { src: s, dst: d, len } => {
                let from = src.get(range(s, usize::from(len))).ok_or_else(size)?;
                let to = dst.get_mut(range(d, usize::from(len))).ok_or_else(size)?;
                store(to, load(from, self.src_be), self.dst_be);
            }
            Op::Bool { src: s, dst: d, field } => {
                let value = *src.get(s as usize).ok_or_else(size)?;
                if value > 1 {
                    return Err(Fault::Bool(field, value));
                }
                *dst.get_mut(d as usize).ok_or_else(size)? = value;
            }
            Op::Int {
                src: s,
                dst: d,
                from,
                to,
                signed,
                field,
            } => {
                let bytes = src.get(range(s, usize::from(from))).ok_or_else(size)?;
                let mut value = load(bytes, self.src_be);
                if signed && from < 8 {
                    let shift = 64 - u32::from(from) * 8;
                    value = (((value << shift) as i64) >> shift) as u64;
                }
                if !fits(value, to, signed) {
                    return Err(Fault::Overflow(field));
                }
                store(
                    dst.get_mut(range(d, usize::from(to))).ok_or_else(size)?,
                    value,
                    self.dst_be,
                );
            }
        }
        Ok(())
    }
}

/// `N` bytes of `buf` at `at`.
#[inline(always)]
fn get<const N: usize>(buf: &[u8], at: u32) -> Result<[u8; N], Fault> {
    buf.get(at as usize..at as usize + N)
        .and_then(|b| b.try_into().ok())
        .ok_or(Fault::Size)
}

/// Writes `N` bytes into `buf` at `at`.
#[inline(always)]
fn put<const N: usize>(buf: &mut [u8], at: u32, bytes: [u8; N]) -> Result<(), Fault> {
    buf.get_mut(at as usize..at as usize + N)
        .ok_or(Fault::Size)?
        .copy_from_slice(&bytes);
    Ok(())
}

#[inline(always)]
fn reversed<const N: usize>(mut bytes: [u8; N]) -> [u8; N] {
    bytes.reverse();
    bytes
}

/// Reads an unsigned integer of 1, 2, 4 or 8 bytes in the given byte order.
#[inline]
fn load(bytes: &[u8], big_endian: bool) -> u64 {
    macro_rules! word {
        ($t:ty) => {{
            let a = bytes.try_into().unwrap_or_default();
            u64::from(if big_endian {
                <$t>::from_be_bytes(a)
            } else {
                <$t>::from_le_bytes(a)
            })
        }};
    }
    match bytes.len() {
        1 => bytes.first().copied().map_or(0, u64::from),
        2 => word!(u16),
        4 => word!(u32),
        _ => word!(u64),
    }
}

/// Writes the low bytes of `value` (1, 2, 4 or 8 of them) in the given byte order.
#[inline]
fn store(out: &mut [u8], value: u64, big_endian: bool) {
    macro_rules! word {
        ($t:ty) => {{
            let v = value as $t;
            out.copy_from_slice(&if big_endian { v.to_be_bytes() } else { v.to_le_bytes() })
        }};
    }
    match out.len() {
        1 => out.fill(value as u8),
        2 => word!(u16),
        4 => word!(u32),
        _ => word!(u64),
    }
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
