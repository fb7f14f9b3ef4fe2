use portcullis_proto::property::PropValue;
use proptest::prelude::*;

use super::*;
use crate::{Catalog, ClassNames, PolicyError, Source, testgen::*};

fn parse(text: &str) -> Result<Policy, PolicyError> {
    Policy::parse(&[Source { origin: "p.toml", text }])
}

fn errors(text: &str) -> Vec<String> {
    parse(text).map_or_else(|e| e.errors().iter().map(ToString::to_string).collect(), |_| Vec::new())
}

/// A concrete world, built directly (not by the solver).
#[allow(clippy::too_many_arguments)]
fn world(
    class: &str,
    uid: u32,
    gid: u32,
    groups: &[&str],
    exe: Option<&str>,
    abi: AbiId,
    name: &str,
    vendor: Option<&str>,
) -> World {
    let mut values = BTreeMap::new();
    values.insert(Key::Uid, Value::Num(uid));
    values.insert(Key::Gid, Value::Num(gid));
    for g in GROUPS {
        values.insert(Key::Member(g.to_string()), Value::Flag(groups.contains(&g)));
    }
    values.insert(Key::Exe, Value::Text(exe.map(String::from)));
    values.insert(Key::Abi, Value::Abi(abi));
    values.insert(Key::Name, Value::Text(Some(name.to_string())));
    values.insert(
        Key::Prop("vendor".into()),
        Value::Prop(vendor.map(|v| PropValue::Text(v.to_string()))),
    );
    values.insert(Key::Remote, Value::Flag(false));
    World {
        values,
        constrained: BTreeSet::new(),
        class: class.to_string(),
    }
}

/// Every request the generated policies can speak of.
fn questions() -> Vec<Question> {
    let mut qs = vec![Question::Open { exclusive: false }, Question::Open { exclusive: true }];
    for m in METHODS {
        qs.push(Question::Method {
            name: m.into(),
            privilege: None,
        });
        qs.extend(PRIVILEGES.iter().map(|p| Question::Method {
            name: m.into(),
            privilege: Some(p.to_string()),
        }));
    }
    qs.extend(MEMORY.iter().map(|m| Question::Memory { name: m.to_string() }));
    qs
}

type WorldCase = ((u8, u8, u8, u8, u8, u8, u8, u8), u8);

fn world_case() -> impl Strategy<Value = WorldCase> {
    ((0u8..3, 0u8..5, 0u8..4, 0u8..8, 0u8..4, 0u8..3, 0u8..3, 0u8..4), 0u8..6)
}

/// A TLS client's certificate: SAN URIs, SAN DNS names, CN.
fn certificate(which: u8) -> Option<(&'static [&'static str], &'static [&'static str], Option<&'static str>)> {
    match which {
        1 => Some((&[SAN_URIS[0]], &[], Some(CNS[0]))),
        2 => Some((&[], &[SAN_DNS[0]], Some(CNS[1]))),
        3 => Some((&[SAN_URIS[1], "spiffe://test/c"], &[SAN_DNS[1]], None)),
        _ => None,
    }
}

fn build(case: WorldCase) -> World {
    let ((class, uid, gid, groups, exe, abi, name, vendor), remote) = case;
    let mut w = build_local((class, uid, gid, groups, exe, abi, name, vendor));
    if let Some((uris, dns, cn)) = certificate(remote) {
        w.values.insert(Key::Remote, Value::Flag(true));
        for u in SAN_URIS.iter().chain(uris) {
            w.values
                .insert(Key::SanUri(u.to_string()), Value::Flag(uris.contains(u)));
        }
        for d in SAN_DNS.iter().chain(dns) {
            w.values
                .insert(Key::SanDns(d.to_string()), Value::Flag(dns.contains(d)));
        }
        w.values.insert(Key::SubjectCn, Value::Text(cn.map(String::from)));
    }
    w
}

