//! Semantic lints: what a policy may legally say but its author probably did not mean. Each is a
//! warning located at the rule it concerns; `policy check --deny-warnings` makes them fail CI.

use std::collections::BTreeSet;

use crate::{
    ServiceView, SourceError,
    analysis::solve,
    model::{Effect, Methods, Policy, Rule},
};

/// A warning at `rule`.
fn at(rule: &Rule, message: String) -> SourceError {
    rule.at.error(format!("warning: {message}"))
}

/// The rule's principals as a set of indices.
fn principals(rule: &Rule) -> BTreeSet<usize> {
    rule.principals.iter().copied().collect()
}

/// Whether `a` grants (or forbids) nothing that `b` does not, to the same principals on the
/// same services, and adds nothing of its own (constraints, a rate).
fn covered_by(a: &Rule, b: &Rule) -> bool {
    let subset = |x: &[String], y: &[String]| x.iter().all(|v| y.contains(v));
    let methods = match (&a.methods, &b.methods) {
        (_, Methods::All) => true,
        (Methods::All, Methods::Named(_)) => false,
        (Methods::Named(x), Methods::Named(y)) => subset(x, y),
    };
    let open = match a.effect {
        // An allow rule's open permits up to its level; a forbid's refuses from it.
        Effect::Allow => a.open <= b.open,
        Effect::Forbid => a.open.is_none() || b.open.is_some_and(|bo| a.open >= Some(bo)),
    };
    a.effect == b.effect
        && principals(a) == principals(b)
        && a.service == b.service
        && a.audit == b.audit
        && methods
        && open
        && subset(&a.privileges, &b.privileges)
        && subset(&a.memory, &b.memory)
        && a.args.is_empty()
        && a.rate.is_none()
        && b.args.iter().all(|arg| !a.methods.contains(&arg.method))
}

/// Whether two rules say exactly the same (ids and places aside).
fn identical(a: &Rule, b: &Rule) -> bool {
    let sorted = |v: &[String]| v.iter().cloned().collect::<BTreeSet<_>>();
    let methods = |m: &Methods| match m {
        Methods::All => None,
        Methods::Named(names) => Some(sorted(names)),
    };
    a.effect == b.effect
        && principals(a) == principals(b)
        && a.service == b.service
        && methods(&a.methods) == methods(&b.methods)
        && a.open == b.open
        && sorted(&a.privileges) == sorted(&b.privileges)
        && sorted(&a.memory) == sorted(&b.memory)
        && a.args == b.args
        && a.rate == b.rate
        && a.audit == b.audit
}

impl Policy {
    /// Every rule-level lint, for `policy check` (the principal-level ones are found while
    /// parsing, in [`Policy::warnings`]). Not run when the broker loads a policy: it is tooling,
    /// and it searches.
    pub fn lint(&self) -> Vec<SourceError> {
        let mut out = Vec::new();
        if self.audit {
            out.push(SourceError {
                origin: self.rules.first().map_or_else(String::new, |r| r.at.origin.to_string()),
                line: 0,
                col: 0,
                message: "warning: the whole policy is in audit mode (`mode = \"audit\"` at the top of a file): it refuses nothing, only logs what it would refuse".into(),
            });
        }
        for rule in &self.rules {
            if rule.service.class.is_none() && rule.service.name.is_none() && rule.service.properties.is_empty() {
                out.push(at(
                    rule,
                    format!(
                        "rule {:?} names no service (or `service = {{}}`): it applies to every class of device",
                        rule.id
                    ),
                ));
            }
            if rule.forbids_service() {
                out.push(at(
                    rule,
                    format!(
                        "rule {:?} forbids the whole service — it names no method, open, privilege or memory type — to every task its principals match, root included",
                        rule.id
                    ),
                ));
            }
        }
        // Identical and shadowed rules (the later by id is reported). Only rules with the same
        // effect, principals and services can be either: compared within those groups, so the
        // lint stays linear in the policy's size however many rules it has.
        let mut groups: std::collections::HashMap<String, Vec<&Rule>> = std::collections::HashMap::new();
        for rule in &self.rules {
            let key = format!("{:?}|{:?}|{:?}", rule.effect, principals(rule), rule.service);
            groups.entry(key).or_default().push(rule);
        }
        let mut grouped: Vec<&Vec<&Rule>> = groups.values().collect();
        grouped.sort_by_key(|g| g.first().map(|r| r.id.as_str()));
        for group in grouped {
            for (i, a) in group.iter().enumerate() {
                for (j, b) in group.iter().enumerate() {
                    if i == j {
                        continue;
                    }
                    if identical(a, b) {
                        if i > j {
                            out.push(at(
                                a,
                                format!("rule {:?} is identical to rule {:?} ({})", a.id, b.id, b.at.place()),
                            ));
                        }
                    } else if covered_by(a, b) {
                        out.push(at(
                            a,
                            format!(
                                "rule {:?} is shadowed by rule {:?} ({}): that rule {} everything it does, to the same principals and services",
                                a.id,
                                b.id,
                                b.at.place(),
                                if a.effect == Effect::Allow { "grants" } else { "forbids" }
                            ),
                        ));
                    }
                }
            }
        }
        out.extend(self.bypassed_constraints());
        out
    }

