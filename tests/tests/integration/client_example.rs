//! The Rust client's documented example runs against a real broker, and the broker's JSON logs
//! are JSON.

use portcullis_tests::{Broker, BrokerSetup};

#[allow(dead_code)]
#[path = "../../../shims/rust/examples/add.rs"]
mod add_example;

#[test]
fn rust_client_example_adds_on_a_real_broker() {
    let broker = Broker::start();
    assert_eq!(add_example::add(&broker.run_dir(), 40, 2).unwrap(), 42);
}

#[test]
fn broker_log_format_json_writes_json_lines() {
    let broker = Broker::with(BrokerSetup {
        args: &["--log-format", "json"],
        ..BrokerSetup::default()
    });
    assert_eq!(add_example::add(&broker.run_dir(), 1, 1).unwrap(), 2);
    let log = broker.log();
    // Whole lines only: the broker may be writing the next one (the session's end) as the file
    // is read.
    let lines: Vec<serde_json::Value> = log
        .split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l["fields"]["message"] == "user client opened" && l["fields"]["service"] == "sample0"),
        "{log}"
    );
    assert!(
        lines
            .iter()
            .all(|l| l["level"].is_string() && l["timestamp"].is_string())
    );
}
