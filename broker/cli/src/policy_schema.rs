//! `portcullis policy schema`: a JSON Schema (draft 2020-12) of the policy language, for editors
//! that check and complete TOML against one (taplo and its kin: `#:schema ./policy.schema.json`
//! at the top of a file, or the editor's schema association). The names the drivers define —
//! classes, methods, privileges, memory types, ABIs — are offered as completions; a name the
//! schema does not list is still accepted here, and `policy check` is the judge of it.

use serde_json::{Value, json};

use portcullis_broker::drivers;

/// A string from a list, suggested, but any string accepted (the drivers' names grow).
fn suggested(names: Vec<String>) -> Value {
    json!({ "anyOf": [ { "enum": names }, { "type": "string" } ] })
}

fn strings(items: Value) -> Value {
    json!({ "type": "array", "items": items })
}

/// The schema, with the names of every driver family built in.
pub(crate) fn schema() -> Value {
    let families = drivers::families();
    let mut classes: Vec<String> = families.iter().map(|f| f.class.to_string()).collect();
    classes.sort();
    let mut methods: Vec<String> = families
        .iter()
        .flat_map(|f| {
            f.methods()
                .rows()
                .iter()
                .map(|r| r.name.to_string())
                .collect::<Vec<_>>()
        })
        .chain(["*".to_string()])
        .collect();
    methods.sort();
    methods.dedup();
    let mut privileges: Vec<String> = families
        .iter()
        .flat_map(|f| {
            f.methods()
                .rows()
                .iter()
                .filter_map(|r| r.privilege.map(String::from))
                .collect::<Vec<_>>()
        })
        .collect();
    privileges.sort();
    privileges.dedup();
    let mut memory: Vec<String> = families
        .iter()
        .flat_map(|f| f.memory_types().iter().map(|m| m.name.to_string()).collect::<Vec<_>>())
        .collect();
    memory.sort();
    memory.dedup();
    let abis: Vec<&str> = portcullis_proto::layout::ABIS.iter().map(|a| a.name).collect();
    let ids = json!({ "type": "array", "items": { "type": "integer", "minimum": 0, "maximum": u32::MAX } });
    let attributes = json!({
        "uid": { "description": "effective uid, any of (from the kernel: SO_PEERCRED)", "allOf": [ids] },
        "gid": { "description": "effective gid, any of", "allOf": [ids] },
        "groups": { "description": "member of any of these groups (names)", "allOf": [strings(json!({ "type": "string" }))] },
        "exe": { "description": "the program's absolute path, any of", "allOf": [strings(json!({ "type": "string", "pattern": "^/" }))] },
        "exe_sha256": { "description": "SHA-256 of the program, lowercase hex, any of", "allOf": [strings(json!({ "type": "string", "pattern": "^[0-9a-fA-F]{64}$" }))] },
        "cgroup": { "description": "in one of these cgroup v2 paths or below", "allOf": [strings(json!({ "type": "string", "pattern": "^/" }))] },
        "lsm_label": { "description": "the LSM label (SELinux context, AppArmor profile), any of", "allOf": [strings(json!({ "type": "string" }))] },
        "abi": { "description": "the struct ABI a native client declared, any of", "allOf": [strings(json!({ "enum": abis }))] },
        "tls_san_uri": { "description": "a TCP client's certificate has one of these SAN URIs", "allOf": [strings(json!({ "type": "string" }))] },
        "tls_san_dns": { "description": "a TCP client's certificate has one of these SAN DNS names", "allOf": [strings(json!({ "type": "string" }))] },
        "tls_subject_cn": { "description": "a TCP client's certificate subject CN, any of", "allOf": [strings(json!({ "type": "string" }))] },
    });
    let mut principal = attributes.as_object().cloned().unwrap_or_default();
    principal.insert(
        "name".into(),
        json!({ "type": "string", "description": "how rules name the principal" }),
    );
    principal.insert(
        "not".into(),
        json!({ "$ref": "#/$defs/attributes", "description": "tasks matching these are excluded" }),
    );
    let request = json!({
        "methods": { "description": "method names, or [\"*\"] for all", "allOf": [strings(suggested(methods))] },
        "open": { "enum": ["shared", "exclusive"] },
        "privileges": { "description": "clientHasPrivilege names", "allOf": [strings(suggested(privileges))] },
        "memory": { "description": "memory types (clientMemoryForType)", "allOf": [strings(suggested(memory))] },
    });
    let mut rule = request.as_object().cloned().unwrap_or_default();
    for (key, value) in [
        ("id", json!({ "type": "string", "minLength": 1 })),
        ("effect", json!({ "enum": ["allow", "forbid"] })),
        (
            "principals",
            json!({ "type": "array", "items": { "type": "string" }, "minItems": 1 }),
        ),
        ("service", json!({ "$ref": "#/$defs/service" })),
        (
            "rate",
            json!({ "type": "string", "pattern": "^\\s*[1-9][0-9]*\\s*/\\s*[smh]\\s*$", "description": "calls per user client: N/s, N/m or N/h" }),
        ),
        ("mode", json!({ "enum": ["enforce", "audit"] })),
        (
            "args",
            json!({
                "type": "object",
                "description": "args.METHOD.PARAM = constraint (allow rules only)",
                "additionalProperties": { "type": "object", "additionalProperties": { "$ref": "#/$defs/constraint" } },
            }),
        ),
    ] {
        rule.insert(key.into(), value);
    }
    let mut assertion = request.as_object().cloned().unwrap_or_default();
    for (key, value) in [
        ("id", json!({ "type": "string", "minLength": 1 })),
        ("description", json!({ "type": "string" })),
        (
            "principals",
            json!({ "type": "array", "items": { "type": "string" }, "description": "absent: every task" }),
        ),
        ("service", json!({ "$ref": "#/$defs/service" })),
    ] {
        assertion.insert(key.into(), value);
    }
    let scalar = json!({ "type": ["string", "integer", "boolean"] });
    json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "Portcullis policy file",
        "description": "The policy language of the Portcullis device broker (docs/POLICY.md).",
        "type": "object",
        "additionalProperties": false,
        "properties": {
            "mode": { "enum": ["enforce", "audit"], "description": "audit: the whole policy refuses nothing, only logs" },
            "principal": { "type": "array", "items": { "$ref": "#/$defs/principal" } },
            "rule": { "type": "array", "items": { "$ref": "#/$defs/rule" } },
            "assert": { "type": "array", "items": { "$ref": "#/$defs/assert" } },
        },
        "$defs": {
            "attributes": { "type": "object", "additionalProperties": false, "properties": attributes },
            "principal": { "type": "object", "additionalProperties": false, "required": ["name"], "properties": principal },
            "service": {
                "type": "object",
                "additionalProperties": false,
                "properties": {
                    "class": suggested(classes),
                    "name": { "type": "string" },
                    "properties": {
                        "type": "object",
                        "additionalProperties": { "anyOf": [
                            scalar,
                            { "type": "array", "items": scalar },
                            { "type": "object", "additionalProperties": false, "properties": { "prefix": { "type": "string" } }, "required": ["prefix"] },
                            { "type": "object", "additionalProperties": false, "properties": { "any_of": { "type": "array", "items": scalar } }, "required": ["any_of"] },
                        ] },
                    },
                },
            },
            "constraint": {
                "type": "object",
                "additionalProperties": false,
                "description": "exactly one of: min/max, one_of, mask, prefix/max_len",
                "properties": {
                    "min": { "type": "integer" },
                    "max": { "type": "integer" },
                    "one_of": { "type": "array", "items": { "type": "integer" }, "minItems": 1 },
                    "mask": { "type": "integer" },
                    "prefix": { "type": "string" },
                    "max_len": { "type": "integer", "minimum": 0 },
                },
            },
            "rule": { "type": "object", "additionalProperties": false, "required": ["id", "effect", "principals"], "properties": rule },
            "assert": { "type": "object", "additionalProperties": false, "required": ["id"], "properties": assertion },
        },
    })
}

