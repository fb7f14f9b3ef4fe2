//! JSON renderings of wire types for `--json` output.

use portcullis_client::{ClientError, Status, pb};
use serde_json::{Value, json};

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn property(value: &pb::PropertyValue) -> Value {
    use pb::property_value::Kind;
    match &value.kind {
        Some(Kind::Text(s)) => json!(s),
        Some(Kind::Unsigned(u)) => json!(u),
        Some(Kind::Signed(i)) => json!(i),
        Some(Kind::Flag(b)) => json!(b),
        Some(Kind::Data(d)) => json!({ "data": hex(d) }),
        None => Value::Null,
    }
}

pub(crate) fn service(s: &pb::ServiceInfo) -> Value {
    let range = |r: &Option<pb::SizeRange>| r.as_ref().map_or(json!([0, 0]), |r| json!([r.min, r.max]));
    json!({
        "id": s.id,
        "name": s.name,
        "class": s.class,
        "parent": s.parent,
        "children": s.children,
        "properties": s.properties.iter().map(|(k, v)| (k.clone(), property(v))).collect::<serde_json::Map<_, _>>(),
        "methods": s.methods.iter().map(|m| json!({
            "selector": m.selector,
            "name": m.name,
            "scalar_in": m.scalar_in,
            "scalar_out": m.scalar_out,
            "struct_in": range(&m.struct_in),
            "struct_out": range(&m.struct_out),
            "async": m.is_async,
            "privilege": if m.privilege.is_empty() { Value::Null } else { json!(m.privilege) },
        })).collect::<Vec<_>>(),
        "candidates": s.candidates.iter().map(|c| json!({
            "personality": c.personality,
            "driver": c.driver,
            "category": c.category,
            "probe_score": c.probe_score,
            "outcome": c.outcome,
            "reason": c.reason,
            "service": if c.service_id == 0 { Value::Null } else { json!(c.service_id) },
        })).collect::<Vec<_>>(),
    })
}

pub(crate) fn status_name(code: i32) -> String {
    Status::try_from(code).map_or_else(|_| format!("UNKNOWN({code})"), |s| s.name().to_string())
}

pub(crate) fn error(e: &ClientError) -> Value {
    match e {
        ClientError::Refused { status, message, rule } => {
            json!({ "status": status.name(), "message": message, "rule": rule })
        }
        other => json!({ "status": "CLIENT_ERROR", "message": other.to_string() }),
    }
}
