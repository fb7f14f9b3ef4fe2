//! Entry points of the fuzz targets in `fuzz/` (hidden: not part of the API). Each checks the
//! invariants its target promises and panics when one breaks, which libFuzzer reports as a
//! crash.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

use crate::{
    frame::{ClientFrame, ServerFrame, encode},
    layout::{ABIS, Abi, AbiId, Elem, Schema, TranslateError},
};

/// Native frames: arbitrary bytes → decode. A frame that decodes is canonical: encoding it again
/// gives exactly the bytes it came from (strict decoding admits one encoding per frame). Returns
/// what decoded, as a client frame and as a server frame.
pub fn native_frame(data: &[u8]) -> (Option<ClientFrame>, Option<ServerFrame>) {
    let client = ClientFrame::decode(data).ok();
    if let Some(frame) = &client {
        assert_eq!(
            encode(frame).as_deref(),
            Some(data),
            "client frame not canonical: {frame:?}"
        );
    }
    let server = ServerFrame::decode(data).ok();
    if let Some(frame) = &server {
        assert_eq!(
            encode(frame).as_deref(),
            Some(data),
            "server frame not canonical: {frame:?}"
        );
    }
    (client, server)
}

/// Which bytes of a struct hold data (the rest is padding), nested structs included.
pub fn data_mask(schema: &Schema, index: usize, abi: &Abi) -> Vec<bool> {
    let layout = schema.layout(index, abi);
    let mut mask = vec![false; layout.size as usize];
    for f in &layout.fields {
        let count = f.count.unwrap_or(1).max(1);
        let each = (f.size / count) as usize;
        for k in 0..count as usize {
            let base = f.offset as usize + k * each;
            match f.elem {
                Elem::Scalar(_) | Elem::Char => mask[base..base + each].iter_mut().for_each(|b| *b = true),
                Elem::Struct(inner) => {
                    for (j, b) in data_mask(schema, inner, abi).into_iter().enumerate() {
                        mask[base + j] |= b;
                    }
                }
            }
        }
    }
    mask
}

fn same_data(mask: &[bool], a: &[u8], b: &[u8]) -> bool {
    mask.iter().zip(a.iter().zip(b)).all(|(m, (x, y))| !m || x == y)
}

fn padding_is_zero(mask: &[bool], bytes: &[u8]) -> bool {
    mask.iter().zip(bytes).all(|(m, b)| *m || *b == 0)
}

/// Every plan of `schema`, both ways between the ABI `data[0]` picks and the native one, on the
/// rest of the bytes. Invariants: no panic; a buffer of the wrong size is refused as such; the
/// output is exactly the destination size with zero padding; translating back gives the same
/// field values.
///
/// With the third bit of the flags byte set, the rest is instead a struct description (TOML,
/// or JSON when it starts with `{`) as `portcullis layout` reads one: a description that is
/// accepted must give C declarations and layout asserts, and every plan of it must keep the
/// invariants above on bytes derived from the description itself.
pub fn layout_translate(schema: &Schema, data: &[u8]) {
    let [pick, index, flags, rest @ ..] = data else { return };
    if flags & 4 != 0 {
        let Ok(text) = std::str::from_utf8(rest) else { return };
        let parsed = if text.trim_start().starts_with('{') {
            Schema::from_json(text)
        } else {
            Schema::from_toml(text)
        };
        let Ok(described) = parsed else { return };
        let _ = described.c_declarations();
        for abi in &ABIS {
            let _ = described.c_layout_asserts(abi);
        }
        let bytes: Vec<u8> = text.bytes().map(|b| b & 0x7e).collect();
        layout_translate(&described, &[&[*pick, *index, flags & 3][..], &bytes].concat());
        return;
    }
    let client = &ABIS[usize::from(*pick) % ABIS.len()];
    let native = AbiId::native().abi();
    let count = schema.structs().len();
    if count == 0 {
        return;
    }
    let index = usize::from(*index) % count;
    // Low bit: client → native first (else native → client); second bit: keep the size as given.
    let (from, to) = if flags & 1 == 0 {
        (client, native)
    } else {
        (native, client)
    };
    let there = schema.plan(index, from, to);
    let back = schema.plan(index, to, from);
    let mut src = rest.to_vec();
    if flags & 2 == 0 {
        src.resize(there.src_size(), 0);
    }
    let out = match there.translate(&src) {
        Ok(out) => out,
        Err(TranslateError::Size { expected, got }) => {
            assert_eq!((expected, got), (there.src_size(), src.len()));
            assert_ne!(
                src.len(),
                there.src_size(),
                "a buffer of the right size refused for its size"
            );
            return;
        }
        // A value that does not fit (a 64-bit long into 32 bits) or a bool byte other than 0/1.
        Err(_) => return,
    };
    assert_eq!(out.len(), there.dst_size());
    assert_eq!(out.len(), schema.layout(index, to).size as usize);
    let to_mask = data_mask(schema, index, to);
    assert!(padding_is_zero(&to_mask, &out), "padding not zeroed: {}", to.name);
    let again = back
        .translate(&out)
        .unwrap_or_else(|e| panic!("translated back refused: {e}"));
    let from_mask = data_mask(schema, index, from);
    assert!(
        same_data(&from_mask, &src, &again),
        "round trip {} -> {} -> {} changed a field",
        from.name,
        to.name,
        from.name
    );
}

