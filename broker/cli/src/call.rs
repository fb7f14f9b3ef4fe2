//! `portcullis call SERVICE METHOD`: open a service, call one method, print the results.

use clap::Args;
use portcullis_client::{ClientError, OpenMode, Session, matching, pb};

use super::{RunDir, fields::Described, json};

#[derive(Debug, Args)]
pub(crate) struct CallArgs {
    /// Service name, or numeric id.
    service: String,
    /// Method name, or selector number.
    method: String,
    /// A scalar argument (decimal, negative, or 0x-hex); repeat for each.
    #[arg(long = "scalar", value_parser = parse_scalar, allow_negative_numbers = true)]
    scalars: Vec<u64>,
    /// Struct input, as hex (the raw bytes, in this machine's layout).
    #[arg(long, value_parser = parse_hex, conflicts_with = "fields")]
    struct_hex: Option<Hex>,
    /// A field of the method's input struct, NAME=VALUE (a number, a value's name such as
    /// `parity=none`, text for a `char[N]`, true/false); repeat for each. Fields not given keep
    /// the device's current values where the driver has a method that reads them (`get_line`
    /// for `set_line`), else zero.
    #[arg(long = "field", value_name = "NAME=VALUE")]
    fields: Vec<String>,
    /// Most struct output bytes accepted [default: the method table's maximum].
    #[arg(long)]
    out_len: Option<u32>,
    /// Open the service exclusively.
    #[arg(long)]
    exclusive: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub(crate) fn parse_scalar(s: &str) -> Result<u64, String> {
    let parsed = if let Some(hex) = s.strip_prefix("0x") {
        u64::from_str_radix(hex, 16).ok()
    } else if s.starts_with('-') {
        s.parse::<i64>().ok().map(|i| i as u64)
    } else {
        s.parse::<u64>().ok()
    };
    parsed.ok_or_else(|| format!("{s:?} is not a 64-bit integer"))
}

/// Bytes given as hex on the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Hex(Vec<u8>);

fn parse_hex(s: &str) -> Result<Hex, String> {
    let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    if !s.len().is_multiple_of(2) {
        return Err("hex needs an even number of digits".into());
    }
    (0..s.len())
        .step_by(2)
        .map(|i| {
            s.get(i..i + 2)
                .and_then(|d| u8::from_str_radix(d, 16).ok())
                .ok_or_else(|| format!("bad hex at offset {i}"))
        })
        .collect::<Result<_, _>>()
        .map(Hex)
}

pub(crate) async fn run(args: CallArgs, run_dir: &RunDir) -> Result<(), String> {
    let result = call(&args, run_dir).await;
    match (&result, args.json) {
        (Ok((out, shape)), true) => {
            let mut record = serde_json::json!({ "status": "SUCCESS", "scalars": out.scalars, "struct_out": json::hex(&out.struct_out) });
            if let (Some(shape), Some(map)) = (shape, record.as_object_mut()) {
                let fields: serde_json::Map<_, _> = shape.decode(&out.struct_out).into_iter().collect();
                map.insert("fields".into(), fields.into());
            }
            println!("{record}");
        }
        (Ok((out, shape)), false) => {
            if !out.scalars.is_empty() {
                println!(
                    "{}",
                    out.scalars.iter().map(u64::to_string).collect::<Vec<_>>().join(" ")
                );
            }
            match shape {
                Some(shape) => {
                    for (name, value) in shape.decode(&out.struct_out) {
                        match value {
                            serde_json::Value::String(s) => println!("{name} = {s}"),
                            other => println!("{name} = {other}"),
                        }
                    }
                }
                None if !out.struct_out.is_empty() => println!("{}", json::hex(&out.struct_out)),
                None => {}
            }
        }
        (Err(e), true) => {
            println!("{}", json::error(e));
            return Err(String::new());
        }
        (Err(e), false) => return Err(format!("{} {}: {e}", args.service, args.method)),
    }
    Ok(())
}

pub(crate) async fn resolve_service(session: &Session, service: &str) -> Result<pb::ServiceInfo, ClientError> {
    match service.parse::<u64>() {
        Ok(id) => session
            .find_services(matching::all())
            .await?
            .into_iter()
            .find(|s| s.id == id)
            .ok_or_else(|| ClientError::NotFound(format!("service id {id}"))),
        Err(_) => session
            .find_one(matching::by_name(service))
            .await
            .map_err(|_| ClientError::NotFound(format!("service {service:?}"))),
    }
}

/// Calls the method; returns its output and, when the method's output is a described struct,
/// that struct's description (to print it field by field).
async fn call(
    args: &CallArgs,
    run_dir: &RunDir,
) -> Result<(portcullis_client::CallOutput, Option<Described>), ClientError> {
    let client = run_dir.connect().await?;
    let session = client.session().await?;
    let service = resolve_service(&session, &args.service).await?;
    let mode = if args.exclusive {
        OpenMode::Exclusive
    } else {
        OpenMode::Shared
    };
    let user_client = session.open(service.id, mode).await?;
    // An unknown name is the broker's to refuse only if it is a number; names are resolved here.
    let (selector, table_max) = match args.method.parse::<u32>() {
        Ok(selector) => (
            selector,
            user_client
                .service
                .methods
                .iter()
                .find(|m| m.selector == selector)
                .and_then(|m| m.struct_out)
                .map_or(0, |r| r.max),
        ),
        Err(_) => {
            let m = user_client
                .method(&args.method)
                .ok_or_else(|| ClientError::NotFound(format!("method {:?} of {}", args.method, service.name)))?;
            (m.selector, m.struct_out.map_or(0, |r| r.max))
        }
    };
    let out_len = args.out_len.unwrap_or(table_max);
    let method = user_client
        .service
        .methods
        .iter()
        .find(|m| m.selector == selector)
        .cloned();
    let class = user_client.service.class.clone();
    let shape = method
        .as_ref()
        .filter(|m| !m.struct_out_layout.is_empty())
        .and_then(|m| Described::find(&class, &m.struct_out_layout));
    let struct_in = match (&args.struct_hex, args.fields.is_empty()) {
        (Some(hex), _) => hex.0.clone(),
        (None, true) => Vec::new(),
        (None, false) => {
            let layout = method.as_ref().map(|m| m.struct_in_layout.clone()).unwrap_or_default();
            let input = Described::find(&class, &layout).ok_or_else(|| {
                ClientError::NotFound(format!(
                    "a described input struct for {}: --field needs one (use --struct-hex)",
                    args.method
                ))
            })?;
            let base = current_values(&session, &user_client, &layout, input.size()).await;
            input.encode(base, &args.fields).map_err(ClientError::Protocol)?
        }
    };
    let out = session
        .call(user_client.handle, selector, &args.scalars, &struct_in, out_len)
        .await;
    // Closing is courtesy: the session's end releases the user client anyway.
    let _ = session.close(&user_client).await;
    Ok((out?, shape))
}

/// The current values of struct `layout`, from the method that reads it (one that takes
/// nothing and returns it), when the service has one and the policy allows it.
async fn current_values(
    session: &Session,
    user_client: &portcullis_client::UserClient,
    layout: &str,
    size: usize,
) -> Option<Vec<u8>> {
    let getter = user_client
        .service
        .methods
        .iter()
        .find(|m| m.struct_out_layout == layout && m.scalar_in == 0 && m.struct_in.is_none_or(|r| r.max == 0))?;
    let out = session
        .call(user_client.handle, getter.selector, &[], &[], size as u32)
        .await
        .ok()?;
    (out.struct_out.len() == size).then_some(out.struct_out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_scalar_accepts_decimal_negative_and_hex() {
        assert_eq!(parse_scalar("5"), Ok(5));
        assert_eq!(parse_scalar("-1"), Ok(u64::MAX));
        assert_eq!(parse_scalar("0xff"), Ok(255));
        assert!(parse_scalar("five").is_err());
        assert!(parse_scalar("18446744073709551616").is_err());
    }

    #[test]
    fn parse_hex_needs_pairs() {
        assert_eq!(parse_hex("00ff 10"), Ok(Hex(vec![0, 255, 16])));
        assert!(parse_hex("abc").is_err());
        assert!(parse_hex("zz").is_err());
    }
}
