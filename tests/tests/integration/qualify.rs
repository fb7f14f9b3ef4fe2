//! `portcullis qualify` against real brokers: the short qualification CI runs (every transition,
//! 50 cycles, a broker it starts), a running broker's subset with its record compared, and a
//! leaking driver it must catch, naming the counter and the transition.

use std::process::Command;

use portcullis_tests::{Broker, BrokerSetup, bin, stdout_ok, tempdir};

fn record(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn a_short_qualification_of_every_transition_passes_with_a_record_and_a_plot() {
    let dir = tempdir();
    let (json, png) = (dir.path().join("record.json"), dir.path().join("plot.png"));
    let out = Command::new(bin())
        .args(["qualify", "--start", "--cycles", "50", "--no-install-check", "--json"])
        .arg(&json)
        .arg("--plot")
        .arg(&png)
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let text = stdout_ok(&out);
    assert!(text.contains("qualification passed: 8 transitions"), "{text}");
    let r = record(&json);
    assert_eq!(r["passed"], true);
    let names: Vec<&str> = r["transitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["connect", "open", "map", "call", "ring", "reload", "attach", "sleep"]
    );
    for t in r["transitions"].as_array().unwrap() {
        assert_eq!(t["cycles"], 50, "{t}");
        assert!(t["error"].is_null(), "{t}");
        // 0, then every cycle (50 / 50), the last after it settled.
        assert_eq!(t["samples"].as_array().unwrap().len(), 51, "{}", t["name"]);
        assert_eq!(t["verdicts"].as_object().unwrap().len(), 14);
    }
    // The devices attach made were claimed by drivers and went: one service more while each
    // lived would show in the peak only if sampled mid-cycle; the registry ends where it began.
    let attach = &r["transitions"][6]["verdicts"]["services"];
    assert_eq!(attach["start"], attach["end"]);
    let png = std::fs::read(&png).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
}

#[test]
fn a_running_brokers_subset_qualifies_and_compares_with_an_earlier_record() {
    let broker = Broker::start();
    let dir = tempdir();
    let (first, second) = (dir.path().join("first.json"), dir.path().join("second.json"));
    let run = |json: &std::path::Path, extra: &[&str]| {
        let mut args = vec![
            "qualify",
            "--cycles",
            "30",
            "--only",
            "open,call,reload",
            "--service",
            "sample0",
        ];
        args.extend_from_slice(extra);
        args.extend(["--json", json.to_str().unwrap()]);
        broker.cli(&args)
    };
    // The embedded configuration is a debug build's and runs from no file: the checklist says
    // the binary is not a release build, and qualification fails on it.
    let out = run(&first, &[]);
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains("[FAIL] the broker binary is a release build"), "{text}");
    assert!(
        text.contains("[ok] the policy parses and checks: the embedded default"),
        "{text}"
    );
    let r = record(&first);
    assert_eq!(r["passed"], false);
    assert_eq!(r["transitions"].as_array().unwrap().len(), 3);
    assert!(
        r["transitions"].as_array().unwrap().iter().all(|t| t["verdicts"]
            .as_object()
            .unwrap()
            .values()
            .all(|v| v["passed"] == true))
    );
    let out = run(&second, &["--no-install-check", "--compare", first.to_str().unwrap()]);
    let text = stdout_ok(&out);
    assert!(text.contains("compared with the record of"), "{text}");
}

#[test]
fn a_driver_that_leaks_a_descriptor_per_open_fails_qualification_naming_the_counter() {
    let broker = Broker::with(BrokerSetup {
        config: Some("[[device]]\nname = \"leaky0\"\ndriver = \"fault\"\nproperties = { leak_on_open = true }\n"),
        policy: Some(
            "[[principal]]\nname = \"all\"\n[[rule]]\nid = \"fault\"\neffect = \"allow\"\nprincipals = [\"all\"]\nservice = { class = \"FaultDevice\" }\nmethods = [\"ok\"]\nopen = \"exclusive\"\n",
        ),
        ..BrokerSetup::default()
    });
    let dir = tempdir();
    let json = dir.path().join("record.json");
    let out = broker.cli(&[
        "qualify",
        "--cycles",
        "200",
        "--only",
        "open",
        "--no-install-check",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains("qualification FAILED"), "{text}");
    assert!(text.contains("open: open_fds RAMPS"), "{text}");
    let verdict = &record(&json)["transitions"][0]["verdicts"]["open_fds"];
    assert_eq!(verdict["passed"], false);
    // Two opens a cycle (shared, exclusive), a descriptor each.
    let grown = verdict["end"].as_u64().unwrap() - verdict["start"].as_u64().unwrap();
    assert!((390..=410).contains(&grown), "{verdict}");
}
