//! `portcullis policy check | explain | test`, run as a security engineer would.

use std::process::Command;

use portcullis_tests::bin;

fn run(args: &[&str]) -> (bool, String) {
    let out = Command::new(bin()).args(args).output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

#[test]
fn policy_check_prints_every_error_located() {
    let dir = portcullis_tests::tempdir();
    std::fs::write(
        dir.path().join("10-principals.toml"),
        "[[principal]]\nname = \"users\"\n\n[[principal]]\nname = \"users\"\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("20-rules.toml"),
        "[[rule]]\nid = \"r\"\neffect = \"allow\"\nprincipals = [\"usres\"]\nservice = { class = \"SampleDevice\" }\nmethods = [\"ad\"]\nmemory = [\"dmx\"]\n",
    )
    .unwrap();
    let (ok, out) = run(&["policy", "check", dir.path().to_str().unwrap()]);
    assert!(!ok);
    for expected in [
        "10-principals.toml:5:8: duplicate principal \"users\"",
        "20-rules.toml:4:15: rule \"r\" names unknown principal \"usres\" (did you mean \"users\"?)",
        "20-rules.toml:6:12: rule \"r\": method \"ad\" is not in class SampleDevice (did you mean \"add\"?)",
        "20-rules.toml:7:11: rule \"r\": memory type \"dmx\" is not in class SampleDevice (did you mean \"dma\"?)",
        "4 error(s)",
    ] {
        assert!(out.contains(expected), "missing {expected:?} in:\n{out}");
    }
    let (ok, out) = run(&[
        "policy",
        "check",
        root().join("broker/src/default_policy.toml").to_str().unwrap(),
    ]);
    assert!(ok, "{out}");
}

#[test]
fn policy_explain_names_decider_and_rules() {
    let (ok, out) = run(&[
        "policy",
        "explain",
        "--principal",
        "uid=1000,groups=dialout",
        "--service",
        "class=SampleDevice,name=sample0",
        "--method",
        "reset",
    ]);
    assert!(!ok, "a denial exits 1: {out}");
    assert!(out.starts_with("decision: DENY (rule \"default deny\")"), "{out}");
    assert!(
        out.contains("sample-admin") && out.contains("uid 1000 not in [0]"),
        "{out}"
    );
    let (ok, out) = run(&[
        "policy",
        "explain",
        "--principal",
        "uid=0",
        "--service",
        "class=SampleDevice",
        "--method",
        "reset",
    ]);
    assert!(
        ok && out.starts_with("decision: ALLOW (rule \"sample-admin\")"),
        "{out}"
    );
}

#[test]
fn policy_test_runs_cases_and_summarises() {
    let cases = root().join("tests/policy/cases.toml");
    let (ok, out) = run(&["policy", "test", cases.to_str().unwrap()]);
    assert!(ok, "{out}");
    assert!(out.lines().any(|l| l == "6 passed, 0 failed"), "{out}");
    // A case that expects the wrong rule fails, and says why.
    let dir = portcullis_tests::tempdir();
    let wrong = dir.path().join("wrong.toml");
    std::fs::write(&wrong, "[[case]]\nname = \"wrong\"\nprincipal = { uid = 1000 }\nservice = { class = \"SampleDevice\" }\nmethod = \"add\"\nexpect = \"allow\"\nrule = \"sample-admin\"\n").unwrap();
    let (ok, out) = run(&["policy", "test", wrong.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        out.contains("FAIL wrong: expected allow (rule \"sample-admin\"), got allow (rule \"sample-use\")"),
        "{out}"
    );
    assert!(out.lines().any(|l| l == "0 passed, 1 failed"), "{out}");
}

#[test]
fn policy_check_finds_unknown_argument_names() {
    let dir = portcullis_tests::tempdir();
    let path = dir.path().join("p.toml");
    std::fs::write(
        &path,
        "[[principal]]\nname = \"a\"\n[[rule]]\nid = \"r\"\neffect = \"allow\"\nprincipals = [\"a\"]\nservice = { class = \"SampleDevice\" }\nmethods = [\"add\", \"checksum_dma\"]\nargs.add.c = { max = 1 }\nargs.checksum_dma.len = { max = 4096 }\n",
    )
    .unwrap();
    let (ok, out) = run(&["policy", "check", path.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        out.contains("p.toml:9:10: rule \"r\": parameter \"c\" of add is not in class SampleDevice"),
        "{out}"
    );
    assert!(out.contains("1 error(s)"), "{out}");
}

/// Every family's methods, argument names, memory types and privileges, as a security team
/// writes them.
const FAMILIES_POLICY: &str = r#"[[principal]]
name = "a"

[[rule]]
id = "tty"
effect = "allow"
principals = ["a"]
service = { class = "TtyDevice" }
methods = ["get_line", "set_line", "write", "read", "get_modem", "set_modem", "flush", "drain", "send_break"]
privileges = ["tty.break"]
args.read.max_len = { max = 64 }

[[rule]]
id = "block"
effect = "allow"
principals = ["a"]
service = { class = "BlockDevice" }
methods = ["get_geometry", "read_blocks", "write_blocks", "flush", "discard"]
memory = ["dma"]
privileges = ["block.discard"]
args.read_blocks.count = { max = 2048 }

[[rule]]
id = "net"
effect = "allow"
principals = ["a"]
service = { class = "NetDevice" }
methods = ["get_info", "set_up", "set_down", "set_mtu", "send_packet", "recv_packet"]
privileges = ["net.admin"]
args.set_mtu.mtu = { min = 1280 }
"#;

#[test]
fn policy_check_knows_the_device_families_names() {
    let dir = portcullis_tests::tempdir();
    let good = dir.path().join("families.toml");
    std::fs::write(&good, FAMILIES_POLICY).unwrap();
    let (ok, out) = run(&["policy", "check", good.to_str().unwrap()]);
    assert!(ok, "{out}");
    assert!(out.contains("ok (3 rules"), "{out}");
    // Each kind of name misspelled once.
    let bad = dir.path().join("typos.toml");
    let typos = FAMILIES_POLICY
        .replace("\"send_break\"]", "\"send_brake\"]")
        .replace("[\"tty.break\"]", "[\"tty.brake\"]")
        .replace("[\"dma\"]", "[\"dam\"]")
        .replace("set_mtu.mtu", "set_mtu.size")
        .replace("\"recv_packet\"]", "\"receive_packet\"]");
    std::fs::write(&bad, typos).unwrap();
    let (ok, out) = run(&["policy", "check", bad.to_str().unwrap()]);
    assert!(!ok);
    for expected in [
        "rule \"tty\": method \"send_brake\" is not in class TtyDevice (did you mean \"send_break\"?)",
        "rule \"tty\": privilege \"tty.brake\" is not in class TtyDevice (did you mean \"tty.break\"?)",
        "rule \"block\": memory type \"dam\" is not in class BlockDevice (did you mean \"dma\"?)",
        "rule \"net\": method \"receive_packet\" is not in class NetDevice",
        "rule \"net\": parameter \"size\" of set_mtu is not in class NetDevice",
        "5 error(s)",
    ] {
        assert!(out.contains(expected), "{expected}: {out}");
    }
}

#[test]
fn policy_explain_checks_arguments_against_the_granting_rule() {
    let dir = portcullis_tests::tempdir();
    let path = dir.path().join("p.toml");
    std::fs::write(&path, "[[principal]]\nname = \"all\"\n[[rule]]\nid = \"bounded\"\neffect = \"allow\"\nprincipals = [\"all\"]\nservice = { class = \"SampleDevice\" }\nmethods = [\"echo\", \"add\"]\nargs.echo.len = { max = 4096 }\nargs.add.a = { one_of = [1, 2] }\n").unwrap();
    let policy = path.to_str().unwrap();
    let (ok, out) = run(&[
        "policy",
        "explain",
        "--policy",
        policy,
        "--principal",
        "uid=1000",
        "--service",
        "class=SampleDevice",
        "--method",
        "echo",
        "--arg",
        "len=8192",
    ]);
    assert!(!ok, "a denial exits 1: {out}");
    assert!(
        out.starts_with("decision: DENY (rule \"bounded\")\narguments: argument len = 8192 is greater than 4096"),
        "{out}"
    );
    let (ok, out) = run(&[
        "policy",
        "explain",
        "--policy",
        policy,
        "--principal",
        "uid=1000",
        "--service",
        "class=SampleDevice",
        "--method",
        "add",
        "--arg",
        "a=2",
        "--arg",
        "b=7",
    ]);
    assert!(
        ok && out.starts_with("decision: ALLOW (rule \"bounded\")\narguments: admitted by rule \"bounded\""),
        "{out}"
    );
    let (ok, out) = run(&[
        "policy",
        "explain",
        "--policy",
        policy,
        "--principal",
        "uid=1000",
        "--service",
        "class=SampleDevice",
        "--method",
        "add",
        "--arg",
        "c=1",
    ]);
    assert!(!ok && out.contains("has no parameter \"c\""), "{out}");
}

/// Two allow rules grant `echo`, one capped at 512 bytes: allow rules are a union, so a
/// 4,000-byte echo is allowed by the uncapped one whichever comes first in the file.
#[test]
fn policy_explain_is_the_same_whatever_the_order_of_the_rules() {
    let dir = portcullis_tests::tempdir();
    let head = "[[principal]]\nname = \"users\"\nuid = [1000]\n\n";
    let capped = "[[rule]]\nid = \"capped\"\neffect = \"allow\"\nprincipals = [\"users\"]\nservice = { class = \"SampleDevice\" }\nmethods = [\"echo\"]\nargs.echo.len = { max = 512 }\n\n";
    let open = "[[rule]]\nid = \"open\"\neffect = \"allow\"\nprincipals = [\"users\"]\nservice = { class = \"SampleDevice\" }\nmethods = [\"echo\"]\n\n";
    for (name, text) in [
        ("capped-first.toml", format!("{head}{capped}{open}")),
        ("open-first.toml", format!("{head}{open}{capped}")),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        let explain = |len: &str| {
            run(&[
                "policy",
                "explain",
                "--policy",
                path.to_str().unwrap(),
                "--principal",
                "uid=1000",
                "--service",
                "class=SampleDevice",
                "--method",
                "echo",
                "--arg",
                len,
            ])
        };
        let (ok, out) = explain("len=4000");
        assert!(
            ok && out.starts_with("decision: ALLOW (rule \"open\")"),
            "{name}: {out}"
        );
        let (ok, out) = explain("len=100");
        assert!(
            ok && out.starts_with("decision: ALLOW (rule \"capped\")"),
            "{name}: {out}"
        );
    }
}

/// `policy check` warns about what a policy probably does not mean, located; `--deny-warnings`
/// fails on them; `--config` knows the devices, so an assertion no device can be in scope of is
/// vacuous. The embedded default policy has no warning.
#[test]
fn policy_check_lints_and_denies_warnings_for_ci() {
    let dir = portcullis_tests::tempdir();
    let path = dir.path().join("p.toml");
    std::fs::write(&path, "[[principal]]\nname = \"apps\"\n\n[[rule]]\nid = \"capped\"\neffect = \"allow\"\nprincipals = [\"apps\"]\nservice = { class = \"SampleDevice\" }\nmethods = [\"echo\"]\nargs.echo.len = { max = 512 }\n\n[[rule]]\nid = \"open\"\neffect = \"allow\"\nprincipals = [\"apps\"]\nservice = { class = \"SampleDevice\" }\nmethods = [\"echo\"]\n\n[[assert]]\nid = \"no-breaks\"\nservice = { class = \"TtyDevice\" }\nprivileges = [\"tty.break\"]\n").unwrap();
    let policy = path.to_str().unwrap();
    let (ok, out) = run(&["policy", "check", policy]);
    assert!(ok, "warnings alone pass: {out}");
    for expected in [
        "p.toml:2:8: warning: principal \"apps\" has no attributes",
        "p.toml:5:6: warning: rule \"capped\"'s constraints on echo are bypassed: rule \"open\"",
        "2 warning(s)",
    ] {
        assert!(out.contains(expected), "{expected}: {out}");
    }
    let (ok, out) = run(&["policy", "check", "--deny-warnings", policy]);
    assert!(!ok && out.contains("2 warning(s), and --deny-warnings"), "{out}");
    let config = dir.path().join("broker.toml");
    std::fs::write(&config, "[[device]]\nname = \"sample0\"\ndriver = \"sample\"\n").unwrap();
    let (ok, out) = run(&["policy", "check", "--config", config.to_str().unwrap(), policy]);
    assert!(
        ok && out.contains("warning: assertion \"no-breaks\" is vacuous") && out.contains("3 warning(s)"),
        "{out}"
    );
    let default = root().join("broker/src/default_policy.toml");
    let (ok, out) = run(&["policy", "check", "--deny-warnings", default.to_str().unwrap()]);
    assert!(ok && !out.contains("warning"), "{out}");
}

/// `policy test` cases carry arguments; a case without a uid, or naming a class, method or
/// rule that does not exist, is an error (with a suggestion), not a silent root or a miss;
/// `--coverage` lists the rules no case exercised; `--format json|junit` for CI.
#[test]
fn policy_test_cases_with_arguments_errors_coverage_and_reports() {
    let dir = portcullis_tests::tempdir();
    let policy = dir.path().join("p.toml");
    std::fs::write(&policy, "[[principal]]\nname = \"users\"\nuid = [1000]\n\n[[rule]]\nid = \"echo-capped\"\neffect = \"allow\"\nprincipals = [\"users\"]\nservice = { class = \"SampleDevice\" }\nmethods = [\"echo\"]\nargs.echo.len = { max = 512 }\n\n[[rule]]\nid = \"never-used\"\neffect = \"allow\"\nprincipals = [\"users\"]\nservice = { class = \"BlockDevice\" }\nmethods = [\"get_geometry\"]\n").unwrap();
    let case = |name: &str, body: &str| {
        format!("[[case]]\nname = \"{name}\"\nservice = {{ class = \"SampleDevice\" }}\n{body}\n\n")
    };
    let cases = dir.path().join("cases.toml");
    let write = |text: String| std::fs::write(&cases, format!("policy = \"p.toml\"\n\n{text}")).unwrap();
    write(
        [
            case("small echo", "principal = { uid = 1000 }\nmethod = \"echo\"\nargs = { len = 100 }\nexpect = \"allow\"\nrule = \"echo-capped\""),
            case("big echo", "principal = { uid = 1000 }\nmethod = \"echo\"\nargs = { len = 800 }\nexpect = \"deny\"\nrule = \"echo-capped\""),
        ]
        .concat(),
    );
    let cases_path = cases.to_str().unwrap();
    let (ok, out) = run(&["policy", "test", cases_path, "--coverage"]);
    assert!(ok, "{out}");
    assert!(
        out.contains("coverage: no case exercised never-used") && out.contains("2 passed, 0 failed"),
        "{out}"
    );
    // The same case expecting the constraint to let 800 bytes through fails: it tests constraints.
    write(case(
        "big echo",
        "principal = { uid = 1000 }\nmethod = \"echo\"\nargs = { len = 800 }\nexpect = \"allow\"",
    ));
    let (ok, out) = run(&["policy", "test", cases_path]);
    assert!(
        !ok && out.contains("FAIL big echo: expected allow, got deny (rule \"echo-capped\")"),
        "{out}"
    );
    write(
        [
            case("no uid", "method = \"echo\"\nexpect = \"deny\""),
            case(
                "typo'd method",
                "principal = { uid = 1000 }\nmethod = \"ecko\"\nexpect = \"deny\"",
            ),
            case(
                "typo'd rule",
                "principal = { uid = 1000 }\nmethod = \"echo\"\nexpect = \"allow\"\nrule = \"echo-caped\"",
            ),
        ]
        .concat()
            + "[[case]]\nname = \"typo'd class\"\nservice = { class = \"SampleDevise\" }\nprincipal = { uid = 1000 }\nmethod = \"echo\"\nexpect = \"deny\"\n",
    );
    let (ok, out) = run(&["policy", "test", cases_path]);
    assert!(!ok, "{out}");
    for expected in [
        "ERROR no uid: the principal needs a uid",
        "ERROR typo'd method: class SampleDevice has no method \"ecko\" (did you mean \"echo\"?)",
        "ERROR typo'd rule: the policy has no rule \"echo-caped\" (did you mean \"echo-capped\"?)",
        "ERROR typo'd class: no driver has class \"SampleDevise\" (did you mean \"SampleDevice\"?)",
        "0 passed, 0 failed, 4 error(s)",
    ] {
        assert!(out.contains(expected), "{expected}: {out}");
    }
    let (_, out) = run(&["policy", "test", cases_path, "--format", "json", "--coverage"]);
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (json["errors"].as_u64(), json["cases"][0]["result"].as_str()),
        (Some(4), Some("error"))
    );
    assert_eq!(json["not_exercised"], serde_json::json!(["echo-capped", "never-used"]));
    let (_, out) = run(&["policy", "test", cases_path, "--format", "junit"]);
    assert!(
        out.starts_with("<?xml") && out.contains("<testsuite name=") && out.contains("errors=\"4\""),
        "{out}"
    );
    // Quotes in names and messages are escaped.
    assert!(
        out.contains("name=\"typo&apos;d method\"") && out.contains("&quot;ecko&quot;"),
        "{out}"
    );
}

/// `policy diff` also lists what changes no decision on a request but changes what the policy
/// enforces: the whole policy's mode, a rule's mode, constraints and rate, and assertions; and
/// `--exit-code` fails on them. Identical inputs: nothing, at once.
#[test]
fn policy_diff_lists_modes_constraints_rates_and_assertions() {
    let dir = portcullis_tests::tempdir();
    let old = dir.path().join("old.toml");
    let base = "[[principal]]\nname = \"users\"\nuid = [1000]\n\n[[rule]]\nid = \"use\"\neffect = \"allow\"\nprincipals = [\"users\"]\nservice = { class = \"SampleDevice\" }\nmethods = [\"echo\"]\nargs.echo.len = { max = 512 }\n";
    std::fs::write(&old, base).unwrap();
    let new = dir.path().join("new.toml");
    let diff = |text: &str| {
        std::fs::write(&new, text).unwrap();
        run(&[
            "policy",
            "diff",
            "--exit-code",
            old.to_str().unwrap(),
            new.to_str().unwrap(),
        ])
    };
    let (ok, out) = diff(base);
    assert!(
        ok && out.contains("0 change(s): 0 newly allowed, 0 no longer allowed\n"),
        "{out}"
    );
    let (ok, out) = diff(&format!("mode = \"audit\"\n{base}"));
    assert!(!ok && out.contains("~ policy mode: enforce -> audit"), "{out}");
    let edited = base.replace("{ max = 512 }", "{ max = 4096 }").replace(
        "methods = [\"echo\"]\n",
        "methods = [\"echo\"]\nmode = \"audit\"\nrate = \"10/s\"\n",
    ) + "\n[[assert]]\nid = \"no-reset\"\nservice = { class = \"SampleDevice\" }\nmethods = [\"reset\"]\n";
    let (ok, out) = diff(&edited);
    assert!(!ok, "{out}");
    for expected in [
        "~ rule \"use\": mode enforce -> audit",
        "~ rule \"use\": args.echo.len { max = 512 } -> { max = 4096 }",
        "~ rule \"use\": rate none -> 10/s",
        "+ assertion \"no-reset\" added",
        "; 4 change(s) of mode, constraints, rates or assertions",
    ] {
        assert!(out.contains(expected), "{expected}: {out}");
    }
}

/// `policy who-can`: the principals the policy lets reach a request, through which rule, with
/// a task that shows it; a principal a forbid stops entirely is not listed.
#[test]
fn policy_who_can_lists_principals_with_rules_and_witnesses() {
    let dir = portcullis_tests::tempdir();
    let path = dir.path().join("p.toml");
    std::fs::write(&path, "[[principal]]\nname = \"operators\"\ngroups = [\"wheel\"]\n\n[[principal]]\nname = \"interns\"\nuid = [2000]\n\n[[principal]]\nname = \"root\"\nuid = [0]\n\n[[rule]]\nid = \"ops-reset\"\neffect = \"allow\"\nprincipals = [\"operators\", \"interns\"]\nservice = { class = \"SampleDevice\" }\nmethods = [\"reset\"]\nprivileges = [\"sample.admin\"]\n\n[[rule]]\nid = \"no-interns\"\neffect = \"forbid\"\nprincipals = [\"interns\"]\nservice = { class = \"SampleDevice\" }\nmethods = [\"reset\"]\n").unwrap();
    let (ok, out) = run(&[
        "policy",
        "who-can",
        "--policy",
        path.to_str().unwrap(),
        "--service",
        "class=SampleDevice",
        "--method",
        "reset",
    ]);
    assert!(ok, "{out}");
    assert!(
        out.contains("operators (rule \"ops-reset\"): e.g. ")
            && out.contains("groups=[wheel]")
            && !out.contains("interns (rule"),
        "{out}"
    );
    assert!(
        out.contains("1 principal(s) can reach method reset (privilege sample.admin) on class=SampleDevice"),
        "{out}"
    );
    let (ok, out) = run(&[
        "policy",
        "who-can",
        "--policy",
        path.to_str().unwrap(),
        "--service",
        "class=SampleDevice",
        "--method",
        "ad",
    ]);
    assert!(!ok && out.contains("did you mean \"add\""), "{out}");
}

/// The default policy with one edit.
fn edited(from: &str, to: &str) -> String {
    let text = std::fs::read_to_string(root().join("broker/src/default_policy.toml")).unwrap();
    assert!(text.contains(from), "the default policy no longer has {from:?}");
    text.replace(from, to)
}

#[test]
fn policy_check_refuses_a_broken_assertion_with_a_counterexample() {
    let dir = portcullis_tests::tempdir();
    let path = dir.path().join("p.toml");
    // Everyone gets reset and its privilege: the default policy's assertion must catch it.
    std::fs::write(
        &path,
        edited(
            "\"checksum_dma\"]",
            "\"checksum_dma\", \"reset\"]\nprivileges = [\"sample.admin\"]",
        ),
    )
    .unwrap();
    let (ok, out) = run(&["policy", "check", path.to_str().unwrap()]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("assert \"only-root-resets\" fails")
            && out.contains("rule \"sample-use\" allows method reset (privilege sample.admin) to uid=")
            && out.contains("on class=SampleDevice"),
        "{out}"
    );
    // The running broker refuses it too (it checks the same way at load).
    let (ok, out) = run(&[
        "broker",
        "--policy",
        path.to_str().unwrap(),
        "--run-dir",
        dir.path().to_str().unwrap(),
    ]);
    assert!(!ok && out.contains("only-root-resets"), "{out}");
}

#[test]
fn policy_diff_lists_changed_decisions_with_witnesses() {
    let dir = portcullis_tests::tempdir();
    let old = root().join("broker/src/default_policy.toml");
    let new = dir.path().join("new.toml");
    std::fs::write(
        &new,
        edited("memory = [\"registers\", \"dma\"]", "memory = [\"registers\"]"),
    )
    .unwrap();
    let (ok, out) = run(&["policy", "diff", old.to_str().unwrap(), new.to_str().unwrap()]);
    assert!(ok, "{out}");
    assert!(
        out.contains(
            "- map memory dma on class=SampleDevice to any local task\n    was allowed by \"sample-use\"; now default deny"
        ),
        "{out}"
    );
    assert!(
        out.contains("1 change(s): 0 newly allowed, 1 no longer allowed"),
        "{out}"
    );
    // Reversed, the change is a gain; --exit-code turns any change into a failure.
    let (ok, out) = run(&[
        "policy",
        "diff",
        new.to_str().unwrap(),
        old.to_str().unwrap(),
        "--exit-code",
    ]);
    assert!(!ok && out.contains("+ map memory dma"), "{out}");
    let (ok, out) = run(&[
        "policy",
        "diff",
        old.to_str().unwrap(),
        old.to_str().unwrap(),
        "--exit-code",
    ]);
    assert!(ok && out.contains("0 change(s)"), "{out}");
}

#[test]
fn policy_fmt_rewrites_to_the_canonical_layout_and_checks() {
    let dir = portcullis_tests::tempdir();
    let path = dir.path().join("p.toml");
    let messy = "[[principal]]\nuid=[0]\nname =   \"root\" # the admin\n[[rule]]\nmethods=[\"add\",\"echo\"]\nprincipals=[\"root\"]\neffect = \"allow\"\nid=\"r\"\n";
    std::fs::write(&path, messy).unwrap();
    let (ok, out) = run(&["policy", "fmt", "--check", path.to_str().unwrap()]);
    assert!(!ok && out.contains("p.toml: not formatted"), "{out}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), messy, "--check wrote the file");
    // --diff shows the change as a unified diff, and writes nothing either.
    let (ok, out) = run(&["policy", "fmt", "--diff", path.to_str().unwrap()]);
    assert!(
        !ok && out.contains("(formatted)")
            && out.contains("-methods=[\"add\",\"echo\"]")
            && out.contains("+methods = [\"add\", \"echo\"]"),
        "{out}"
    );
    assert_eq!(std::fs::read_to_string(&path).unwrap(), messy, "--diff wrote the file");
    let (ok, out) = run(&["policy", "fmt", path.to_str().unwrap()]);
    assert!(ok, "{out}");
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        "[[principal]]\nname = \"root\" # the admin\nuid = [0]\n\n[[rule]]\nid = \"r\"\neffect = \"allow\"\nprincipals = [\"root\"]\nmethods = [\"add\", \"echo\"]\n"
    );
    let (ok, out) = run(&["policy", "fmt", "--check", path.to_str().unwrap()]);
    assert!(ok, "{out}");
    // Comments among a multi-line array's elements stay.
    std::fs::write(&path, "[[principal]]\nname = \"root\"\nuid = [0]\n\n[[rule]]\nid = \"r\"\neffect = \"allow\"\nprincipals = [\"root\"]\nmethods = [\n  # arithmetic\n  \"add\",\n  \"echo\", # for the health check\n]\n").unwrap();
    let (ok, out) = run(&["policy", "fmt", path.to_str().unwrap()]);
    assert!(ok, "{out}");
    let formatted = std::fs::read_to_string(&path).unwrap();
    assert!(
        formatted.contains("    # arithmetic\n    \"add\",") && formatted.contains("# for the health check"),
        "{formatted}"
    );
    // The project's own policy is formatted.
    let default = root().join("broker/src/default_policy.toml");
    let (ok, out) = run(&["policy", "fmt", "--check", default.to_str().unwrap()]);
    assert!(ok, "{out}");
    // A policy that does not load is not formatted.
    std::fs::write(&path, "[[rule]]\nid = \"r\"\n").unwrap();
    let (ok, _) = run(&["policy", "fmt", path.to_str().unwrap()]);
    assert!(!ok);
}