fn build_local(case: (u8, u8, u8, u8, u8, u8, u8, u8)) -> World {
    let (class, uid, gid, groups, exe, abi, name, vendor) = case;
    let groups = pick(&GROUPS, groups);
    world(
        ["TtyDevice", "BlockDevice", "OtherClass"][usize::from(class)],
        [0, 1000, 1001, 65534, 7][usize::from(uid)],
        [0, 100, 1000, 7][usize::from(gid)],
        &groups,
        [None, Some("/usr/bin/app"), Some("/usr/bin/other"), Some("/bin/x")][usize::from(exe)],
        [AbiId::X86_64, AbiId::I386, AbiId::Aarch64][usize::from(abi)],
        ["dev0", "dev1", "zz"][usize::from(name)],
        [None, Some("0403"), Some("04ff"), Some("1a86")][usize::from(vendor)],
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2_000, failure_persistence: None, ..ProptestConfig::default() })]

    /// The decision formula is the reference evaluator's `allowed`, world by world.
    #[test]
    fn formula_equals_the_reference_evaluator(policy in policy(), case in world_case()) {
        let w = build(case);
        for q in questions() {
            let f = policy.allowed_formula(&w.class, q.request());
            prop_assert_eq!(f.eval(&w), policy.decide(&w, q.request()).allowed, "{} in {:?}", q, case);
        }
    }

    /// Whatever some world is allowed, the solver finds a world for; whatever it finds, the
    /// evaluator allows.
    #[test]
    fn solver_is_complete_and_sound(policy in policy(), case in world_case()) {
        let w = build(case);
        for q in questions() {
            let found = solve(policy.allowed_formula(&w.class, q.request()), &w.class).unwrap();
            if policy.decide(&w, q.request()).allowed {
                prop_assert!(found.is_some(), "{} is allowed in {:?} but the solver found nothing", q, case);
            }
            if let Some(found) = found {
                prop_assert!(policy.decide(&found, q.request()).allowed, "witness {:?} for {} is refused", found, q);
            }
        }
    }

}

proptest! {
    // Two diffs per case: fewer cases.
    #![proptest_config(ProptestConfig { cases: 500, failure_persistence: None, ..ProptestConfig::default() })]

    /// A world two policies decide differently is reported (as some witness for its class and
    /// request); a policy never differs from itself.
    #[test]
    fn diff_finds_every_changed_decision(old in policy(), new in policy(), case in world_case()) {
        prop_assert!(diff(&old, &old, None).unwrap().is_empty());
        let changes = diff(&old, &new, None).unwrap();
        for c in &changes {
            prop_assert_ne!(old.decide(&c.world, c.question.request()).allowed, new.decide(&c.world, c.question.request()).allowed);
        }
        let w = build(case);
        for q in questions() {
            if old.decide(&w, q.request()).allowed != new.decide(&w, q.request()).allowed {
                // A class no rule names is analysed as the one unlisted class.
                let named = old.rules.iter().chain(&new.rules).any(|r| r.service.class.as_deref() == Some(w.class.as_str()));
                let class = if named { w.class.clone() } else { "UnlistedClass".into() };
                // Likewise a method no rule names (only `"*"` reaches it).
                let q = match q {
                    Question::Method { name, privilege } => {
                        let named = old.rules.iter().chain(&new.rules).any(|r| matches!(&r.methods, crate::model::Methods::Named(n) if n.contains(&name)));
                        Question::Method { name: if named { name } else { "unlisted_method".into() }, privilege }
                    }
                    other => other,
                };
                prop_assert!(
                    changes.iter().any(|c| c.question == q && c.world.class == class),
                    "{} in {:?} changes but the diff says nothing", q, case
                );
            }
        }
    }
}

const RESET_POLICY: &str = r#"
[[principal]]
name = "users"
groups = ["users"]

[[principal]]
name = "non-admins"
not = { groups = ["wheel"] }

[[rule]]
id = "users-reset"
effect = "allow"
principals = ["users"]
service = { class = "SampleDevice" }
methods = ["add", "reset"]

