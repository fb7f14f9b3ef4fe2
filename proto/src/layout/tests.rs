use super::*;

fn abi(name: &str) -> &'static Abi {
    AbiId::by_name(name).unwrap().abi()
}

const RECORD: &str = r#"
[[struct]]
name = "inner"
fields = [ { name = "tag", type = "u8" }, { name = "value", type = "u64" } ]

[[struct]]
name = "record"
fields = [
  { name = "a", type = "u8" }, { name = "b", type = "i8" }, { name = "c", type = "u16" }, { name = "d", type = "i16" },
  { name = "e", type = "u32" }, { name = "f", type = "i32" }, { name = "g", type = "u64" }, { name = "h", type = "i64" },
  { name = "l", type = "c_long" }, { name = "ul", type = "c_ulong" }, { name = "hd", type = "handle" },
  { name = "x", type = "f32" }, { name = "y", type = "f64" }, { name = "ok", type = "bool" },
  { name = "name", type = "char[13]" }, { name = "inner", type = "inner[3]" }, { name = "tail", type = "u16" },
]
"#;

fn record() -> (Schema, usize) {
    let s = Schema::from_toml(RECORD).unwrap();
    let i = s.index("record").unwrap();
    (s, i)
}

fn offsets(l: &StructLayout) -> Vec<u32> {
    l.fields.iter().map(|f| f.offset).collect()
}

#[test]
fn layout_u32_u64_u32_differs_on_i386_only() {
    let s = Schema::from_toml("[[struct]]\nname = \"t\"\nfields = [{name=\"a\",type=\"u32\"},{name=\"b\",type=\"u64\"},{name=\"c\",type=\"u32\"}]\n").unwrap();
    let i386 = s.layout(0, abi("i386"));
    assert_eq!((i386.size, i386.align, offsets(&i386)), (16, 4, vec![0, 4, 12]));
    for name in ["x86_64", "armhf", "powerpc", "mips", "x32", "s390x"] {
        let l = s.layout(0, abi(name));
        assert_eq!((l.size, l.align, offsets(&l)), (24, 8, vec![0, 8, 16]), "{name}");
    }
    let m68k = s.layout(0, abi("m68k"));
    assert_eq!((m68k.size, m68k.align, offsets(&m68k)), (16, 2, vec![0, 4, 12]));
}

#[test]
fn layout_record_differs_on_i386_m68k_and_8_aligned_abis() {
    let (s, i) = record();
    let x86_64 = s.layout(i, abi("x86_64"));
    let i386 = s.layout(i, abi("i386"));
    let m68k = s.layout(i, abi("m68k"));
    let armhf = s.layout(i, abi("armhf"));
    assert_eq!((x86_64.size, x86_64.align), (144, 8));
    assert_eq!((i386.size, i386.align), (112, 4));
    assert_eq!((m68k.size, m68k.align), (100, 2));
    assert_eq!((armhf.size, armhf.align), (128, 8));
    assert_eq!(m68k.fields[4].offset, 6, "u32 after an i16 is 2-aligned on m68k");
    assert_eq!(i386.fields[15].offset, 72);
    assert_eq!(armhf.fields[15].offset, 72);
    assert_eq!(x86_64.fields[15].offset, 88);
}

fn native() -> &'static Abi {
    AbiId::native().abi()
}

fn put(buf: &mut [u8], at: u32, bytes: &[u8]) {
    buf[at as usize..at as usize + bytes.len()].copy_from_slice(bytes);
}

#[test]
fn translate_sign_extends_client_longs() {
    let (s, i) = record();
    let client = s.layout(i, abi("i386"));
    let mut buf = vec![0u8; client.size as usize];
    put(&mut buf, client.fields[8].offset, &(-5i32).to_le_bytes());
    put(&mut buf, client.fields[9].offset, &u32::MAX.to_le_bytes());
    let out = s.plan(i, abi("i386"), native()).translate(&buf).unwrap();
    let n = s.layout(i, native());
    let at = |k: usize| n.fields[k].offset as usize;
    assert_eq!(i64::from_ne_bytes(out[at(8)..at(8) + 8].try_into().unwrap()), -5);
    assert_eq!(
        u64::from_ne_bytes(out[at(9)..at(9) + 8].try_into().unwrap()),
        u64::from(u32::MAX)
    );
}

