//! A stock gRPC client in another language (Python grpcio, stubs generated from
//! proto/portcullis.proto by grpcio-tools) drives a whole session; health and reflection answer.

use std::{path::Path, process::Command};

use portcullis_tests::{Broker, BrokerSetup};

/// The default policy without the admin rule: the Python client (root) must see a refusal.
const NO_ADMIN: &str = r#"
[[principal]]
name = "local-tasks"

[[rule]]
id = "sample-use"
effect = "allow"
principals = ["local-tasks"]
service = { class = "SampleDevice" }
methods = ["add", "echo", "get_info", "wait_event", "fire_event"]
"#;

#[test]
fn python_grpcio_client_drives_a_session() {
    let python = std::env::var("PORTCULLIS_PYTHON").unwrap_or_else(|_| {
        panic!(
            "PORTCULLIS_PYTHON is not set: run the suite with `cargo xtask test`, which installs grpcio into target/py"
        )
    });
    let broker = Broker::with(BrokerSetup {
        config: None,
        policy: Some(NO_ADMIN),
        ..BrokerSetup::default()
    });
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let out = Command::new(python)
        .arg(root.join("tests/python/session_client.py"))
        .arg(root.join("proto"))
        .arg(broker.socket())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python client failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("python session: ok"), "{stdout}");
    assert!(stdout.contains("reset: refused by rule default deny"), "{stdout}");
}