#[cfg(test)]
mod tests {
    use portcullis_policy::{Policy, Source};

    use super::schema;

    /// The fields the parser accepts in one place, from its own "unknown field" error.
    fn accepted(text: &str) -> Vec<String> {
        let err = Policy::parse(&[Source { origin: "p", text }]).unwrap_err().to_string();
        let list = err
            .split("expected one of ")
            .nth(1)
            .or_else(|| err.split("expected ").nth(1))
            .unwrap_or_default();
        let mut fields: Vec<String> = list
            .split(',')
            .map(|f| {
                f.trim()
                    .trim_start_matches("or ")
                    .trim_matches(|c| c == '`' || c == ' ')
                    .to_string()
            })
            .map(|f| f.split('`').next().unwrap_or_default().to_string())
            .filter(|f| !f.is_empty())
            .collect();
        fields.sort();
        fields
    }

    fn keys(schema: &serde_json::Value, pointer: &str) -> Vec<String> {
        let mut keys: Vec<String> = schema
            .pointer(pointer)
            .and_then(|v| v.as_object())
            .unwrap_or_else(|| panic!("{pointer}"))
            .keys()
            .cloned()
            .collect();
        keys.sort();
        keys
    }

    /// Every key the schema offers is one the parser accepts, and the other way round: the
    /// schema is checked against the parser, not against itself.
    #[test]
    fn the_schema_names_exactly_what_the_parser_accepts() {
        let s = schema();
        let p = "[[principal]]\nname = \"p\"\n";
        for (text, pointer) in [
            ("bogus = 1\n".to_string(), "/properties"),
            (
                "[[principal]]\nname = \"p\"\nbogus = 1\n".to_string(),
                "/$defs/principal/properties",
            ),
            (
                "[[principal]]\nname = \"p\"\nnot = { bogus = 1 }\n".to_string(),
                "/$defs/attributes/properties",
            ),
            (
                format!("{p}[[rule]]\nid = \"r\"\neffect = \"allow\"\nprincipals = [\"p\"]\nbogus = 1\n"),
                "/$defs/rule/properties",
            ),
            (
                format!(
                    "{p}[[rule]]\nid = \"r\"\neffect = \"allow\"\nprincipals = [\"p\"]\nservice = {{ bogus = 1 }}\n"
                ),
                "/$defs/service/properties",
            ),
            (
                format!(
                    "{p}[[rule]]\nid = \"r\"\neffect = \"allow\"\nprincipals = [\"p\"]\nmethods = [\"add\"]\nargs.add.a = {{ bogus = 1 }}\n"
                ),
                "/$defs/constraint/properties",
            ),
            (
                format!("{p}[[assert]]\nid = \"a\"\nbogus = 1\n"),
                "/$defs/assert/properties",
            ),
        ] {
            assert_eq!(keys(&s, pointer), accepted(&text), "{pointer}");
        }
        // The driver names are offered.
        let classes = s
            .pointer("/$defs/service/properties/class/anyOf/0/enum")
            .unwrap()
            .to_string();
        assert!(
            classes.contains("SampleDevice") && classes.contains("TtyDevice"),
            "{classes}"
        );
    }
}
