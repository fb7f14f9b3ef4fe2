//! The same 10,000-rule policy in Cedar (`cedar-policy`, the engine a security team might pick
//! instead), the same decisions, in the same run. Built only with the `peers` feature.

use std::{hint::black_box, str::FromStr, time::Instant};

use cedar_policy::{Authorizer, Context, Decision, Entities, EntityUid, PolicySet, Request, RestrictedExpression};
use portcullis_policy::{MethodRef, ParamAt, ParamRef, Policy, ServiceView, Task};
use portcullis_proto::{layout::AbiId, property::Properties};

use crate::policy::{A_MAX, median};

/// `policy::policy_text` in Cedar: rule r's principal is uid `1000 + (r mod principals) mod 50`,
/// its class `SampleDevice` for one rule in ten, forbid as `policy::is_forbid` says; allow rules
/// bound `add`'s `a`.
fn cedar_text(rules: usize) -> String {
    let principals = rules / 10;
    let mut text = String::with_capacity(rules * 200);
    for r in 0..rules {
        let uid = 1000 + (r % principals) % 50;
        let class = if r % 10 == 0 { "SampleDevice" } else { "OtherDevice" };
        let scope =
            format!("principal == User::\"{uid}\", action in [Action::\"add\", Action::\"echo\"], resource is {class}");
        if crate::policy::is_forbid(r, rules) {
            text.push_str(&format!("@id(\"r{r}\")\nforbid({scope});\n"));
        } else {
            text.push_str(&format!(
                "@id(\"r{r}\")\npermit({scope}) when {{ action != Action::\"add\" || context.a <= {A_MAX} }};\n"
            ));
        }
    }
    text
}

fn uid(text: &str) -> EntityUid {
    EntityUid::from_str(text).unwrap()
}

fn cedar_request(user: u32, method: &str, a: Option<u64>) -> Request {
    let context = match a {
        Some(a) => Context::from_pairs([(
            "a".to_string(),
            RestrictedExpression::new_long(i64::try_from(a).unwrap()),
        )])
        .unwrap(),
        None => Context::empty(),
    };
    Request::new(
        uid(&format!("User::\"{user}\"")),
        uid(&format!("Action::\"{method}\"")),
        uid("SampleDevice::\"sample0\""),
        context,
        None,
    )
    .unwrap()
}

/// Our figures from the same run: load (ms), admission (ms), per-call check (ns).
#[derive(Clone, Copy)]
pub(crate) struct Ours {
    pub(crate) compile_ms: f64,
    pub(crate) admission_ms: f64,
    pub(crate) per_call_ns: f64,
}

pub(crate) fn run(quick: bool, ours: &Policy, figures: &Ours) {
    let Ours {
        compile_ms: ours_compile_ms,
        admission_ms: ours_admission_ms,
        per_call_ns,
    } = *figures;
    let rules = ours.rule_count();
    let text = cedar_text(rules);
    let runs = if quick { 3 } else { 7 };
    let compile: Vec<f64> = (0..runs)
        .map(|_| {
            let start = Instant::now();
            black_box(PolicySet::from_str(&text).unwrap());
            start.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    let set = PolicySet::from_str(&text).unwrap();
    let entities = Entities::empty();
    let authorizer = Authorizer::new();

    // Same decisions: every uid the policy speaks of, both methods, arguments on both sides of
    // the bound.
    let props = Properties::new();
    let service = ServiceView {
        name: "sample0",
        class: "SampleDevice",
        properties: &props,
    };
    let params = [ParamRef {
        name: "a",
        at: ParamAt::Scalar(0),
    }];
    let methods = [
        MethodRef {
            name: "add",
            privilege: None,
            params: &params,
        },
        MethodRef {
            name: "echo",
            privilege: None,
            params: &[],
        },
    ];
    let groups: Vec<String> = Vec::new();
    let (mut compared, mut allowed) = (0, 0);
    for user in 995..1055u32 {
        let task = Task::new(user, user, &groups, AbiId::X86_64);
        let grant = ours.admit(&task, &service, false, &methods, &[]).ok();
        for (index, method) in ["add", "echo"].into_iter().enumerate() {
            for a in [0, 5, A_MAX, A_MAX + 1, u64::from(u32::MAX)] {
                let ours_allows = grant
                    .as_ref()
                    .is_some_and(|g| g.check(index).is_ok() && g.check_args(index, &[a, 0], &[]).is_ok());
                let arg = (method == "add").then_some(a);
                let theirs = authorizer.is_authorized(&cedar_request(user, method, arg), &set, &entities);
                assert_eq!(
                    ours_allows,
                    theirs.decision() == Decision::Allow,
                    "uid {user} {method} a={a}: the two engines disagree"
                );
                compared += 1;
                allowed += usize::from(ours_allows);
            }
        }
    }

    // One decision from scratch, as Cedar makes every one: uid 1000 calls add(5).
    let request = cedar_request(1000, "add", Some(5));
    let iters = if quick { 20 } else { 100 };
    let per_request: Vec<f64> = (0..runs)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..iters {
                black_box(authorizer.is_authorized(black_box(&request), &set, &entities));
            }
            start.elapsed().as_secs_f64() * 1e3 / f64::from(iters)
        })
        .collect();
    let (cedar_compile, cedar_request_ms) = (median(compile), median(per_request));
    println!("### The same policy in Cedar (cedar-policy 4)\n");
    println!("{compared} requests compared ({allowed} allowed): identical decisions. Median of {runs} runs.\n");
    println!("| what | Portcullis | Cedar | Cedar ÷ Portcullis |");
    println!("|---|---|---|---|");
    println!(
        "| load {rules} rules (parse + validate) | {ours_compile_ms:.1} ms | {cedar_compile:.1} ms | {:.2}× |",
        cedar_compile / ours_compile_ms
    );
    println!(
        "| one decision from scratch (ours: admission, compiling the grant) | {ours_admission_ms:.3} ms | {cedar_request_ms:.3} ms | {:.1}× |",
        cedar_request_ms / ours_admission_ms
    );
    println!(
        "| a call's decision (ours: the compiled grant; Cedar: every policy, as above) | {per_call_ns:.1} ns | {:.0} ns | {:.0}× |",
        cedar_request_ms * 1e6,
        cedar_request_ms * 1e6 / per_call_ns
    );
    println!();
}