#[test]
fn translate_narrowing_that_loses_data_is_overflow() {
    let (s, i) = record();
    let n = s.layout(i, native());
    let mut buf = vec![0u8; n.size as usize];
    put(&mut buf, n.fields[8].offset, &(i64::from(i32::MAX) + 1).to_ne_bytes());
    let err = s.plan(i, native(), abi("i386")).translate(&buf).unwrap_err();
    assert_eq!(err, TranslateError::Overflow { field: "l".into() });
    // The most negative i32 still fits.
    put(&mut buf, n.fields[8].offset, &i64::from(i32::MIN).to_ne_bytes());
    assert!(s.plan(i, native(), abi("i386")).translate(&buf).is_ok());
    put(&mut buf, n.fields[8].offset, &(i64::from(i32::MIN) - 1).to_ne_bytes());
    assert!(s.plan(i, native(), abi("i386")).translate(&buf).is_err());
    // Unsigned: 2^32 does not fit a 32-bit unsigned long.
    put(&mut buf, n.fields[8].offset, &0i64.to_ne_bytes());
    put(&mut buf, n.fields[9].offset, &(1u64 << 32).to_ne_bytes());
    assert_eq!(
        s.plan(i, native(), abi("m68k")).translate(&buf).unwrap_err(),
        TranslateError::Overflow { field: "ul".into() }
    );
}

#[test]
fn translate_bool_must_be_zero_or_one() {
    let (s, i) = record();
    let client = s.layout(i, abi("ppc64"));
    let mut buf = vec![0u8; client.size as usize];
    put(&mut buf, client.fields[13].offset, &[2]);
    assert_eq!(
        s.plan(i, abi("ppc64"), native()).translate(&buf).unwrap_err(),
        TranslateError::Bool {
            field: "ok".into(),
            value: 2
        }
    );
}

#[test]
fn translate_exact_size_is_required() {
    let (s, i) = record();
    let plan = s.plan(i, abi("armhf"), native());
    assert_eq!(
        plan.translate(&[0; 127]).unwrap_err(),
        TranslateError::Size {
            expected: 128,
            got: 127
        }
    );
    assert!(plan.translate(&[0; 129]).is_err());
    assert!(plan.translate(&[0; 128]).is_ok());
}

#[test]
fn translate_big_endian_swaps_and_padding_is_zeroed() {
    let (s, i) = record();
    let n = s.layout(i, native());
    // Native bytes with every padding byte set to 0xAA.
    let mut buf = vec![0xAAu8; n.size as usize];
    for f in &n.fields {
        buf[f.offset as usize..(f.offset + f.size) as usize].fill(0);
    }
    // Inner structs have padding too (tag then 7 bytes before value).
    for k in 0..3 {
        buf[n.fields[15].offset as usize + k * 16 + 1..n.fields[15].offset as usize + k * 16 + 8].fill(0xAA);
    }
    put(&mut buf, n.fields[4].offset, &0x0102_0304u32.to_ne_bytes());
    put(&mut buf, n.fields[12].offset, &1.5f64.to_ne_bytes());
    let out = s.plan(i, native(), abi("s390x")).translate(&buf).unwrap();
    let c = s.layout(i, abi("s390x"));
    assert_eq!(&out[c.fields[4].offset as usize..][..4], &[1, 2, 3, 4]);
    assert_eq!(&out[c.fields[12].offset as usize..][..8], &1.5f64.to_be_bytes());
    assert!(!out.contains(&0xAA), "padding sent to a client must be zero");
    // And back: the same field values.
    let back = s.plan(i, abi("s390x"), native()).translate(&out).unwrap();
    let mut clean = buf.clone();
    for b in clean.iter_mut().filter(|b| **b == 0xAA) {
        *b = 0;
    }
    assert_eq!(back, clean);
}