/// One `sample_record`, as an application would fill it in.
#[derive(Clone, Debug)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct SampleRecord {
    /// The client's ABI (any byte: taken modulo the number of ABIs).
    pub abi: u8,
    pub u8_: u8,
    pub i8_: i8,
    pub u16_: u16,
    pub i16_: i16,
    pub u32_: u32,
    pub i32_: i32,
    pub u64_: u64,
    pub i64_: i64,
    /// `long`: cut to the client's width.
    pub long_: i64,
    /// `unsigned long`: cut to the client's width.
    pub ulong_: u64,
    /// `uintptr_t`: cut to the client's width.
    pub handle: u64,
    /// `float`, as bits.
    pub f32_: u32,
    /// `double`, as bits.
    pub f64_: u64,
    pub flag: bool,
    pub name: [u8; 13],
    /// `struct sample_inner { uint8_t tag; uint64_t value; } inner[3]`.
    pub inner: [(u8, u64); 3],
    pub tail: u16,
}

/// An ABI as the reference encoder knows it, written out by hand from the ABI documents (not
/// taken from [`crate::layout`]): byte order, `sizeof(long)` (= pointer), the alignment of 8-byte
/// scalars, and the cap on any alignment.
struct RefAbi {
    big: bool,
    word: usize,
    align8: usize,
    cap: usize,
}

fn ref_abi(id: AbiId) -> RefAbi {
    let (big, word, align8, cap) = match id {
        AbiId::X86_64 | AbiId::Aarch64 | AbiId::Ppc64le | AbiId::Riscv64 => (false, 8, 8, 8),
        AbiId::Ppc64 | AbiId::S390x | AbiId::Sparc64 => (true, 8, 8, 8),
        // i386 and SH-4 align long long and double to 4 inside structs.
        AbiId::I386 | AbiId::Sh4 => (false, 4, 4, 4),
        AbiId::X32 | AbiId::Armhf | AbiId::Mipsel => (false, 4, 8, 8),
        AbiId::Powerpc | AbiId::Mips | AbiId::Hppa => (true, 4, 8, 8),
        // m68k aligns nothing beyond 2.
        AbiId::M68k => (true, 4, 2, 2),
    };
    RefAbi { big, word, align8, cap }
}

/// A C struct written by hand, field by field.
struct Writer<'a> {
    abi: &'a RefAbi,
    bytes: Vec<u8>,
    align: usize,
}

impl Writer<'_> {
    /// Pads to a multiple of `align` (which then counts for the struct's own alignment).
    fn pad_to(&mut self, align: usize) {
        self.align = self.align.max(align);
        self.bytes.resize(self.bytes.len().next_multiple_of(align), 0);
    }

    fn put(&mut self, value: u64, size: usize, natural: usize) {
        self.pad_to(natural.min(self.abi.cap));
        let le = value.to_le_bytes();
        let mut field = le[..size].to_vec();
        if self.abi.big {
            field.reverse();
        }
        self.bytes.extend(field);
    }

    fn put8(&mut self, value: u64) {
        let align = self.abi.align8;
        self.put(value, 8, align);
    }

    fn word(&mut self, value: u64) {
        let (size, align) = if self.abi.word == 8 {
            (8, self.abi.align8)
        } else {
            (4, 4)
        };
        self.put(value, size, align);
    }

    fn finish(mut self) -> Vec<u8> {
        self.pad_to(self.align.max(1));
        self.bytes
    }
}

/// The reference encoder: `record` as a client of `abi` lays it out in memory.
fn encode_record(r: &SampleRecord, abi: &RefAbi) -> Vec<u8> {
    let mut w = Writer {
        abi,
        bytes: Vec::new(),
        align: 1,
    };
    w.put(u64::from(r.u8_), 1, 1);
    w.put(r.i8_ as u8 as u64, 1, 1);
    w.put(u64::from(r.u16_), 2, 2);
    w.put(r.i16_ as u16 as u64, 2, 2);
    w.put(u64::from(r.u32_), 4, 4);
    w.put(r.i32_ as u32 as u64, 4, 4);
    w.put8(r.u64_);
    w.put8(r.i64_ as u64);
    w.word(r.long_ as u64);
    w.word(r.ulong_);
    w.word(r.handle);
    w.put(u64::from(r.f32_), 4, 4);
    w.put8(r.f64_);
    w.put(u64::from(r.flag), 1, 1);
    for c in r.name {
        w.put(u64::from(c), 1, 1);
    }
    // struct sample_inner: its own alignment (that of its u64) and size.
    let inner_align = abi.align8.min(abi.cap);
    let inner_size = (1usize.next_multiple_of(inner_align) + 8).next_multiple_of(inner_align);
    w.pad_to(inner_align);
    for (tag, value) in r.inner {
        let start = w.bytes.len();
        w.put(u64::from(tag), 1, 1);
        w.put8(value);
        w.bytes.resize(start + inner_size, 0);
    }
    w.put(u64::from(r.tail), 2, 2);
    w.finish()
}

