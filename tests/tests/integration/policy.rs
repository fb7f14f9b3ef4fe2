//! Policy at the door: forbidden methods and default-denied services name their rule; the
//! identity policy sees is the kernel's.

use std::os::unix::process::CommandExt as _;

use portcullis_tests::{
    Broker, BrokerSetup, NOBODY,
    client::{OpenMode, Status, matching},
    stdout_ok,
};

const TWO_DEVICES: &str = r#"
[[device]]
name = "sample0"
driver = "sample"

[[device]]
name = "sample1"
driver = "sample"
"#;

const POLICY: &str = r#"
[[principal]]
name = "everyone"

[[rule]]
id = "sample0-use"
effect = "allow"
principals = ["everyone"]
service = { name = "sample0" }
methods = ["*"]

[[rule]]
id = "no-fire"
effect = "forbid"
principals = ["everyone"]
service = { class = "SampleDevice" }
methods = ["fire_event"]
"#;

#[tokio::test]
async fn policy_forbidden_method_names_rule() {
    let broker = Broker::with(BrokerSetup {
        config: Some(TWO_DEVICES),
        policy: Some(POLICY),
        ..BrokerSetup::default()
    });
    let client = broker.client().await;
    let session = client.session().await.unwrap();
    let sample0 = session.find_one(matching::by_name("sample0")).await.unwrap();
    let uc = session.open(sample0.id, OpenMode::Shared).await.unwrap();
    let denied = session.call_named(&uc, "fire_event", &[1], &[]).await.unwrap_err();
    assert_eq!(denied.status(), Some(Status::NotPrivileged), "{denied}");
    assert_eq!(denied.rule(), Some("no-fire"));
    // The method "*" grants still apply; reset needs a privilege no rule grants.
    assert_eq!(
        session.call_named(&uc, "add", &[1, 1], &[]).await.unwrap().scalars,
        vec![2]
    );
    let reset = session.call_named(&uc, "reset", &[], &[]).await.unwrap_err();
    assert_eq!(
        (reset.status(), reset.rule()),
        (Some(Status::NotPrivileged), Some("default deny"))
    );
}

#[tokio::test]
async fn policy_default_denied_service_names_default_deny() {
    let broker = Broker::with(BrokerSetup {
        config: Some(TWO_DEVICES),
        policy: Some(POLICY),
        ..BrokerSetup::default()
    });
    let client = broker.client().await;
    let session = client.session().await.unwrap();
    let sample1 = session.find_one(matching::by_name("sample1")).await.unwrap();
    let denied = session.open(sample1.id, OpenMode::Shared).await.unwrap_err();
    assert_eq!(denied.status(), Some(Status::NotPrivileged), "{denied}");
    assert_eq!(denied.rule(), Some("default deny"));
    assert!(
        broker.log().contains("admission denied"),
        "admissions denied are logged"
    );
}

#[test]
fn policy_sees_kernel_uid_not_claims() {
    // The default policy grants reset to uid 0 only. The same binary run as nobody is refused,
    // with the rule named; run as root it succeeds.
    let broker = Broker::start();
    let out = broker.cli_as(NOBODY, &["call", "sample0", "reset", "--json"]);
    assert!(!out.status.success());
    let refusal: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(refusal["status"], "NOT_PRIVILEGED");
    assert_eq!(refusal["rule"], "default deny");
    // Everything else the default policy gives every local user.
    assert_eq!(
        stdout_ok(&broker.cli_as(NOBODY, &["call", "sample0", "add", "--scalar", "2", "--scalar", "3"])),
        "5\n"
    );
    stdout_ok(&broker.cli(&["call", "sample0", "reset"]));
}