#[test]
fn plan_same_abi_is_merged_copies() {
    let (s, i) = record();
    let plan = s.plan(i, native(), native());
    let mut buf = vec![0u8; plan.src_size()];
    for (k, b) in buf.iter_mut().enumerate() {
        *b = (k % 2) as u8; // bools and all: 0/1 bytes
    }
    let n = s.layout(i, native());
    let out = plan.translate(&buf).unwrap();
    let field = |b: &[u8], at: u32, len: u32| b[at as usize..(at + len) as usize].to_vec();
    for f in n.fields.iter().filter(|f| f.name != "inner") {
        assert_eq!(
            field(&out, f.offset, f.size),
            field(&buf, f.offset, f.size),
            "{}",
            f.name
        );
    }
    let inner = &n.fields[15];
    for k in 0..3 {
        let at = inner.offset + k * 16;
        assert_eq!(field(&out, at, 1), field(&buf, at, 1), "inner[{k}].tag");
        assert_eq!(field(&out, at + 1, 7), vec![0; 7], "inner[{k}] padding");
        assert_eq!(field(&out, at + 8, 8), field(&buf, at + 8, 8), "inner[{k}].value");
    }
}

#[test]
fn description_refuses_what_abis_disagree_on() {
    let field = |ty: &str| {
        Schema::from_toml(&format!(
            "[[struct]]\nname = \"t\"\nfields = [{{name = \"f\", type = \"{ty}\"}}]\n"
        ))
    };
    for (ty, says) in [
        ("long double", "long double"),
        ("u32:3", "bitfield"),
        ("union u", "union"),
        ("u8*", "pointer"),
        ("char", "char[N]"),
        ("u128", "unknown type"),
        ("t", "itself"),
        ("u8[0]", "1..="),
        ("u8[x]", "not a number"),
    ] {
        let err = field(ty).unwrap_err().to_string();
        assert!(err.contains(says), "{ty}: {err}");
    }
    assert!(Schema::from_toml("[[struct]]\nname = \"t\"\nfields = []\n").is_err());
    assert!(Schema::from_toml("[[struct]]\nname = \"1t\"\nfields = [{name=\"a\",type=\"u8\"}]\n").is_err());
    assert!(
        Schema::from_toml("[[struct]]\nname = \"t\"\nfields = [{name=\"a\",type=\"u8\"},{name=\"a\",type=\"u8\"}]\n")
            .is_err()
    );
    assert!(
        Schema::from_toml("[[struct]]\nname = \"t\"\nfields = [{name=\"a\",type=\"u16[40000]\"}]\n")
            .unwrap_err()
            .to_string()
            .contains("larger")
    );
}

#[test]
fn description_json_matches_toml() {
    let json =
        r#"{"struct": [{"name": "t", "fields": [{"name": "a", "type": "u16"}, {"name": "b", "type": "char[3]"}]}]}"#;
    let toml = "[[struct]]\nname = \"t\"\nfields = [{name=\"a\",type=\"u16\"},{name=\"b\",type=\"char[3]\"}]\n";
    assert_eq!(Schema::from_json(json).unwrap(), Schema::from_toml(toml).unwrap());
}

#[test]
fn isize_is_pointer_sized_sign_extended_and_overflows_like_c_long() {
    let s = Schema::from_toml("[[struct]]\nname = \"io\"\nfields = [{ name = \"n\", type = \"isize\" }, { name = \"p\", type = \"handle\" }]\n").unwrap();
    let i = s.index("io").unwrap();
    let i386 = s.layout(i, abi("i386"));
    assert_eq!((i386.size, i386.fields[0].size), (8, 4));
    let native_layout = s.layout(i, native());
    assert_eq!(native_layout.fields[0].size, 8);
    assert!(s.c_declarations().contains("intptr_t n;"), "{}", s.c_declarations());
    // A 32-bit client's -1 is -1 (sign-extended), not 4294967295.
    let mut buf = vec![0u8; 8];
    put(&mut buf, 0, &(-1i32).to_le_bytes());
    let out = s.plan(i, abi("i386"), native()).translate(&buf).unwrap();
    assert_eq!(i64::from_ne_bytes(out[..8].try_into().unwrap()), -1);
    // A value a 32-bit intptr_t can't hold is OVERFLOW on the way back, never truncated.
    let mut big = vec![0u8; native_layout.size as usize];
    put(&mut big, 0, &(1i64 << 40).to_ne_bytes());
    assert_eq!(
        s.plan(i, native(), abi("i386")).translate(&big).unwrap_err(),
        TranslateError::Overflow { field: "n".into() }
    );
    put(&mut big, 0, &i64::from(i32::MIN).to_ne_bytes());
    assert!(s.plan(i, native(), abi("armhf")).translate(&big).is_ok());
}

