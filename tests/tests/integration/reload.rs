//! Hot reload: on a file change, on `portcullis policy reload`, on SIGHUP; a policy that does
//! not compile is refused and the running one stays; under load, every call sees one policy.

use std::time::{Duration, Instant};

use portcullis_tests::{
    Broker, BrokerSetup,
    client::{OpenMode, Status, pb},
    stdout_ok,
};

const HEAD: &str = "[[principal]]\nname = \"all\"\n\n";

fn allow(id: &str, methods: &str) -> String {
    format!(
        "[[rule]]\nid = \"{id}\"\neffect = \"allow\"\nprincipals = [\"all\"]\nservice = {{ class = \"SampleDevice\" }}\nmethods = [{methods}]\nopen = \"exclusive\"\n\n"
    )
}

fn forbid(id: &str, methods: &str) -> String {
    format!("[[rule]]\nid = \"{id}\"\neffect = \"forbid\"\nprincipals = [\"all\"]\nmethods = [{methods}]\n\n")
}

fn write(broker: &Broker, text: &str) {
    // Replace the file the way editors do: write beside it, then rename over it.
    let tmp = broker.policy_path().with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, broker.policy_path()).unwrap();
}

/// Calls `add` until it is refused with `rule`, for at most 3 s.
async fn until_refused(
    session: &portcullis_tests::client::Session,
    uc: &portcullis_tests::client::UserClient,
    rule: &str,
) {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        match session.call_named(uc, "add", &[1, 1], &[]).await {
            Err(e) if e.rule() == Some(rule) => return,
            other => assert!(Instant::now() < deadline, "still {other:?} 3 s after the change"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn reload_when_the_policy_file_changes() {
    let policy = format!("{HEAD}{}", allow("use", "\"*\""));
    let broker = Broker::with(BrokerSetup {
        policy: Some(&policy),
        ..Default::default()
    });
    let (session, uc) = broker.open("sample0", OpenMode::Shared).await;
    assert_eq!(
        session.call_named(&uc, "add", &[1, 1], &[]).await.unwrap().scalars,
        vec![2]
    );
    write(&broker, &format!("{policy}{}", forbid("no-add", "\"add\"")));
    until_refused(&session, &uc, "no-add").await;
    // The same user client goes on with what the new policy still allows.
    assert_eq!(
        session.call_named(&uc, "echo", &[], b"hi").await.unwrap().struct_out,
        b"hi"
    );
    assert!(broker.log().contains("policy reloaded"));
}

/// The revision a broker logged when it loaded (or last reloaded) its policy.
fn logged_revisions(broker: &Broker) -> Vec<String> {
    broker
        .log()
        .lines()
        .filter(|l| l.contains("policy loaded") || l.contains("policy reloaded"))
        .filter_map(|l| l.split("revision=").nth(1))
        .map(|r| r.split_whitespace().next().unwrap_or_default().to_string())
        .collect()
}

/// However `--policy` spells the file, a change to it is reloaded, and the revision is the same
/// for the same contents: it hashes the file's name and contents, not the path.
#[tokio::test]
async fn every_spelling_of_the_policy_path_reloads_and_has_one_revision() {
    let policy = format!("{HEAD}{}", allow("use", "\"*\""));
    let changed = format!("{policy}{}", forbid("no-add", "\"add\""));
    let mut revisions = Vec::new();
    for spelling in [None, Some("policy.toml"), Some("./policy.toml")] {
        let broker = Broker::with(BrokerSetup {
            policy: Some(&policy),
            policy_spelling: spelling,
            ..Default::default()
        });
        let (session, uc) = broker.open("sample0", OpenMode::Shared).await;
        session.call_named(&uc, "add", &[1, 1], &[]).await.unwrap();
        write(&broker, &changed);
        until_refused(&session, &uc, "no-add").await;
        let logged = logged_revisions(&broker);
        assert_eq!(logged.len(), 2, "{spelling:?}: loaded and reloaded: {logged:?}");
        revisions.push(logged);
    }
    assert!(revisions.windows(2).all(|w| w[0] == w[1]), "{revisions:?}");
    assert_ne!(revisions[0][0], revisions[0][1], "a change is a new revision");
}

/// StrictModes: a root broker refuses a policy that others could change — at start (a mode-666
/// file in a mode-777 directory, a file owned by nobody) and at reload (the running policy
/// stays) — naming the path and the fix; `policy check` says the same as a warning.
#[tokio::test]
async fn a_root_broker_refuses_a_policy_others_can_write() {
    use std::os::unix::fs::PermissionsExt;
    let chmod = |path: &std::path::Path, mode: u32| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    let policy = format!("{HEAD}{}", allow("use", "\"*\""));
    let dir = portcullis_tests::tempdir();
    let open_dir = dir.path().join("policy.d");
    std::fs::create_dir(&open_dir).unwrap();
    chmod(&open_dir, 0o777);
    let file = open_dir.join("lab.toml");
    std::fs::write(&file, &policy).unwrap();
    chmod(&file, 0o666);
    rustix::fs::chown(&file, Some(rustix::process::Uid::from_raw(65534)), None).unwrap();
    let broker_run = |policy: &std::path::Path| {
        portcullis_tests::output_retrying_busy(
            std::process::Command::new(portcullis_tests::bin())
                .args(["broker", "--run-dir"])
                .arg(dir.path().join("run"))
                .arg("--policy")
                .arg(policy),
        )
    };
    for path in [&file, &open_dir] {
        let out = broker_run(path);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{stderr}");
        for expected in [
            format!(
                "{} is writable by its group and every user (mode 777)",
                open_dir.display()
            ),
            format!("fix: chmod go-w {}", open_dir.display()),
            format!("{} is owned by uid 65534", file.display()),
            format!("fix: chown root {}", file.display()),
        ] {
            assert!(stderr.contains(&expected), "{expected}: {stderr}");
        }
    }
    // The configuration too.
    let config = dir.path().join("broker.toml");
    std::fs::write(&config, "").unwrap();
    chmod(&config, 0o646);
    let out = portcullis_tests::output_retrying_busy(
        std::process::Command::new(portcullis_tests::bin())
            .args(["broker", "--run-dir"])
            .arg(dir.path().join("run"))
            .arg("--config")
            .arg(&config),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("is writable by every user (mode 646)"),
        "{stderr}"
    );
    let check = portcullis_tests::output_retrying_busy(
        std::process::Command::new(portcullis_tests::bin())
            .args(["policy", "check"])
            .arg(&file),
    );
    let out = String::from_utf8_lossy(&check.stdout);
    assert!(check.status.success(), "a warning: {out}");
    assert!(
        out.contains("warning: a root broker refuses this policy") && out.contains("mode 666"),
        "{out}"
    );

    // Trusted at start; made writable by others while running: the reload is refused.
    let broker = Broker::with(BrokerSetup {
        policy: Some(&policy),
        ..Default::default()
    });
    let (session, uc) = broker.open("sample0", OpenMode::Shared).await;
    std::fs::write(broker.policy_path(), format!("{policy}{}", forbid("no-add", "\"add\""))).unwrap();
    chmod(&broker.policy_path(), 0o666);
    let out = broker.cli(&["policy", "reload"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("writable by its group and every user"),
        "{stderr}"
    );
    assert_eq!(
        session.call_named(&uc, "add", &[1, 1], &[]).await.unwrap().scalars,
        vec![2],
        "the running policy stays"
    );
}

/// The running broker reports its policy (`policy status`, and in `stats`), and `policy reload
/// --dry-run` lists the live user clients whose grants a reload would change — changing
/// nothing.
#[tokio::test]
async fn policy_status_and_a_dry_run_reload_change_nothing() {
    let policy = format!("{HEAD}{}", allow("use", "\"*\""));
    // Edits are staged: only the command reloads (no file watch racing the dry runs).
    let broker = Broker::with(BrokerSetup {
        policy: Some(&policy),
        config: Some("watch_policy = false\n\n[[device]]\nname = \"sample0\"\ndriver = \"sample\"\n"),
        ..Default::default()
    });
    let status = stdout_ok(&broker.cli(&["policy", "status"]));
    let path = broker.policy_path().display().to_string();
    for expected in [
        "generation  1\n",
        "mode        enforce\n",
        "rules       1\n",
        "last reload (none)",
    ] {
        assert!(status.contains(expected), "{expected}: {status}");
    }
    assert!(status.contains(&format!("files       {path}")), "{status}");
    let stats = stdout_ok(&broker.cli(&["stats"]));
    assert!(stats.contains("generation 1, enforce, 1 rules"), "{stats}");
    let (session, uc) = broker.open("sample0", OpenMode::Shared).await;

    // A policy that forbids add: the dry run names this user client and what it would lose.
    write(&broker, &format!("{policy}{}", forbid("no-add", "\"add\"")));
    let out = stdout_ok(&broker.cli(&["policy", "reload", "--dry-run"]));
    assert!(
        out.contains("sample0 handle") && out.contains("method add refused"),
        "{out}"
    );
    assert!(
        out.contains("a reload would change 1 live user client(s); nothing was changed"),
        "{out}"
    );
    // One that no longer admits it: it would be closed.
    write(
        &broker,
        &format!(
            "{HEAD}{}",
            allow("other", "\"get_line\"").replace("SampleDevice", "TtyDevice")
        ),
    );
    let out = stdout_ok(&broker.cli(&["policy", "reload", "--dry-run"]));
    assert!(out.contains("would be closed"), "{out}");
    // Nothing changed: the same generation, and add still runs.
    assert!(stdout_ok(&broker.cli(&["policy", "status"])).contains("generation  1\n"));
    assert_eq!(
        session.call_named(&uc, "add", &[1, 1], &[]).await.unwrap().scalars,
        vec![2]
    );

    // A real reload is reported, and so is a refused one.
    write(&broker, &format!("{policy}{}", forbid("no-add", "\"add\"")));
    stdout_ok(&broker.cli(&["policy", "reload"]));
    let status = stdout_ok(&broker.cli(&["policy", "status"]));
    assert!(
        status.contains("generation  2\n") && status.contains("last reload accepted"),
        "{status}"
    );
    write(&broker, "[[rule]]\nid = \"broken\"\n");
    assert!(!broker.cli(&["policy", "reload"]).status.success());
    let status = stdout_ok(&broker.cli(&["policy", "status", "--json"]));
    let json: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(
        (json["generation"].as_u64(), json["last_reload"]["accepted"].as_bool()),
        (Some(2), Some(false))
    );
    assert!(
        json["last_reload"]["error"]
            .as_str()
            .unwrap()
            .contains("missing field `effect`"),
        "{json}"
    );
}

#[tokio::test]
async fn reload_command_refuses_a_broken_policy_and_keeps_the_running_one() {
    let policy = format!("{HEAD}{}", allow("use", "\"*\""));
    let broker = Broker::with(BrokerSetup {
        policy: Some(&policy),
        ..Default::default()
    });
    let (session, uc) = broker.open("sample0", OpenMode::Shared).await;
    // A typo'd method name: refused with its location, by the file watch and by the command.
    let broken = format!("{policy}{}", forbid("no-add", "\"ad\""));
    write(&broker, &broken);
    let line = broken.lines().position(|l| l.contains("\"ad\"")).unwrap() + 1;
    let out = broker.cli(&["policy", "reload"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let at = format!("policy.toml:{line}:12:");
    assert!(
        stderr.contains("reload refused") && stderr.contains(&at) && stderr.contains("did you mean \"add\""),
        "{stderr}"
    );
    assert_eq!(
        session.call_named(&uc, "add", &[1, 1], &[]).await.unwrap().scalars,
        vec![2],
        "the old policy still runs"
    );
    // Fixed: the command reloads it and reports the new generation.
    write(&broker, &format!("{policy}{}", forbid("no-add", "\"add\"")));
    let out = stdout_ok(&broker.cli(&["policy", "reload"]));
    assert!(
        out.starts_with("policy reloaded: generation ") && out.trim_end().ends_with("2 rules"),
        "{out}"
    );
    until_refused(&session, &uc, "no-add").await;
}

#[tokio::test]
async fn reload_on_sighup_and_only_for_administrators() {
    let policy = format!("{HEAD}{}", allow("use", "\"*\""));
    let broker = Broker::with(BrokerSetup {
        policy: Some(&policy),
        ..Default::default()
    });
    broker.signal(rustix::process::Signal::HUP);
    let deadline = Instant::now() + Duration::from_secs(3);
    while !broker.log().contains("SIGHUP: reloading the policy") {
        assert!(Instant::now() < deadline, "no reload after SIGHUP:\n{}", broker.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let out = broker.cli_as(portcullis_tests::NOBODY, &["policy", "reload"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("only root or the broker's own user"),
        "{out:?}"
    );
}

#[tokio::test]
async fn reload_that_refuses_admission_closes_the_user_client_with_an_event() {
    let policy = format!("{HEAD}{}", allow("use", "\"*\""));
    let broker = Broker::with(BrokerSetup {
        policy: Some(&policy),
        ..Default::default()
    });
    let (session, uc) = broker.open("sample0", OpenMode::Exclusive).await;
    // Admission still allowed, but not exclusive opens.
    write(
        &broker,
        &format!("{HEAD}[[rule]]\nid = \"shared\"\neffect = \"allow\"\nprincipals = [\"all\"]\nmethods = [\"*\"]\n"),
    );
    let event = tokio::time::timeout(Duration::from_secs(3), session.next_event())
        .await
        .expect("no event")
        .unwrap();
    let Some(pb::event::Kind::UserClientClosed(closed)) = event.kind else {
        panic!("{event:?}")
    };
    assert_eq!(
        (closed.handle, closed.status),
        (uc.handle, pb::StatusCode::NotPrivileged as i32)
    );
    assert!(closed.reason.contains("reloaded policy"), "{}", closed.reason);
    assert_eq!(
        session.call_named(&uc, "add", &[1, 1], &[]).await.unwrap_err().status(),
        Some(Status::NotOpen)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_load_every_call_sees_one_policy() {
    // Policies A and B each allow add and echo and forbid echo, by rules of their own names.
    // Every refusal is logged with the revision (SHA-256) of the policy the session checked it
    // against: a call that saw half of each policy would show a rule of one with the revision
    // of the other.
    let a = format!(
        "{HEAD}{}{}",
        allow("a", "\"add\", \"echo\""),
        forbid("no-echo-a", "\"echo\"")
    );
    let b = format!(
        "{HEAD}{}{}",
        allow("b", "\"add\", \"echo\""),
        forbid("no-echo-b", "\"echo\"")
    );
    let dir = portcullis_tests::tempdir();
    let log = dir.path().join("decisions.jsonl");
    let log_arg = log.to_str().unwrap().to_string();
    let broker = Broker::with(BrokerSetup {
        policy: Some(&a),
        args: &["--decision-log", &log_arg],
        ..Default::default()
    });
    // Each policy's revision, as `policy check` computes it for the broker's policy file.
    let revision = |text: &str| {
        write(&broker, text);
        let out = stdout_ok(&broker.cli(&["policy", "check", broker.policy_path().to_str().unwrap()]));
        let at = out.find("revision ").unwrap() + "revision ".len();
        out[at..at + 12].to_string()
    };
    let (revision_a, revision_b) = (revision(&a), revision(&b));
    assert_ne!(revision_a, revision_b);
    write(&broker, &a);
    let (session, uc) = broker.open("sample0", OpenMode::Shared).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let load = {
        let (stop, calls) = (stop.clone(), calls.clone());
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                assert_eq!(
                    session.call_named(&uc, "add", &[n, 1], &[]).await.unwrap().scalars,
                    vec![n + 1]
                );
                let echo = session.call_named(&uc, "echo", &[], b"x").await.unwrap_err();
                assert_eq!(echo.status(), Some(Status::NotPrivileged));
                assert!(matches!(echo.rule(), Some("no-echo-a" | "no-echo-b")), "{echo}");
                n += 2;
                calls.store(n, std::sync::atomic::Ordering::Relaxed);
            }
        })
    };
    let client = broker.client().await;
    let mut generation = 0;
    for i in 0..100 {
        write(&broker, if i % 2 == 0 { &b } else { &a });
        let (g, rules) = client.reload_policy().await.unwrap();
        assert_eq!(rules, 2);
        assert!(g > generation, "generations increase");
        generation = g;
        // Let calls run under this policy before the next reload (a hundred refusals: the
        // session's log budget refills meanwhile, so both policies' refusals are logged).
        let before = calls.load(std::sync::atomic::Ordering::Relaxed);
        while calls.load(std::sync::atomic::Ordering::Relaxed) < before + 200 {
            tokio::task::yield_now().await;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    load.await.unwrap();
    assert!(generation >= 101, "generation {generation}");
    drop(client);
    // The session's refusals, each with the revision it was checked under.
    let deadline = Instant::now() + Duration::from_secs(20);
    let records = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let records: Vec<serde_json::Value> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
        if records.iter().any(|r| r["event"] == "session_end") {
            break records;
        }
        assert!(Instant::now() < deadline, "no session_end in the decision log");
        tokio::task::yield_now().await;
    };
    let mut seen = std::collections::BTreeMap::new();
    for r in records
        .iter()
        .filter(|r| r["event"] == "call" && r["decision"] == "deny")
    {
        let rule = r["rule"].as_str().unwrap();
        let revision = &r["policy_revision"].as_str().unwrap()[..12];
        let expected = match rule {
            "no-echo-a" => &revision_a,
            "no-echo-b" => &revision_b,
            other => panic!("refused by {other}: {r}"),
        };
        assert_eq!(
            revision, expected,
            "a call refused by {rule} under the other policy: {r}"
        );
        *seen.entry(rule).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 2, "refusals from both policies were logged: {seen:?}");
}