[[assert]]
id = "only-admins-reset"
description = "reset wipes the device"
principals = ["non-admins"]
service = { class = "SampleDevice" }
methods = ["reset"]
"#;

#[test]
fn failing_assertion_refuses_the_load_with_a_counterexample() {
    let errors = errors(RESET_POLICY);
    assert_eq!(errors.len(), 1, "{errors:#?}");
    let e = &errors[0];
    assert!(
        e.starts_with("p.toml:18:6: assert \"only-admins-reset\" fails (reset wipes the device)"),
        "{e}"
    );
    assert!(e.contains("rule \"users-reset\" allows method reset to"), "{e}");
    assert!(
        e.contains("groups=[users]") && e.contains("not in groups [wheel]"),
        "{e}"
    );
    assert!(e.contains("class=SampleDevice"), "{e}");
}

#[test]
fn assertion_holds_once_a_forbid_covers_it() {
    let fixed = RESET_POLICY.replace(
        "[[assert]]",
        "[[rule]]\nid = \"no-reset\"\neffect = \"forbid\"\nprincipals = [\"non-admins\"]\nmethods = [\"reset\"]\n\n[[assert]]",
    );
    assert_eq!(errors(&fixed), Vec::<String>::new());
}

#[test]
fn assertion_holds_when_the_allow_is_narrowed_to_admins() {
    let fixed = RESET_POLICY.replace(
        "groups = [\"users\"]",
        "groups = [\"users\"]\nnot = { groups = [\"staff\"] }",
    );
    // Still fails: a user outside wheel and staff may reset.
    assert_eq!(errors(&fixed).len(), 1);
    let fixed = RESET_POLICY.replace("groups = [\"users\"]", "groups = [\"wheel\"]");
    assert_eq!(errors(&fixed), Vec::<String>::new());
}

#[test]
fn assertion_without_principals_speaks_of_every_task() {
    let text = r#"
[[principal]]
name = "root"
uid = [0]

[[rule]]
id = "root-all"
effect = "allow"
principals = ["root"]
methods = ["*"]

[[assert]]
id = "nobody-maps-dma"
memory = ["dma"]
"#;
    // The rule grants methods, not memory: the assertion holds.
    assert_eq!(errors(text), Vec::<String>::new());
    let text = text.replace("methods = [\"*\"]", "methods = [\"*\"]\nmemory = [\"dma\"]");
    let errors = errors(&text);
    assert_eq!(errors.len(), 1);
    assert!(errors[0].contains("allows map memory dma to uid=0"), "{}", errors[0]);
}

#[test]
fn assertion_on_a_privilege_uses_the_catalog_to_find_methods() {
    let text = r#"
[[principal]]
name = "anyone"

[[rule]]
id = "everything"
effect = "allow"
principals = ["anyone"]
methods = ["*"]
privileges = ["sample.admin"]

[[assert]]
id = "no-admin"
privileges = ["sample.admin"]
"#;
    let mut catalog = Catalog::default();
    catalog.add(
        "SampleDevice",
        ClassNames {
            methods: ["add", "reset"].map(String::from).into(),
            privileges: ["sample.admin"].map(String::from).into(),
            method_privileges: [("reset".to_string(), "sample.admin".to_string())].into(),
            ..ClassNames::default()
        },
    );
    let err = Policy::parse_checked(&[Source { origin: "p.toml", text }], Some(&catalog)).unwrap_err();
    let e = err.errors()[0].to_string();
    assert!(e.contains("method reset (privilege sample.admin)"), "{e}");
    // Without the privilege, reset is refused: the assertion holds.
    let text = text.replace("privileges = [\"sample.admin\"]\n\n", "\n");
    assert!(
        Policy::parse_checked(
            &[Source {
                origin: "p.toml",
                text: &text
            }],
            Some(&catalog)
        )
        .is_ok()
    );
}

