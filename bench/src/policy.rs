//! Policy at scale: parsing and compiling a 10,000-rule policy, admission (grant compilation)
//! under it, and the per-call grant check — which must not grow with the number of rules.

use std::{hint::black_box, time::Instant};

use portcullis_policy::{MethodRef, ParamAt, ParamRef, Policy, ServiceView, Source, Task};
use portcullis_proto::{layout::AbiId, property::Properties};

/// `rules` rules over `rules / 10` principals: most for other uids and classes, so admission
/// has to look through all of them; one in ten applies to the benchmark's task. Every constraint
/// has the same bound, so that "the granting rule's constraint" (ours) and "some permit's
/// condition" (Cedar's) mean the same thing.
pub(crate) fn policy_text(rules: usize) -> String {
    let mut text = String::new();
    for p in 0..rules / 10 {
        text.push_str(&format!(
            "[[principal]]\nname = \"p{p}\"\nuid = [{}]\n\n",
            1000 + p % 50
        ));
    }
    for r in 0..rules {
        let class = if r % 10 == 0 { "SampleDevice" } else { "OtherDevice" };
        text.push_str(&format!(
            "[[rule]]\nid = \"r{r}\"\neffect = \"{}\"\nprincipals = [\"p{}\"]\nservice = {{ class = \"{class}\" }}\nmethods = [\"add\", \"echo\"]\nargs.add.a = {{ max = {A_MAX} }}\n\n",
            if is_forbid(r, rules) { "forbid" } else { "allow" },
            r % (rules / 10),
        ));
        if is_forbid(r, rules) {
            // Forbid rules take no argument constraints.
            let cut = text.rfind("args.add.a").unwrap_or(text.len());
            text.truncate(cut);
            text.push('\n');
        }
    }
    text
}

/// One rule in 97 is a forbid, except for the benchmark's task (uid 1000): its calls are allowed,
/// so the per-call check measured is the whole one (decision and argument constraints).
pub(crate) fn is_forbid(r: usize, rules: usize) -> bool {
    r % 97 == 5 && !(r % (rules / 10)).is_multiple_of(50)
}