    /// Allow rules whose argument constraints on a method another allow rule makes moot: that
    /// rule grants the method without constraints to a task both rules can match, on a service
    /// both can match — and allow rules are a union.
    fn bypassed_constraints(&self) -> Vec<SourceError> {
        // The allow rules granting each method without constraining it (`"*"` rules apart).
        let unconstrained = |r: &Rule, method: &str| !r.args.iter().any(|arg| arg.method == method);
        let mut by_method: std::collections::HashMap<&str, Vec<&Rule>> = std::collections::HashMap::new();
        let mut every_method: Vec<&Rule> = Vec::new();
        for r in self.rules.iter().filter(|r| r.effect == Effect::Allow) {
            match &r.methods {
                Methods::All => every_method.push(r),
                Methods::Named(names) => {
                    for m in names.iter().filter(|m| unconstrained(r, m)) {
                        by_method.entry(m.as_str()).or_default().push(r);
                    }
                }
            }
        }
        let mut out = Vec::new();
        for a in self.rules.iter().filter(|r| r.effect == Effect::Allow) {
            let constrained: BTreeSet<&str> = a.args.iter().map(|arg| arg.method.as_str()).collect();
            for method in constrained {
                // The other allow rules granting the method unconstrained, on a class `a` can
                // share; one search over all of them, then the witness says which one.
                let wider: Vec<&Rule> = by_method
                    .get(method)
                    .into_iter()
                    .flatten()
                    .chain(every_method.iter().filter(|b| unconstrained(b, method)))
                    .copied()
                    .filter(|b| {
                        b.id != a.id
                            && (a.service.class.is_none()
                                || b.service.class.is_none()
                                || a.service.class == b.service.class)
                    })
                    .collect();
                if let Some(b) = self.overlapping(a, &wider) {
                    out.push(at(
                        a,
                        format!(
                            "rule {:?}'s constraints on {method} are bypassed: rule {:?} ({}) also grants {method}, without constraints, to tasks and services both rules match (allow rules are a union)",
                            a.id,
                            b.id,
                            b.at.place()
                        ),
                    ));
                }
            }
        }
        out
    }