#[test]
fn description_names_that_would_not_compile_are_refused() {
    let one = |name: &str, field: &str| {
        Schema::from_toml(&format!(
            "[[struct]]\nname = \"{name}\"\nfields = [{{ name = \"{field}\", type = \"u32\" }}]\n"
        ))
    };
    for bad in [
        "int",
        "struct",
        "_Bool",
        "bool",
        "true",
        "NULL",
        "uint32_t",
        "INT32_MAX",
        "__x",
        "_Reserved",
    ] {
        let struct_err = one(bad, "ok").unwrap_err().to_string();
        assert!(struct_err.contains("would not compile"), "{bad}: {struct_err}");
        let field_err = one("ok", bad).unwrap_err().to_string();
        assert!(field_err.contains("would not compile"), "{bad}: {field_err}");
    }
    for scalar in ["u8", "c_long", "handle", "isize", "f64"] {
        let err = one(scalar, "a").unwrap_err().to_string();
        assert!(err.contains("names a scalar type"), "{scalar}: {err}");
    }
    // Names that only begin like a keyword or a union are fine.
    assert!(one("integer", "structure").is_ok());
    assert!(one("_private", "bool_flag").is_ok());
}

#[test]
fn a_struct_named_union_something_is_a_struct() {
    let s = Schema::from_toml(
        "[[struct]]\nname = \"union_info\"\nfields = [{ name = \"a\", type = \"u32\" }]\n\n[[struct]]\nname = \"outer\"\nfields = [{ name = \"u\", type = \"union_info\" }, { name = \"v\", type = \"struct union_info[2]\" }]\n",
    )
    .unwrap();
    assert_eq!(s.layout(s.index("outer").unwrap(), native()).size, 12);
    let err =
        Schema::from_toml("[[struct]]\nname = \"s\"\nfields = [{ name = \"u\", type = \"union x\" }]\n").unwrap_err();
    assert!(err.to_string().contains("unions are refused"), "{err}");
}

#[test]
fn deep_nesting_lays_out_each_struct_once_and_right() {
    // s_k holds two s_(k-1): laid out recursively that is 2^k work per ABI; from the sizes
    // computed when each struct was added, it is one lookup per field.
    let mut text = String::from("[[struct]]\nname = \"s0\"\nfields = [{ name = \"a\", type = \"u8\" }]\n");
    for k in 1..=15 {
        text.push_str(&format!(
            "\n[[struct]]\nname = \"s{k}\"\nfields = [{{ name = \"x\", type = \"s{p}\" }}, {{ name = \"y\", type = \"s{p}\" }}]\n",
            p = k - 1
        ));
    }
    // And a long chain, each struct holding the one before and a byte.
    for k in 1..=3000 {
        let before = if k == 1 {
            "s0".to_string()
        } else {
            format!("c{}", k - 1)
        };
        text.push_str(&format!(
            "\n[[struct]]\nname = \"c{k}\"\nfields = [{{ name = \"x\", type = \"{before}\" }}, {{ name = \"b\", type = \"u8\" }}]\n"
        ));
    }
    let s = Schema::from_toml(&text).unwrap();
    for abi in ABIS.iter() {
        assert_eq!(s.layout(s.index("s15").unwrap(), abi).size, 1 << 15, "{}", abi.name);
        assert_eq!(s.layout(s.index("c3000").unwrap(), abi).size, 3001, "{}", abi.name);
    }
}