/// The bound of every rule's constraint on `add`'s `a`.
pub(crate) const A_MAX: u64 = 1_000_000;

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub(crate) fn run(quick: bool) {
    let rules = 10_000;
    let text = policy_text(rules);
    let runs = if quick { 3 } else { 7 };
    let compile: Vec<f64> = (0..runs)
        .map(|_| {
            let start = Instant::now();
            black_box(
                Policy::parse(&[Source {
                    origin: "bench",
                    text: &text,
                }])
                .unwrap(),
            );
            start.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    let policy = Policy::parse(&[Source {
        origin: "bench",
        text: &text,
    }])
    .unwrap();
    assert_eq!(policy.rule_count(), rules);

    let groups: Vec<String> = vec![];
    let task = Task::new(1000, 1000, &groups, AbiId::X86_64);
    let props = Properties::new();
    let service = ServiceView {
        name: "sample0",
        class: "SampleDevice",
        properties: &props,
    };
    let params = [
        ParamRef {
            name: "a",
            at: ParamAt::Scalar(0),
        },
        ParamRef {
            name: "b",
            at: ParamAt::Scalar(1),
        },
    ];
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
    let admissions: Vec<f64> = (0..runs)
        .map(|_| {
            let start = Instant::now();
            black_box(policy.admit(&task, &service, false, &methods, &[]).unwrap());
            start.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    let grant = policy.admit(&task, &service, false, &methods, &[]).unwrap();

    // The per-call check: the grant's method decision and argument constraints, as the session
    // makes it on every call.
    let iters = if quick { 1_000_000 } else { 10_000_000 };
    let per_call: Vec<f64> = (0..runs)
        .map(|_| {
            let start = Instant::now();
            let mut allowed = 0u64;
            for n in 0..iters {
                let scalars = [black_box(n as u64 % 1000), 1];
                if grant.check(black_box(0)).is_ok() && grant.check_args(0, &scalars, &[]).is_ok() {
                    allowed += 1;
                }
            }
            assert_eq!(
                allowed,
                u64::try_from(iters).unwrap(),
                "the benchmark's task must be allowed"
            );
            black_box(allowed);
            start.elapsed().as_secs_f64() * 1e9 / f64::from(iters)
        })
        .collect();

    println!("### Policy with {rules} rules\n");
    println!(
        "median of {runs} runs; the per-call check is {iters} checks (method decision + argument constraints) per run\n"
    );
    println!("| what | median | target |");
    println!("|---|---|---|");
    let (compile, admissions) = (median(compile), median(admissions));
    println!("| parse + validate 10,000 rules | {compile:.1} ms | ≤ 200 ms |");
    println!("| admission: compile one grant (scans every rule) | {admissions:.2} ms | — |");
    let per_call = median(per_call);
    println!("| per-call grant check | {per_call:.1} ns | ≤ 50 ns |");
    println!();
    diff(quick);
    #[cfg(feature = "peers")]
    crate::cedar::run(
        quick,
        &policy,
        &crate::cedar::Ours {
            compile_ms: compile,
            admission_ms: admissions,
            per_call_ns: per_call,
        },
    );
    #[cfg(not(feature = "peers"))]
    println!("(cedar-policy comparison skipped: built without the `peers` feature; `cargo xtask bench` enables it)\n");
}

/// The generated policy with a reviewer's worth of edits: one rule loses a method, one goes to
/// audit mode, one constraint is loosened, one rate is set.
pub(crate) fn edited(text: &str, rules: usize) -> String {
    let mut out = String::with_capacity(text.len() + 64);
    for block in text.split_inclusive("\n\n") {
        let block = match block {
            b if b.starts_with("[[rule]]\nid = \"r10\"\n") => {
                b.replace("methods = [\"add\", \"echo\"]", "methods = [\"add\"]")
            }
            b if b.starts_with("[[rule]]\nid = \"r20\"\n") => {
                b.replace("effect = \"allow\"\n", "effect = \"allow\"\nmode = \"audit\"\n")
            }
            b if b.starts_with("[[rule]]\nid = \"r30\"\n") => {
                b.replace(&format!("max = {A_MAX}"), &format!("max = {}", A_MAX * 2))
            }
            b if b.starts_with("[[rule]]\nid = \"r40\"\n") => {
                b.replace("effect = \"allow\"\n", "effect = \"allow\"\nrate = \"100/s\"\n")
            }
            b => b.to_string(),
        };
        out.push_str(&block);
    }
    assert_ne!(out.len(), text.len(), "the edits apply to {rules} rules");
    out
}

/// `policy diff` of the generated policy against itself (identical: short-circuits) and
/// against an edited copy, at 2,000 and 10,000 rules.
fn diff(quick: bool) {
    println!("### policy diff\n");
    println!("| rules | identical | four edits | target |");
    println!("|---|---|---|---|");
    for rules in [2_000, 10_000] {
        let text = policy_text(rules);
        let old = Policy::parse(&[Source {
            origin: "old.toml",
            text: &text,
        }])
        .unwrap();
        let new_text = edited(&text, rules);
        let new = Policy::parse(&[Source {
            origin: "new.toml",
            text: &new_text,
        }])
        .unwrap();
        let runs = if quick { 1 } else { 3 };
        let time = |a: &Policy, b: &Policy| {
            median(
                (0..runs)
                    .map(|_| {
                        let start = Instant::now();
                        black_box(portcullis_policy::diff(a, b, None).unwrap());
                        start.elapsed().as_secs_f64()
                    })
                    .collect(),
            )
        };
        let same = time(&old, &old);
        let edits = time(&old, &new);
        let target = if rules == 10_000 { "≤ 5 s" } else { "—" };
        println!("| {rules} | {same:.3} s | {edits:.3} s | {target} |");
    }
    println!();
}