/// The record with its word-sized fields cut to what a client of `abi` can hold (`long`
/// sign-extended back, the unsigned ones zero-extended): the values the broker must see.
fn as_seen(r: &SampleRecord, abi: &RefAbi) -> SampleRecord {
    let mut seen = r.clone();
    if abi.word == 4 {
        seen.long_ = i64::from(r.long_ as i32);
        seen.ulong_ = u64::from(r.ulong_ as u32);
        seen.handle = u64::from(r.handle as u32);
    }
    seen
}

/// `sample_record` differential: the reference encoder lays a typed record out for a client ABI,
/// the broker's plan translates it, and the native struct must hold the same values, field by
/// field (read back by the reference encoder's native layout). Padding must be zero.
pub fn layout_differential(schema: &Schema, record: &SampleRecord) {
    let id = ABIS[usize::from(record.abi) % ABIS.len()].id;
    let client = ref_abi(id);
    let native_ref = ref_abi(AbiId::native());
    let index = schema
        .index("sample_record")
        .expect("the sample schema has sample_record");
    let encoded = encode_record(record, &client);
    let plan = schema.plan(index, id.abi(), AbiId::native().abi());
    assert_eq!(
        encoded.len(),
        plan.src_size(),
        "{}: sizeof(struct sample_record) differs",
        id.abi().name
    );
    let native = plan
        .translate(&encoded)
        .unwrap_or_else(|e| panic!("{}: a valid record refused: {e}", id.abi().name));
    let expected = encode_record(&as_seen(record, &client), &native_ref);
    assert_eq!(native.len(), expected.len());
    if native != expected {
        let first = native.iter().zip(&expected).position(|(a, b)| a != b).unwrap_or(0);
        let field = schema
            .layout(index, AbiId::native().abi())
            .fields
            .iter()
            .rev()
            .find(|f| (f.offset as usize) <= first)
            .map_or_else(String::new, |f| f.name.clone());
        panic!("{}: field {field} (native byte {first}) differs", id.abi().name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCHEMA: &str = r#"
[[struct]]
name = "sample_inner"
fields = [{ name = "tag", type = "u8" }, { name = "value", type = "u64" }]

[[struct]]
name = "sample_record"
fields = [
  { name = "u8_", type = "u8" }, { name = "i8_", type = "i8" }, { name = "u16_", type = "u16" },
  { name = "i16_", type = "i16" }, { name = "u32_", type = "u32" }, { name = "i32_", type = "i32" },
  { name = "u64_", type = "u64" }, { name = "i64_", type = "i64" }, { name = "long_", type = "c_long" },
  { name = "ulong_", type = "c_ulong" }, { name = "handle", type = "handle" }, { name = "f32_", type = "f32" },
  { name = "f64_", type = "f64" }, { name = "flag", type = "bool" }, { name = "name", type = "char[13]" },
  { name = "inner", type = "sample_inner[3]" }, { name = "tail", type = "u16" },
]
"#;

    fn record(abi: u8) -> SampleRecord {
        SampleRecord {
            abi,
            u8_: 0xa1,
            i8_: -2,
            u16_: 0xb2c3,
            i16_: -300,
            u32_: 0xd4e5_f607,
            i32_: -70_000,
            u64_: 0x0102_0304_0506_0708,
            i64_: -5_000_000_000,
            long_: -6,
            ulong_: 0xffff_fff0,
            handle: 0x1234_5678,
            f32_: 1.5f32.to_bits(),
            f64_: (-2.25f64).to_bits(),
            flag: true,
            name: *b"hello world!\0",
            inner: [(1, 10), (2, u64::MAX), (3, 0x8000_0000_0000_0000)],
            tail: 0xbeef,
        }
    }

    #[test]
    fn fuzzing_differential_agrees_on_every_abi() {
        let schema = Schema::from_toml(SCHEMA).unwrap();
        for abi in 0..16u8 {
            layout_differential(&schema, &record(abi));
        }
    }

    #[test]
    fn fuzzing_translate_round_trips_on_every_abi() {
        let schema = Schema::from_toml(SCHEMA).unwrap();
        for abi in 0..16u8 {
            for flags in 0..2u8 {
                let bytes: Vec<u8> = (0..200u8).map(|b| b.wrapping_mul(37) & 0x7e).collect();
                layout_translate(&schema, &[&[abi, 1, flags][..], &bytes].concat());
            }
        }
    }

    #[test]
    fn fuzzing_native_frame_accepts_a_real_frame() {
        let frame = ClientFrame::Hello(crate::frame::Hello {
            version: 1,
            abi: AbiId::I386 as u8,
        });
        let bytes = encode(&frame).unwrap();
        let (client, _) = native_frame(&bytes);
        assert_eq!(client, Some(frame), "a real Hello decodes as itself");
        // The same Hello with a redundant varint byte is not the canonical frame: refused.
        let padded = [&[bytes[0] | 0x80, 0x00][..], &bytes[1..]].concat();
        assert_eq!(native_frame(&padded).0, None);
    }
}
