//! `portcullis layout FILE`: a struct description's layout under each ABI — how a compatibility
//! tester checks their structs against the ABI list, and how a driver author sees what clients
//! on other architectures will send.

use std::{fmt::Write, path::PathBuf};

use clap::Args;
use portcullis_proto::layout::{ABIS, Abi, AbiId, Elem, Schema};
use serde_json::{Value, json};

#[derive(Debug, Args)]
pub(crate) struct LayoutArgs {
    /// Struct descriptions, TOML (or JSON when the name ends in .json); see docs/LAYOUT.md.
    file: PathBuf,
    /// Only these ABIs [default: all].
    #[arg(long = "abi", value_parser = parse_abi)]
    abis: Vec<AbiId>,
    /// Print JSON.
    #[arg(long, conflicts_with_all = ["c_header", "c_asserts"])]
    json: bool,
    /// Print the C declarations.
    #[arg(long, conflicts_with = "c_asserts")]
    c_header: bool,
    /// Print C11 `_Static_assert`s of every offset, size and alignment for one `--abi`: compile
    /// them with that ABI's compiler to check the broker's layout against it.
    #[arg(long, requires = "abis")]
    c_asserts: bool,
}

pub(crate) fn parse_abi(s: &str) -> Result<AbiId, String> {
    AbiId::by_name(s).ok_or_else(|| {
        format!(
            "unknown ABI {s:?}; known: {}",
            ABIS.iter().map(|a| a.name).collect::<Vec<_>>().join(", ")
        )
    })
}

pub(crate) fn run(args: LayoutArgs) -> Result<(), String> {
    let text = std::fs::read_to_string(&args.file).map_err(|e| format!("{}: {e}", args.file.display()))?;
    let parsed = if args.file.extension().is_some_and(|e| e == "json") {
        Schema::from_json(&text)
    } else {
        Schema::from_toml(&text)
    };
    let schema = parsed.map_err(|e| format!("{}: {e}", args.file.display()))?;
    let abis: Vec<&Abi> = if args.abis.is_empty() {
        ABIS.iter().collect()
    } else {
        args.abis.iter().map(|a| a.abi()).collect()
    };
    if args.c_asserts {
        let [abi] = abis.as_slice() else {
            use clap::CommandFactory;
            super::Cli::command()
                .error(
                    clap::error::ErrorKind::ArgumentConflict,
                    "--c-asserts takes exactly one --abi",
                )
                .exit()
        };
        print!(
            "#include <stddef.h>\n#include <stdint.h>\n#include <stdbool.h>\n\n{}{}",
            schema.c_declarations(),
            schema.c_layout_asserts(abi)
        );
    } else if args.c_header {
        print!(
            "#include <stdint.h>\n#include <stdbool.h>\n\n{}",
            schema.c_declarations()
        );
    } else if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&layouts_json(&schema, &abis)).map_err(|e| e.to_string())?
        );
    } else {
        print!("{}", table(&schema, &abis));
    }
    Ok(())
}

/// Every struct's layout under each ABI, as JSON.
pub(crate) fn layouts_json(schema: &Schema, abis: &[&Abi]) -> Value {
    let structs: Vec<Value> = schema
        .structs()
        .iter()
        .enumerate()
        .map(|(i, desc)| {
            let per_abi: serde_json::Map<String, Value> = abis
                .iter()
                .map(|abi| {
                    let l = schema.layout(i, abi);
                    let fields: Vec<Value> = l
                        .fields
                        .iter()
                        .map(|f| json!({ "name": f.name, "offset": f.offset, "size": f.size, "align": f.align }))
                        .collect();
                    (
                        abi.name.to_string(),
                        json!({ "size": l.size, "align": l.align, "fields": fields }),
                    )
                })
                .collect();
            let fields: Vec<Value> = desc
                .fields
                .iter()
                .map(|f| json!({ "name": f.name, "type": type_name(schema, f.elem, f.count) }))
                .collect();
            json!({ "name": desc.name, "fields": fields, "abis": per_abi })
        })
        .collect();
    json!({ "structs": structs })
}

fn type_name(schema: &Schema, elem: Elem, count: Option<u32>) -> String {
    let base = match elem {
        Elem::Scalar(s) => s.name().to_string(),
        Elem::Char => "char".into(),
        Elem::Struct(i) => schema.get(i).map_or("?".into(), |s| s.name.clone()),
    };
    count.map_or(base.clone(), |n| format!("{base}[{n}]"))
}

/// Rows: size, alignment, each field's offset; columns: ABIs.
fn table(schema: &Schema, abis: &[&Abi]) -> String {
    let mut out = String::new();
    for (i, desc) in schema.structs().iter().enumerate() {
        let layouts: Vec<_> = abis.iter().map(|abi| schema.layout(i, abi)).collect();
        let labels: Vec<String> = std::iter::once("size".to_string())
            .chain(std::iter::once("align".to_string()))
            .chain(
                desc.fields
                    .iter()
                    .map(|f| format!("{} ({})", f.name, type_name(schema, f.elem, f.count))),
            )
            .collect();
        let width = labels
            .iter()
            .map(String::len)
            .max()
            .unwrap_or(0)
            .max(desc.name.len() + 7);
        let _ = write!(out, "{:width$}", format!("struct {}", desc.name));
        for abi in abis {
            let _ = write!(out, " {:>8}", abi.name);
        }
        out.push('\n');
        for (row, label) in labels.iter().enumerate() {
            let _ = write!(out, "{label:width$}");
            for l in &layouts {
                let v = match row {
                    0 => l.size,
                    1 => l.align,
                    k => l.fields.get(k - 2).map_or(0, |f| f.offset),
                };
                let _ = write!(out, " {v:>8}");
            }
            out.push('\n');
        }
        out.push('\n');
    }
    out
}