    /// The first of `others` (by id) that some task and service match together with `a`.
    fn overlapping<'r>(&self, a: &Rule, others: &[&'r Rule]) -> Option<&'r Rule> {
        if others.is_empty() {
            return None;
        }
        let class = a
            .service
            .class
            .clone()
            .or_else(|| others.iter().find_map(|b| b.service.class.clone()))
            .unwrap_or_else(|| "AnyClass".into());
        let any = crate::analysis::Formula::or(others.iter().map(|b| self.applies_formula(b, &class)).collect());
        let both = crate::analysis::Formula::and(vec![self.applies_formula(a, &class), any]);
        match solve(both, &class) {
            Ok(Some(world)) => others
                .iter()
                .copied()
                .find(|b| self.applies_formula(b, &class).eval(&world))
                .or(others.first().copied()),
            Ok(None) => None,
            // A question too hard to answer is reported as an overlap: a warning too many,
            // never one too few.
            Err(_) => others.first().copied(),
        }
    }

    /// Assertions that no configured device can ever be in scope of (their class, name or
    /// properties match none of `devices`): they hold, but prove nothing.
    pub fn vacuous_assertions(&self, devices: &[ServiceView<'_>]) -> Vec<SourceError> {
        self.asserts
            .iter()
            .filter(|a| !devices.iter().any(|d| a.scope.service.matches(d)))
            .map(|a| SourceError {
                origin: a.origin.clone(),
                line: a.line,
                col: a.col,
                message: format!(
                    "warning: assertion {:?} is vacuous: no configured device matches its service scope, so it holds without proving anything",
                    a.scope.id
                ),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use portcullis_proto::property::{PropValue, Properties};

    use crate::{Policy, ServiceView, Source};

    fn warnings(text: &str) -> Vec<String> {
        let policy = Policy::parse(&[Source { origin: "p.toml", text }]).unwrap();
        policy
            .warnings()
            .iter()
            .chain(&policy.lint())
            .map(ToString::to_string)
            .collect()
    }

    fn has(found: &[String], place: &str, says: &str) {
        assert!(
            found.iter().any(|w| w.starts_with(place) && w.contains(says)),
            "{place} {says}: {found:#?}"
        );
    }

    const HEAD: &str =
        "[[principal]]\nname = \"users\"\nuid = [1000]\n\n[[principal]]\nname = \"admins\"\nuid = [0]\n\n";

    fn rule(id: &str, body: &str) -> String {
        format!("[[rule]]\nid = \"{id}\"\nprincipals = [\"users\"]\n{body}\n")
    }

    #[test]
    fn each_semantic_lint_is_a_located_warning() {
        let sample = "service = { class = \"SampleDevice\" }\n";
        let text = [
            HEAD.to_string(),
            // 10: capped, bypassed by `open` (same principal and class).
            rule(
                "capped",
                &format!("effect = \"allow\"\n{sample}methods = [\"echo\"]\nargs.echo.len = {{ max = 512 }}"),
            ),
            rule(
                "open",
                &format!("effect = \"allow\"\n{sample}methods = [\"echo\", \"add\"]"),
            ),
            rule(
                "twin",
                &format!("effect = \"allow\"\n{sample}methods = [\"add\", \"echo\"]"),
            ),
            rule("narrow", &format!("effect = \"allow\"\n{sample}methods = [\"add\"]")),
            rule("everything", "effect = \"allow\"\nmethods = [\"get_info\"]"),
            rule("wall", &format!("effect = \"forbid\"\n{sample}")),
        ]
        .concat();
        let found = warnings(&text);
        has(
            &found,
            "p.toml:10:6:",
            "rule \"capped\"'s constraints on echo are bypassed: rule \"open\" (p.toml:",
        );
        has(&found, "p.toml:", "rule \"twin\" is identical to rule \"open\"");
        has(&found, "p.toml:", "rule \"narrow\" is shadowed by rule \"open\"");
        has(&found, "p.toml:", "rule \"everything\" names no service");
        has(&found, "p.toml:", "rule \"wall\" forbids the whole service");
        assert!(
            !found.iter().any(|w| w.contains("\"open\" is")),
            "the wider rule is not the one reported: {found:#?}"
        );
        // A different principal (uid 0 and uid 1000 never overlap): no bypass.
        let apart = [
            HEAD.to_string(),
            rule(
                "capped",
                &format!("effect = \"allow\"\n{sample}methods = [\"echo\"]\nargs.echo.len = {{ max = 512 }}"),
            ),
            rule("admin", &format!("effect = \"allow\"\n{sample}methods = [\"echo\"]"))
                .replace("[\"users\"]", "[\"admins\"]"),
        ]
        .concat();
        assert!(
            !warnings(&apart).iter().any(|w| w.contains("bypassed")),
            "{:#?}",
            warnings(&apart)
        );
    }

    #[test]
    fn principals_without_attributes_relative_exes_and_audit_mode_are_warned_about() {
        let text = "mode = \"audit\"\n\n[[principal]]\nname = \"apps\"\n\n[[principal]]\nname = \"everyone\"\n\n[[principal]]\nname = \"tool\"\nuid = [1000]\nexe = [\"minicom\"]\n\n[[rule]]\nid = \"r\"\neffect = \"allow\"\nprincipals = [\"apps\", \"everyone\", \"tool\"]\nservice = { class = \"SampleDevice\" }\nmethods = [\"add\"]\n";
        let found = warnings(text);
        has(
            &found,
            "p.toml:4:8:",
            "principal \"apps\" has no attributes, so it matches every task",
        );
        assert!(
            !found.iter().any(|w| w.contains("\"everyone\" has no attributes")),
            "named for what it is"
        );
        has(
            &found,
            "p.toml:10:8:",
            "exe \"minicom\" is not an absolute path, and never matches",
        );
        has(&found, "p.toml", "the whole policy is in audit mode");
    }

    #[test]
    fn duplicate_ids_point_at_the_first_and_single_brackets_get_a_hint() {
        let error = |text: &str| {
            Policy::parse(&[Source { origin: "p.toml", text }])
                .unwrap_err()
                .to_string()
        };
        let twice = format!(
            "{HEAD}{}{}",
            rule("r", "effect = \"allow\""),
            rule("r", "effect = \"allow\"")
        );
        let err = error(&twice);
        assert!(
            err.contains("duplicate rule id \"r\" (first defined at p.toml:10:6)"),
            "{err}"
        );
        let err = error(&format!(
            "{HEAD}[rule]\nid = \"r\"\neffect = \"allow\"\nprincipals = [\"users\"]\n"
        ));
        assert!(
            err.contains("hint: `[rule]` declares one table; each rule is `[[rule]]`"),
            "{err}"
        );
    }

    #[test]
    fn an_assertion_no_configured_device_can_be_in_scope_of_is_vacuous() {
        let text = format!(
            "{HEAD}[[assert]]\nid = \"no-tty-break\"\nservice = {{ class = \"TtyDevice\" }}\nprivileges = [\"tty.break\"]\n\n[[assert]]\nid = \"no-reset\"\nservice = {{ class = \"SampleDevice\" }}\nprivileges = [\"sample.admin\"]\n"
        );
        let policy = Policy::parse(&[Source {
            origin: "p.toml",
            text: &text,
        }])
        .unwrap();
        let props = Properties::from([("driver".to_string(), PropValue::Text("sample".into()))]);
        let devices = [ServiceView {
            name: "sample0",
            class: "SampleDevice",
            properties: &props,
        }];
        let found: Vec<String> = policy
            .vacuous_assertions(&devices)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(found.len(), 1, "{found:#?}");
        has(&found, "p.toml:10:6:", "assertion \"no-tty-break\" is vacuous");
    }
}
