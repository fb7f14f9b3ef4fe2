//! C renderings of a schema: declarations for clients to compile, and compile-time assertions
//! of every offset, size and alignment under one ABI (the golden-layout check: the ABI's real
//! compiler accepts them only if the broker's layout is the compiler's).

use std::fmt::Write;

use super::{Abi, Elem, Schema};

impl Schema {
    /// C declarations of every struct, in dependency order. Needs `<stdint.h>` and `<stdbool.h>`.
    pub fn c_declarations(&self) -> String {
        let mut out = String::new();
        for s in self.structs() {
            let _ = writeln!(out, "struct {} {{", s.name);
            for f in &s.fields {
                let ty = match f.elem {
                    Elem::Scalar(sc) => sc.c_type().to_string(),
                    Elem::Char => "char".to_string(),
                    Elem::Struct(i) => format!("struct {}", self.get(i).map_or("?", |s| s.name.as_str())),
                };
                let dims = f.count.map(|n| format!("[{n}]")).unwrap_or_default();
                let _ = writeln!(out, "    {ty} {}{dims};", f.name);
            }
            let _ = writeln!(out, "}};\n");
            for f in s.fields.iter().filter(|f| !f.values.is_empty()) {
                let _ = writeln!(out, "/* Values of {}.{}. */", s.name, f.name);
                for (name, value) in &f.values {
                    let _ = writeln!(
                        out,
                        "#define {}_{}_{} {value}",
                        s.name.to_ascii_uppercase(),
                        f.name.to_ascii_uppercase(),
                        name.to_ascii_uppercase()
                    );
                }
                let _ = writeln!(out);
            }
        }
        out
    }

    /// `_Static_assert`s of the layout of every struct under `abi` (C11, needs `<stddef.h>`).
    pub fn c_layout_asserts(&self, abi: &Abi) -> String {
        let mut out = String::new();
        for i in 0..self.structs().len() {
            let l = self.layout(i, abi);
            let n = &l.name;
            let _ = writeln!(
                out,
                "_Static_assert(sizeof(struct {n}) == {}, \"{} sizeof(struct {n}) is {}\");",
                l.size, abi.name, l.size
            );
            let _ = writeln!(
                out,
                "_Static_assert(_Alignof(struct {n}) == {}, \"{} _Alignof(struct {n}) is {}\");",
                l.align, abi.name, l.align
            );
            for f in &l.fields {
                let fname = &f.name;
                let _ = writeln!(
                    out,
                    "_Static_assert(offsetof(struct {n}, {fname}) == {}, \"{} offsetof({n}, {fname}) is {}\");",
                    f.offset, abi.name, f.offset
                );
                let _ = writeln!(
                    out,
                    "_Static_assert(sizeof(((struct {n} *)0)->{fname}) == {}, \"{} sizeof({n}.{fname}) is {}\");",
                    f.size, abi.name, f.size
                );
            }
        }
        out
    }
}