#[test]
fn assertion_names_are_checked_like_rules() {
    let errors = errors(&RESET_POLICY.replace("principals = [\"non-admins\"]", "principals = [\"non-admin\"]"));
    assert!(
        errors.iter().any(
            |e| e.contains("assert \"only-admins-reset\" names unknown principal \"non-admin\"")
                && e.contains("did you mean \"non-admins\"")
        ),
        "{errors:#?}"
    );
    let errors = errors_dup();
    assert!(errors.iter().any(|e| e.contains("duplicate assert id")), "{errors:#?}");
}

fn errors_dup() -> Vec<String> {
    errors(&format!(
        "{RESET_POLICY}\n[[assert]]\nid = \"only-admins-reset\"\nmethods = [\"add\"]\nprincipals = [\"non-admins\"]\n"
    ))
}

#[test]
fn counterexamples_use_prefixes_and_cgroups_exactly() {
    let text = r#"
[[principal]]
name = "modem"
cgroup = ["/system.slice/modem.service"]

[[principal]]
name = "outside-system"
not = { cgroup = ["/system.slice"] }

[[rule]]
id = "ftdi"
effect = "allow"
principals = ["modem"]
service = { properties = { serial = { prefix = "FT" } } }

[[rule]]
id = "not-ft1"
effect = "forbid"
principals = ["modem"]
service = { properties = { serial = { prefix = "FT1" } } }

[[assert]]
id = "only-system-services"
principals = ["outside-system"]

[[assert]]
id = "no-ft1"
service = { properties = { serial = { prefix = "FT1" } } }

[[assert]]
id = "no-ft"
service = { properties = { serial = { prefix = "FT" } } }
"#;
    let errors = errors(text);
    // A task in /system.slice/modem.service is inside /system.slice: the first holds. FT1… is
    // forbidden: the second holds. FT but not FT1 is allowed: the third fails.
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert!(errors[0].contains("assert \"no-ft\" fails"), "{}", errors[0]);
    assert!(
        errors[0].contains("cgroup=/system.slice/modem.service"),
        "{}",
        errors[0]
    );
    assert!(errors[0].contains("serial=\"FT"), "{}", errors[0]);
    assert!(!errors[0].contains("serial=\"FT1"), "{}", errors[0]);
}

#[test]
fn diff_reports_gained_and_lost_requests_with_the_deciding_rules() {
    let old = parse(&RESET_POLICY.replace(
        "[[assert]]\nid = \"only-admins-reset\"\ndescription = \"reset wipes the device\"\nprincipals = [\"non-admins\"]\nservice = { class = \"SampleDevice\" }\nmethods = [\"reset\"]\n",
        "",
    ))
    .unwrap();
    let new_text = r#"
[[principal]]
name = "users"
groups = ["users"]

[[principal]]
name = "admins"
groups = ["wheel"]

[[rule]]
id = "users-add"
effect = "allow"
principals = ["users"]
service = { class = "SampleDevice" }
methods = ["add"]

[[rule]]
id = "admins-reset"
effect = "allow"
principals = ["admins"]
service = { class = "SampleDevice" }
methods = ["reset"]
"#;
    let new = parse(new_text).unwrap();
    let changes = diff(&old, &new, None).unwrap();
    let lines: Vec<String> = changes
        .iter()
        .map(|c| {
            format!(
                "{} {} {} -> {}",
                c.question,
                c.world.describe().0,
                c.old.rule,
                c.new.rule
            )
        })
        .collect();
    // Users lose reset; admins gain reset (and, as admitted users, open).
    assert!(
        lines.iter().any(|l| l.starts_with("method reset")
            && l.contains("users-reset -> default deny")
            && l.contains("groups=[users]")),
        "{lines:#?}"
    );
    assert!(
        lines.iter().any(|l| l.starts_with("method reset")
            && l.contains("default deny -> admins-reset")
            && l.contains("wheel")),
        "{lines:#?}"
    );
    assert!(
        lines
            .iter()
            .all(|l| !l.starts_with("method add") || l.contains("wheel")),
        "{lines:#?}"
    );
}
