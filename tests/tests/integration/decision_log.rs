//! The decision log: admissions and refusals as JSON lines naming the rule and the failed
//! check; allowed calls counted; a client flooding refusals cannot flood the log.

use std::time::{Duration, Instant};

use portcullis_tests::{
    Broker, BrokerSetup,
    client::{OpenMode, Status},
};
use serde_json::Value;

const POLICY: &str = r#"
[[principal]]
name = "all"

[[rule]]
id = "use"
effect = "allow"
principals = ["all"]
service = { class = "SampleDevice" }
methods = ["add", "fire_event"]
args.add.a = { max = 100 }

[[rule]]
id = "no-fire"
effect = "forbid"
principals = ["all"]
methods = ["fire_event"]
"#;

fn records(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test]
async fn decision_log_names_rules_checks_and_survives_a_flood() {
    let dir = portcullis_tests::tempdir();
    let log = dir.path().join("decisions.jsonl");
    let log_arg = log.to_str().unwrap().to_string();
    let broker = Broker::with(BrokerSetup {
        policy: Some(POLICY),
        args: &["--decision-log", &log_arg],
        ..Default::default()
    });
    let session_began = Instant::now();
    let session_lasted = {
        let (session, uc) = broker.open("sample0", OpenMode::Shared).await;
        for i in 0..10 {
            session.call_named(&uc, "add", &[i, 1], &[]).await.unwrap();
        }
        let forbidden = session.call_named(&uc, "fire_event", &[1], &[]).await.unwrap_err();
        assert_eq!(forbidden.rule(), Some("no-fire"));
        let too_big = session.call_named(&uc, "add", &[101, 1], &[]).await.unwrap_err();
        assert_eq!(too_big.rule(), Some("use"));
        assert_eq!(
            session.call(uc.handle, 99, &[], &[], 0).await.unwrap_err().status(),
            Some(Status::BadArgument)
        );
        // A flood of refusals.
        for _ in 0..2000 {
            let _ = session.call(uc.handle, 99, &[], &[], 0).await;
        }
        session_began.elapsed()
    };
    let deadline = Instant::now() + Duration::from_secs(3);
    let all = loop {
        let all = records(&log);
        if all.iter().any(|r| r["event"] == "session_end") {
            break all;
        }
        assert!(Instant::now() < deadline, "no session_end record: {all:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let admission = all.iter().find(|r| r["event"] == "admission").unwrap();
    assert_eq!(
        (admission["decision"].as_str(), admission["rule"].as_str()),
        (Some("allow"), Some("use"))
    );
    assert_eq!(admission["uid"], 0);
    assert_eq!(admission["policy_generation"], 1);
    // What principals can name, and the service's class: what `policy suggest` writes rules from.
    assert_eq!(admission["class"], "SampleDevice");
    assert!(
        admission["groups"].as_array().unwrap().iter().any(|g| g == "root"),
        "{admission}"
    );
    assert!(
        admission["cgroup"].as_str().is_some_and(|c| c.starts_with('/')),
        "{admission}"
    );
    assert!(admission.get("lsm_label").is_some(), "{admission}");
    // The revision is the SHA-256 of the policy the broker loaded: the same as `policy check`
    // prints for that file.
    let revision = admission["policy_revision"].as_str().unwrap();
    assert_eq!(revision.len(), 64);
    let check = std::process::Command::new(portcullis_tests::bin())
        .args(["policy", "check", broker.policy_path().to_str().unwrap()])
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&check.stdout);
    assert!(printed.contains(&format!("revision {}", &revision[..12])), "{printed}");
    assert!(admission["exe"].is_string() && admission["id"].is_u64() && admission["time"].is_f64());

    let denials: Vec<&Value> = all.iter().filter(|r| r["decision"] == "deny").collect();
    let fire = denials.iter().find(|r| r["request"]["method"] == "fire_event").unwrap();
    assert_eq!(
        (fire["rule"].as_str(), fire["check"].as_str()),
        (Some("no-fire"), Some("policy"))
    );
    let arg = denials.iter().find(|r| r["check"] == "argument_constraint").unwrap();
    assert_eq!(arg["rule"], "use");
    assert!(arg["reason"].as_str().unwrap().contains("argument a = 101"));
    let table = denials.iter().find(|r| r["request"]["selector"] == 99).unwrap();
    assert_eq!(table["check"], "method_table");
    // One vocabulary of identifiers (docs/POLICY.md), never a status name in its place.
    let vocabulary = [
        "policy",
        "argument_constraint",
        "rate_limit",
        "method_table",
        "translation",
        "handle",
        "arbitration",
        "resource_limit",
        "device_gone",
        "protocol",
        "driver",
    ];
    for d in &denials {
        assert!(vocabulary.contains(&d["check"].as_str().unwrap_or_default()), "{d}");
    }
    assert_eq!(
        (table["rule"].as_str(), table["status"].as_str()),
        (Some("default deny"), Some("BAD_ARGUMENT"))
    );

    // The flood was cut to the session's budget (a burst of 100, then 50 lines a second, however
    // long the session took), and what was cut is counted.
    let budget = 100.0 + 50.0 * session_lasted.as_secs_f64() + 1.0;
    assert!(
        (denials.len() as f64) <= budget,
        "{} denial lines for 2,003 refusals in {session_lasted:?}",
        denials.len()
    );
    let end = all.iter().find(|r| r["event"] == "session_end").unwrap();
    assert_eq!(end["calls_allowed"], 10, "allowed calls are counted, not logged");
    let dropped = end["dropped"].as_u64().unwrap()
        + all
            .iter()
            .filter(|r| r["event"] == "dropped")
            .map(|r| r["count"].as_u64().unwrap())
            .sum::<u64>();
    assert_eq!(
        dropped as usize + denials.len(),
        2003,
        "every refusal is either logged or counted as dropped"
    );
    assert!(!all.iter().any(|r| r["event"] == "call" && r["decision"] == "allow"));
}

async fn wait_for(log: &std::path::Path, what: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let all = records(log);
        if what(&all) {
            return all;
        }
        assert!(Instant::now() < deadline, "log never showed it: {all:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn audit_mode_lets_requests_through_and_logs_would_deny() {
    let dir = portcullis_tests::tempdir();
    let log = dir.path().join("decisions.jsonl");
    let log_arg = log.to_str().unwrap().to_string();
    // A forbid rule in audit mode: fire_event goes through, logged.
    let policy = format!("{POLICY}mode = \"audit\"\n");
    let broker = Broker::with(BrokerSetup {
        policy: Some(&policy),
        args: &["--decision-log", &log_arg],
        ..Default::default()
    });
    let (session, uc) = broker.open("sample0", OpenMode::Shared).await;
    assert_eq!(
        session.call_named(&uc, "fire_event", &[7], &[]).await.unwrap().scalars,
        vec![0]
    );
    // An enforced argument constraint of the allow rule still refuses.
    assert_eq!(
        session.call_named(&uc, "add", &[101, 1], &[]).await.unwrap_err().rule(),
        Some("use")
    );
    let all = wait_for(&log, |all| all.iter().any(|r| r["decision"] == "would_deny")).await;
    let would = all.iter().find(|r| r["decision"] == "would_deny").unwrap();
    assert_eq!(
        (would["rule"].as_str(), would["event"].as_str(), would["mode"].as_str()),
        (Some("no-fire"), Some("call"), Some("audit"))
    );
    assert_eq!(would["request"]["method"], "fire_event");
    drop(session);

    // The whole policy in audit mode: a service no rule allows opens, and says it would not.
    let dir = portcullis_tests::tempdir();
    let log = dir.path().join("decisions.jsonl");
    let log_arg = log.to_str().unwrap().to_string();
    let policy = "mode = \"audit\"\n\n[[principal]]\nname = \"all\"\n";
    let broker = Broker::with(BrokerSetup {
        policy: Some(policy),
        args: &["--decision-log", &log_arg],
        ..Default::default()
    });
    let (session, uc) = broker.open("sample0", OpenMode::Exclusive).await;
    assert_eq!(
        session.call_named(&uc, "add", &[1, 2], &[]).await.unwrap().scalars,
        vec![3]
    );
    // Wait for both records themselves: other would-deny lines (finding the service, say) may
    // come first, and the call's line is written after the call returns.
    let all = wait_for(&log, |all| {
        ["admission", "call"].iter().all(|event| {
            all.iter()
                .any(|r| r["event"] == *event && r["decision"] == "would_deny")
        })
    })
    .await;
    let admission = all
        .iter()
        .find(|r| r["event"] == "admission" && r["decision"] == "would_deny")
        .unwrap();
    assert_eq!(admission["rule"], "default deny");
    let call = all
        .iter()
        .find(|r| r["event"] == "call" && r["decision"] == "would_deny")
        .unwrap();
    assert_eq!(
        (call["rule"].as_str(), call["request"]["method"].as_str()),
        (Some("default deny"), Some("add"))
    );
}

/// Every reload is a line, accepted or refused, with its revision; a user client a reload
/// closes is a line naming the rule.
#[tokio::test]
async fn decision_log_records_reloads_and_what_they_close() {
    let dir = portcullis_tests::tempdir();
    let log = dir.path().join("decisions.jsonl");
    let log_arg = log.to_str().unwrap().to_string();
    let broker = Broker::with(BrokerSetup {
        policy: Some(POLICY),
        config: Some("watch_policy = false\n\n[[device]]\nname = \"sample0\"\ndriver = \"sample\"\n"),
        args: &["--decision-log", &log_arg],
        ..Default::default()
    });
    let (session, uc) = broker.open("sample0", OpenMode::Shared).await;
    std::fs::write(broker.policy_path(), "[[principal]]\nname = \"all\"\n").unwrap();
    assert!(broker.cli(&["policy", "reload"]).status.success());
    // The next request of the session sees the reload: its user client is closed.
    let _ = session.call_named(&uc, "add", &[1, 1], &[]).await;
    std::fs::write(broker.policy_path(), "[[rule]]\n").unwrap();
    assert!(!broker.cli(&["policy", "reload"]).status.success());
    let deadline = Instant::now() + Duration::from_secs(3);
    let all = loop {
        let all = records(&log);
        let reloads = all.iter().filter(|r| r["event"] == "reload").count();
        if reloads == 2 && all.iter().any(|r| r["event"] == "closed_by_reload") {
            break all;
        }
        assert!(Instant::now() < deadline, "{all:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let reloads: Vec<&Value> = all.iter().filter(|r| r["event"] == "reload").collect();
    assert_eq!(
        (
            reloads[0]["decision"].as_str(),
            reloads[0]["policy_generation"].as_u64()
        ),
        (Some("accepted"), Some(2))
    );
    assert_eq!(reloads[0]["policy_revision"].as_str().map(str::len), Some(64));
    assert_eq!(reloads[1]["decision"], "refused");
    assert!(
        reloads[1]["error"].as_str().unwrap().contains("missing field"),
        "{}",
        reloads[1]
    );
    let closed = all.iter().find(|r| r["event"] == "closed_by_reload").unwrap();
    assert_eq!(
        (closed["rule"].as_str(), closed["class"].as_str()),
        (Some("default deny"), Some("SampleDevice"))
    );
}

/// `policy suggest --from LOG`: from what a policy in audit mode would have refused, the rules
/// that allow it — narrowest (that uid and program, that service, those requests); with them
/// added, the same client is allowed.
#[tokio::test]
async fn policy_suggest_writes_the_rules_that_allow_what_was_refused() {
    let dir = portcullis_tests::tempdir();
    let log = dir.path().join("decisions.jsonl");
    let log_arg = log.to_str().unwrap().to_string();
    let only_root = "[[principal]]\nname = \"root\"\nuid = [0]\n\n[[rule]]\nid = \"root-use\"\neffect = \"allow\"\nprincipals = [\"root\"]\nservice = { class = \"SampleDevice\" }\nmethods = [\"add\"]\n";
    let broker = Broker::with(BrokerSetup {
        policy: Some(&format!("mode = \"audit\"\n\n{only_root}")),
        config: Some("watch_policy = false\n\n[[device]]\nname = \"sample0\"\ndriver = \"sample\"\n"),
        args: &["--decision-log", &log_arg],
        ..Default::default()
    });
    let call = ["call", "sample0", "add", "--scalar", "2", "--scalar", "3"];
    assert!(
        broker.cli_as(portcullis_tests::NOBODY, &call).status.success(),
        "audit mode lets it through"
    );
    let deadline = Instant::now() + Duration::from_secs(3);
    while !records(&log)
        .iter()
        .any(|r| r["decision"] == "would_deny" && r["event"] == "call")
    {
        assert!(Instant::now() < deadline, "{:?}", records(&log));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let out = broker.cli(&[
        "policy",
        "suggest",
        "--from",
        &log_arg,
        "--policy",
        broker.policy_path().to_str().unwrap(),
    ]);
    let suggested = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{suggested}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let exe = broker.private_dir().join("portcullis");
    for expected in [
        "uid = [65534]".to_string(),
        format!("exe = [{:?}]", exe.display().to_string()),
        "service = { class = \"SampleDevice\", name = \"sample0\" }".to_string(),
        "methods = [\"add\"]".to_string(),
    ] {
        assert!(suggested.contains(&expected), "{expected}: {suggested}");
    }
    // Enforced, the client is refused; with the suggestions, it is allowed.
    std::fs::write(broker.policy_path(), only_root).unwrap();
    assert!(broker.cli(&["policy", "reload"]).status.success());
    assert!(!broker.cli_as(portcullis_tests::NOBODY, &call).status.success());
    std::fs::write(broker.policy_path(), format!("{only_root}\n{suggested}")).unwrap();
    assert!(broker.cli(&["policy", "reload"]).status.success());
    let out = broker.cli_as(portcullis_tests::NOBODY, &call);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
