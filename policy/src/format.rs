//! `portcullis policy fmt`: one canonical layout for policy files. Keys of each block in a fixed
//! order, one space around `=` and after commas, one blank line between blocks, comments kept.
//! Blocks stay where they are: rule order decides nothing, but it is how the author arranged
//! the file.

use toml_edit::{DocumentMut, Item, Key, Table, Value};

const TOP_KEYS: &[&str] = &["mode", "principal", "rule", "assert"];
const PRINCIPAL_KEYS: &[&str] = &[
    "name",
    "uid",
    "gid",
    "groups",
    "exe",
    "exe_sha256",
    "cgroup",
    "lsm_label",
    "abi",
    "not",
];
const RULE_KEYS: &[&str] = &[
    "id",
    "effect",
    "mode",
    "principals",
    "service",
    "methods",
    "open",
    "privileges",
    "memory",
    "rate",
    "args",
];
const ASSERT_KEYS: &[&str] = &[
    "id",
    "description",
    "principals",
    "service",
    "methods",
    "open",
    "privileges",
    "memory",
];

/// Formats one policy file. The text must be TOML (check the policy first for the rest).
pub fn format(text: &str) -> Result<String, String> {
    let mut doc: DocumentMut = text.parse().map_err(|e: toml_edit::TomlError| e.to_string())?;
    let root = doc.as_table_mut();
    reorder(root, TOP_KEYS, false);
    let mut first_block = !root.iter().any(|(_, item)| item.is_value());
    for (name, order) in [
        ("principal", PRINCIPAL_KEYS),
        ("rule", RULE_KEYS),
        ("assert", ASSERT_KEYS),
    ] {
        if let Some(Item::ArrayOfTables(blocks)) = root.get_mut(name) {
            for block in blocks.iter_mut() {
                reorder(block, order, true);
                let comments = comment_lines(block.decor().prefix().and_then(|p| p.as_str()).unwrap_or(""));
                let blank = if first_block { "" } else { "\n" };
                block.decor_mut().set_prefix(format!("{blank}{comments}"));
                block.decor_mut().set_suffix("");
                first_block = false;
            }
        }
    }
    let trailing = comment_lines(doc.trailing().as_str().unwrap_or(""));
    doc.set_trailing(if trailing.is_empty() {
        String::new()
    } else {
        format!("\n{trailing}")
    });
    let mut out = doc.to_string();
    while out.ends_with("\n\n") {
        out.pop();
    }
    if !out.ends_with('\n') {
        out.push('\n');
    }
    Ok(out)
}

/// The comment lines of a decor, trimmed, each ending in a newline; blank lines between (and
/// after) comments kept as one.
fn comment_lines(decor: &str) -> String {
    let mut out = String::new();
    let mut blank = false;
    for line in decor.lines().map(str::trim) {
        if line.starts_with('#') {
            if blank && !out.is_empty() {
                out.push('\n');
            }
            blank = false;
            out.push_str(line);
            out.push('\n');
        } else if line.is_empty() {
            blank = true;
        }
    }
    if blank && !out.is_empty() {
        out.push('\n');
    }
    out
}

/// Puts the table's keys in `order` (unknown keys after, as they were) and normalizes the
/// spacing of each key and value.
fn reorder(table: &mut Table, order: &[&str], block: bool) {
    let keys: Vec<String> = table.iter().map(|(k, _)| k.to_string()).collect();
    let mut entries: Vec<(Key, Item)> = keys.iter().filter_map(|k| table.remove_entry(k)).collect();
    entries.sort_by_key(|(k, _)| order.iter().position(|o| *o == k.get()).unwrap_or(order.len()));
    for (mut key, mut item) in entries {
        if block || item.is_value() {
            tidy_key(&mut key);
            tidy_item(&mut item);
        }
        table.insert_formatted(&key, item);
    }
}

fn tidy_key(key: &mut Key) {
    let comments = comment_lines(key.leaf_decor().prefix().and_then(|p| p.as_str()).unwrap_or(""));
    key.leaf_decor_mut().set_prefix(comments);
    key.leaf_decor_mut().set_suffix(" ");
}

fn tidy_item(item: &mut Item) {
    match item {
        Item::Value(value) => tidy_value(value),
        // A dotted key (`args.write.len = …`): its parts.
        Item::Table(table) => {
            for (mut key, child) in table.iter_mut() {
                if child.is_value() {
                    key.leaf_decor_mut().set_suffix(" ");
                }
                tidy_item(child);
            }
        }
        Item::None | Item::ArrayOfTables(_) => {}
    }
}

fn tidy_value(value: &mut Value) {
    let comment = value
        .decor()
        .suffix()
        .and_then(|s| s.as_str())
        .map(str::trim)
        .filter(|s| s.starts_with('#'))
        .map(|c| format!(" {c}"))
        .unwrap_or_default();
    match value {
        Value::Array(array) if has_comments(array) => multi_line(array),
        Value::Array(array) => {
            array.fmt();
            array.set_trailing("");
            array.set_trailing_comma(false);
            for v in array.iter_mut() {
                tidy_nested(v);
            }
            if let Some(first) = array.iter_mut().next() {
                first.decor_mut().set_prefix("");
            }
        }
        Value::InlineTable(table) => {
            table.fmt();
            for (_, v) in table.iter_mut() {
                tidy_nested(v);
            }
        }
        _ => {}
    }
    value.decor_mut().set_prefix(" ");
    value.decor_mut().set_suffix(comment);
}