#[tokio::test]
async fn policy_forbidden_service_is_hidden() {
    let policy = format!(
        "{POLICY}\n[[rule]]\nid = \"hide-sample1\"\neffect = \"forbid\"\nprincipals = [\"everyone\"]\nservice = {{ name = \"sample1\" }}\n"
    );
    let broker = Broker::with(BrokerSetup {
        config: Some(TWO_DEVICES),
        policy: Some(&policy),
        ..BrokerSetup::default()
    });
    let client = broker.client().await;
    let names: Vec<String> = client
        .list_services(matching::all())
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert!(
        names.contains(&"sample0".to_string()) && !names.contains(&"sample1".to_string()),
        "{names:?}"
    );
    // Opening it by guessing its id is refused, naming the rule.
    let session = client.session().await.unwrap();
    let sample0 = session.find_one(matching::by_name("sample0")).await.unwrap();
    let denied = session.open(sample0.id + 1, OpenMode::Shared).await.unwrap_err();
    assert_eq!(
        (denied.status(), denied.rule()),
        (Some(Status::NotPrivileged), Some("hide-sample1"))
    );
}

#[test]
fn broker_refuses_invalid_policy_with_location() {
    let dir = portcullis_tests::tempdir();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[[rule]]\nid = \"r\"\neffect = \"allow\"\nprincipals = [\"ghost\"]\n",
    )
    .unwrap();
    let out = std::process::Command::new(portcullis_tests::bin())
        .args(["broker", "--run-dir"])
        .arg(dir.path().join("run"))
        .arg("--policy")
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("bad.toml:4:15: rule \"r\" names unknown principal \"ghost\""),
        "{stderr}"
    );
}

fn sha256_hex(path: &std::path::Path) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(std::fs::read(path).unwrap())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Runs the holder helper (opens sample0 exclusively) from `exe` with `argv0`, and says whether
/// it was admitted.
fn holder_admitted(broker: &Broker, exe: &std::path::Path, argv0: &str) -> bool {
    use std::{io::Read, os::unix::process::CommandExt};
    let mut child = std::process::Command::new(exe)
        .arg0(argv0)
        .arg(broker.run_dir())
        .arg("sample0")
        .env("PORTCULLIS_EXE_SHA256", "claimed")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut first = [0u8; 4];
    let admitted = child.stdout.take().unwrap().read_exact(&mut first).is_ok() && &first == b"held";
    let _ = child.kill();
    let _ = child.wait();
    admitted
}

#[test]
fn identity_exe_hash_is_the_kernels_not_the_clients_claim() {
    let trusted = std::path::PathBuf::from(env!("CARGO_BIN_EXE_holder"));
    let policy = format!(
        "[[principal]]\nname = \"trusted\"\nexe_sha256 = [\"{}\"]\n\n[[rule]]\nid = \"trusted-only\"\neffect = \"allow\"\nprincipals = [\"trusted\"]\nmethods = [\"*\"]\nopen = \"exclusive\"\n",
        sha256_hex(&trusted)
    );
    let broker = Broker::with(BrokerSetup {
        policy: Some(&policy),
        ..Default::default()
    });
    assert!(
        holder_admitted(&broker, &trusted, "holder"),
        "the trusted binary is admitted"
    );

    // The same bytes elsewhere, under another name: still admitted (the hash, not the path).
    let dir = portcullis_tests::tempdir();
    let copy = dir.path().join("renamed");
    std::fs::copy(&trusted, &copy).unwrap();
    assert!(
        holder_admitted(&broker, &copy, "anything"),
        "a copy of the trusted bytes is admitted"
    );

    // Another binary lying as much as it can: named like the trusted one on disk, with the
    // trusted path as argv[0] and a claimed hash in its environment. Refused.
    let impostor = dir.path().join("holder");
    std::fs::copy(portcullis_tests::bin(), &impostor).unwrap();
    let out = std::process::Command::new(&impostor)
        .arg0(trusted.to_str().unwrap())
        .args([
            "call",
            "sample0",
            "add",
            "--scalar",
            "1",
            "--scalar",
            "2",
            "--json",
            "--run-dir",
        ])
        .arg(broker.run_dir())
        .env("PORTCULLIS_EXE_SHA256", sha256_hex(&trusted))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let refusal: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (refusal["status"].as_str(), refusal["rule"].as_str()),
        (Some("NOT_PRIVILEGED"), Some("default deny"))
    );
}
