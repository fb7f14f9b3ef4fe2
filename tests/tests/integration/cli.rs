//! What a new user trips on: where options go, usage errors, directories that don't exist yet,
//! explain on a configured name, and logs a person or a program can read.

use std::process::Command;

use portcullis_client::OpenMode;
use portcullis_tests::{Broker, BrokerSetup, bin, stdout_ok};

#[test]
fn run_dir_goes_before_or_after_the_subcommand() {
    let broker = Broker::start();
    let run_dir = broker.run_dir();
    for args in [
        vec![
            "--run-dir",
            run_dir.to_str().unwrap(),
            "call",
            "sample0",
            "add",
            "--scalar",
            "2",
            "--scalar",
            "3",
        ],
        vec![
            "call",
            "sample0",
            "add",
            "--scalar",
            "2",
            "--scalar",
            "3",
            "--run-dir",
            run_dir.to_str().unwrap(),
        ],
    ] {
        let out = Command::new(bin()).args(&args).output().unwrap();
        assert_eq!(stdout_ok(&out).trim(), "5", "{args:?}");
    }
}

#[test]
fn usage_errors_exit_2_and_output_directories_are_made() {
    let dir = portcullis_tests::tempdir();
    let layout = dir.path().join("s.toml");
    std::fs::write(&layout, "[[struct]]\nname = \"s\"\nfields = [[\"a\", \"u32\"]]\n").unwrap();
    for args in [
        vec!["layout", "--c-asserts"],
        vec!["layout", "--c-asserts", "--abi", "i386", "--abi", "armhf"],
    ] {
        let out = Command::new(bin()).args(&args).arg(&layout).output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let headers = dir.path().join("include/portcullis");
    let out = Command::new(bin())
        .args(["schema", "--c-header"])
        .arg(&headers)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(headers.join("sample.h").exists());
}

#[test]
fn policy_help_names_every_policy_subcommand() {
    let top = stdout_ok(&Command::new(bin()).arg("--help").output().unwrap());
    let line = top.lines().find(|l| l.trim_start().starts_with("policy")).unwrap();
    let sub = stdout_ok(&Command::new(bin()).args(["policy", "--help"]).output().unwrap());
    for command in [
        "check", "explain", "test", "diff", "fmt", "reload", "who-can", "schema", "status",
    ] {
        assert!(line.contains(command), "`portcullis --help` says: {line}");
        assert!(sub.contains(&format!("  {command} ")), "{sub}");
    }
}

/// `portcullis policy explain ARGS`.
fn explain(args: &[&str]) -> std::process::Output {
    Command::new(bin())
        .args(["policy", "explain"])
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn policy_explain_finds_a_configured_service_by_name() {
    let out = explain(&[
        "--principal",
        "uid=1000",
        "--service",
        "name=sample0",
        "--method",
        "add",
    ]);
    let text = stdout_ok(&out);
    assert!(text.starts_with("decision: ALLOW (rule \"sample-use\")"), "{text}");
    assert!(!text.contains("class  is not"), "{text}");
    let dir = portcullis_tests::tempdir();
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        "[[device]]\nname = \"lab\"\ndriver = \"sample\"\nproperties = { model = \"x\" }\n",
    )
    .unwrap();
    let out = explain(&[
        "--principal",
        "uid=0",
        "--service",
        "name=lab",
        "--method",
        "reset",
        "--config",
        config.to_str().unwrap(),
    ]);
    assert!(stdout_ok(&out).contains("decision: ALLOW (rule \"sample-admin\")"));
    let out = explain(&["--principal", "uid=0", "--service", "name=nothere", "--method", "add"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code() == Some(2) && stderr.contains("no device \"nothere\""),
        "{stderr}"
    );
}

/// `explain` exits like `pkcheck` (0 allowed, 1 denied, 2 a usage error), never takes an
/// omitted uid for root, refuses names no driver has with a suggestion, and speaks JSON.
#[test]
fn policy_explain_exit_status_names_and_json() {
    let code = |args: &[&str]| explain(args).status.code();
    let add = ["--service", "class=SampleDevice", "--method", "add"];
    assert_eq!(code(&[&["--principal", "uid=1000"][..], &add].concat()), Some(0));
    assert_eq!(
        code(&[
            "--principal",
            "uid=1000",
            "--service",
            "class=SampleDevice",
            "--method",
            "reset"
        ]),
        Some(1)
    );
    let out = explain(&add);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs uid=N"));
    for (args, says) in [
        (
            ["--service", "class=SampleDevise", "--method", "add"],
            "no driver has class \"SampleDevise\" (did you mean \"SampleDevice\"?)",
        ),
        (
            ["--service", "class=SampleDevice", "--method", "ad"],
            "class SampleDevice has no method \"ad\" (did you mean \"add\"?)",
        ),
        (
            ["--service", "class=SampleDevice", "--memory", "dam"],
            "has no memory type \"dam\" (did you mean \"dma\"?)",
        ),
    ] {
        let out = explain(&[&["--principal", "uid=1000"][..], &args].concat());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.code() == Some(2) && stderr.contains(says),
            "{says}: {stderr}"
        );
    }
    let out = explain(
        &[
            &[
                "--principal",
                "uid=1000,cgroup=/user.slice,lsm_label=unconfined",
                "--json",
            ][..],
            &add,
        ]
        .concat(),
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (json["decision"].as_str(), json["rule"].as_str()),
        (Some("allow"), Some("sample-use"))
    );
    let decided: Vec<&serde_json::Value> = json["rules"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["decided"] == true)
        .collect();
    assert_eq!(decided.len(), 1);
    assert_eq!(json["notes"][0], "gid not given: taken as 1000 (the uid)");
}

/// A reader that stops early (`portcullis schema --json | head`): the command ends quietly,
/// killed by SIGPIPE like any Unix tool, never with a panic.
#[test]
fn a_command_whose_reader_goes_away_exits_quietly() {
    use std::io::BufRead;
    use std::os::unix::process::ExitStatusExt;
    let mut child = Command::new(bin())
        .args(["schema", "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert_eq!(first.trim(), "{");
    // The reader is gone (dropped above); the rest of the output has nowhere to go.
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.is_empty(), "{stderr}");
    assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "{:?}", out.status);
}

#[test]
fn policy_check_warns_about_a_program_without_an_owner() {
    let dir = portcullis_tests::tempdir();
    let policy = dir.path().join("p.toml");
    std::fs::write(
        &policy,
        "[[principal]]\nname = \"term\"\nexe = [\"/usr/bin/minicom\"]\n\n[[rule]]\nid = \"r\"\neffect = \"allow\"\nprincipals = [\"term\"]\nservice = { class = \"SampleDevice\" }\nmethods = [\"add\"]\n",
    )
    .unwrap();
    let out = Command::new(bin())
        .args(["policy", "check"])
        .arg(&policy)
        .output()
        .unwrap();
    let text = stdout_ok(&out);
    assert!(
        text.contains("p.toml:2:8: warning: principal \"term\" relies on exe/exe_sha256 alone")
            && text.contains("1 warning(s)"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_log_has_refusals_at_info_plain_pids_and_no_colours() {
    let broker = Broker::with(BrokerSetup {
        log_level: Some("info"),
        ..BrokerSetup::default()
    });
    let (session, sample) = broker.open("sample0", OpenMode::Shared).await;
    // Refused by the method table, then by policy (reset is root's; this test runs as root, so
    // ask for a selector the table does not have, and a call on a closed handle).
    assert!(session.call(sample.handle, 99, &[], &[], 0).await.is_err());
    assert!(session.call(sample.handle + 7, 0, &[1, 2], &[], 0).await.is_err());
    drop(session);
    let refused = broker.cli_as(portcullis_tests::NOBODY, &["call", "sample0", "reset"]);
    assert_eq!(refused.status.code(), Some(1));
    let log = broker.log();
    assert!(log.contains("call refused") && log.contains("selector=99"), "{log}");
    assert!(log.contains("status=NOT_OPEN"), "{log}");
    assert!(
        log.contains("uid=65534") && log.contains("rule=\"default deny\"") && log.contains("NOT_PRIVILEGED"),
        "{log}"
    );
    assert!(!log.contains('\u{1b}'), "ANSI escapes in a log file");
    assert!(!log.contains("Some("), "{log}");
}

#[test]
fn a_flood_of_protocol_breaking_connections_costs_the_log_a_few_lines() {
    const FLOOD: usize = 300;
    let broker = Broker::with(BrokerSetup {
        log_level: Some("info"),
        ..BrokerSetup::default()
    });
    let native = broker.run_dir().join(portcullis_client::NATIVE_SOCKET);
    let started = std::time::Instant::now();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        for _ in 0..FLOOD {
            let conn = tokio_seqpacket::UnixSeqpacket::connect(&native).await.unwrap();
            conn.send(&[0xff, 0xff, 0xff]).await.unwrap();
            // The broker answers with a Goodbye and closes; read to the end.
            let mut buf = [0u8; 512];
            while conn.recv(&mut buf).await.is_ok_and(|n| n.bytes_read() > 0) {}
        }
    });
    let seconds = started.elapsed().as_secs();
    let log = broker.log();
    let lines = log
        .lines()
        .filter(|l| l.contains("native session closed by the broker"))
        .count();
    // A burst of 20, then one a second: each connection got its Goodbye, the log did not get
    // a line each.
    assert!(lines >= 20, "{lines} lines");
    assert!(
        lines as u64 <= 20 + seconds + 2,
        "{lines} log lines for {FLOOD} bad connections in {seconds} s"
    );
    assert!(broker.is_running_ref());
}