/// Whether comments sit among an array's elements.
fn has_comments(array: &toml_edit::Array) -> bool {
    let text = |d: Option<&toml_edit::RawString>| d.and_then(|r| r.as_str()).is_some_and(|t| t.contains('#'));
    text(Some(array.trailing()))
        || array
            .iter()
            .any(|v| text(v.decor().prefix()) || text(v.decor().suffix()))
}

/// An array with comments among its elements, one element a line (indented four spaces) with
/// each comment kept on its own line above the element it preceded, and a trailing comma: the
/// comments are part of what the author wrote, and stay.
fn multi_line(array: &mut toml_edit::Array) {
    let decor_text = |d: Option<&toml_edit::RawString>| d.and_then(|r| r.as_str()).unwrap_or("").to_string();
    // A comment after an element (`"a", # why`) belongs to the line above the next one.
    let mut carried = String::new();
    for v in array.iter_mut() {
        let before = format!("{carried}{}", decor_text(v.decor().prefix()));
        carried = decor_text(v.decor().suffix());
        tidy_nested(v);
        let mut prefix = String::from("\n");
        for line in comment_lines(&before).lines().filter(|l| !l.is_empty()) {
            prefix.push_str("    ");
            prefix.push_str(line);
            prefix.push('\n');
        }
        prefix.push_str("    ");
        v.decor_mut().set_prefix(prefix);
        v.decor_mut().set_suffix("");
    }
    let mut trailing = String::from("\n");
    for line in comment_lines(&format!("{carried}{}", decor_text(Some(array.trailing()))))
        .lines()
        .filter(|l| !l.is_empty())
    {
        trailing.push_str("    ");
        trailing.push_str(line);
        trailing.push('\n');
    }
    array.set_trailing(trailing);
    array.set_trailing_comma(true);
}

/// A value inside an array or inline table: nested arrays and tables tidied too.
fn tidy_nested(value: &mut Value) {
    match value {
        Value::Array(array) => {
            array.fmt();
            for v in array.iter_mut() {
                tidy_nested(v);
            }
        }
        Value::InlineTable(table) => {
            table.fmt();
            for (_, v) in table.iter_mut() {
                tidy_nested(v);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Policy, Source};

    const MESSY: &str = r#"# Serial access for the modem team.


[[principal]]
groups=["dialout" ,   "uucp"]   # both distros
name = "serial"
  [[rule]]
methods=[ "write","read" ]
# who
principals   = ["serial"]
effect="allow"
id = "serial-rw"
args.write.len={max=4096}
service = {class="TtyDevice",   properties = { vendor = [ "0403","1a86" ] }}



[[assert]]
methods = ["reset"]
id = "no-reset"
"#;

    const CANONICAL: &str = r#"# Serial access for the modem team.

[[principal]]
name = "serial"
groups = ["dialout", "uucp"] # both distros

[[rule]]
id = "serial-rw"
effect = "allow"
# who
principals = ["serial"]
service = { class = "TtyDevice", properties = { vendor = ["0403", "1a86"] } }
methods = ["write", "read"]
args.write.len = { max = 4096 }

[[assert]]
id = "no-reset"
methods = ["reset"]
"#;

    #[test]
    fn format_gives_the_canonical_layout_and_keeps_comments() {
        assert_eq!(format(MESSY).unwrap(), CANONICAL);
    }

    /// Comments among an array's elements stay, one element a line.
    #[test]
    fn format_keeps_comments_inside_multi_line_arrays() {
        let text = "[[rule]]\nid = \"r\"\neffect = \"allow\"\nprincipals = [\"p\"]\nmethods = [\n  # reading\n  \"read\",\n    \"write\",   # writing, reviewed 2026\n  \"flush\"\n  # more later\n]\n";
        let want = "[[rule]]\nid = \"r\"\neffect = \"allow\"\nprincipals = [\"p\"]\nmethods = [\n    # reading\n    \"read\",\n    \"write\",\n    # writing, reviewed 2026\n    \"flush\",\n    # more later\n]\n";
        let got = format(text).unwrap();
        assert_eq!(got, want, "{got}");
        assert_eq!(format(&got).unwrap(), got, "idempotent");
    }

    #[test]
    fn format_is_idempotent() {
        assert_eq!(format(CANONICAL).unwrap(), CANONICAL);
        let default = include_str!("../../broker/src/default_policy.toml");
        let once = format(default).unwrap();
        assert_eq!(format(&once).unwrap(), once);
    }

    #[test]
    fn format_changes_no_decision() {
        let parse = |text: &str| Policy::parse(&[Source { origin: "p.toml", text }]).unwrap();
        let before = parse(MESSY);
        let after = parse(&format(MESSY).unwrap());
        assert!(crate::diff(&before, &after, None).unwrap().is_empty());
        let ids = |p: &Policy| p.rules.iter().map(|r| r.id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&before), ids(&after));
    }

    #[test]
    fn format_refuses_text_that_is_not_toml() {
        assert!(format("[[rule]\nid = 1").is_err());
    }
}
