//! `portcullis policy check | explain | test`: the security team's tools, offline.

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use portcullis_policy::{Policy, PolicyError, Request, ServiceView, TaskParts};
use portcullis_proto::{
    layout::AbiId,
    property::{PropValue, Properties},
};
use serde::Deserialize;

use portcullis_broker::{config, drivers};

#[derive(Debug, Subcommand)]
pub(crate) enum PolicyCommand {
    /// Parse a policy, check every name against the drivers' schemas; print every error.
    Check {
        /// Policy file, or directory of *.toml files.
        path: PathBuf,
        /// The broker's configuration: assertions that no configured device can be in scope of
        /// are reported as vacuous.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Fail (exit 1) on warnings too, for CI.
        #[arg(long)]
        deny_warnings: bool,
    },
    /// Explain the decision on one request: the deciding rule and every rule considered.
    Explain(ExplainArgs),
    /// Ask the running broker to reload its policy (root or the broker's user only). A policy
    /// that does not compile is refused, with every error, and the running one stays.
    Reload {
        /// Change nothing: check the policy as a reload would and list the live user clients
        /// whose grants it would change (or close).
        #[arg(long)]
        dry_run: bool,
    },
    /// The running broker's policy: revision, generation, mode, files, rules, last reload
    /// (root or the broker's user only).
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Requests whose decision changes between two policies, each with a task and service that
    /// shows it and the deciding rules before and after.
    Diff {
        /// The policy before the change (file or directory).
        old: PathBuf,
        /// The policy after the change.
        new: PathBuf,
        /// Exit with status 1 when anything changes (for CI gates).
        #[arg(long)]
        exit_code: bool,
    },
    /// Rewrite policy files in the canonical layout (comments kept; rule order kept).
    Fmt {
        /// Policy file, or directory of *.toml files.
        path: PathBuf,
        /// Change nothing; list the files that are not formatted and exit 1 if any.
        #[arg(long)]
        check: bool,
        /// Change nothing; print what formatting would change as a unified diff (exit 1 if
        /// anything would).
        #[arg(long, conflicts_with = "check")]
        diff: bool,
    },
    /// Print a JSON Schema of the policy language, for editors that check and complete TOML.
    Schema,
    /// Rules that would allow what a decision log shows refused (or would-be-refused in audit
    /// mode), narrowest first, as policy TOML to review — audit2allow for this broker.
    Suggest {
        /// The decision log (JSON lines).
        #[arg(long = "from")]
        from: PathBuf,
        /// The policy that made those decisions [default: the embedded default]: refusals its
        /// own rules decided are notes, and the suggestions are checked to load beside it.
        #[arg(long)]
        policy: Option<PathBuf>,
    },
    /// Which principals (and so which tasks) the policy lets reach a request, each with a task
    /// that shows it and the allowing rule.
    WhoCan(WhoCanArgs),
    /// Run test cases (TOML) against a policy; prints `N passed, N failed`.
    Test {
        /// The cases file.
        cases: PathBuf,
        /// Policy file or directory [default: the cases file's `policy`, else the embedded default].
        #[arg(long)]
        policy: Option<PathBuf>,
        /// Also list the rules no case exercised (decided no case).
        #[arg(long)]
        coverage: bool,
        /// Output: text, json, or junit (XML for CI test reports).
        #[arg(long, value_enum, default_value_t = TestFormat::Text)]
        format: TestFormat,
    },
}

#[derive(Debug, Args)]
pub(crate) struct WhoCanArgs {
    /// Policy file or directory [default: the embedded default policy].
    #[arg(long)]
    policy: Option<PathBuf>,
    /// The service: class=C, and optionally name=N.
    #[arg(long)]
    service: String,
    #[command(flatten)]
    request: RequestArgs,
}

/// One request: exactly one of a method call, an open, a memory mapping.
#[derive(Debug, Args)]
pub(crate) struct RequestArgs {
    /// A method call.
    #[arg(long, conflicts_with_all = ["open", "memory"])]
    method: Option<String>,
    /// An open: shared or exclusive.
    #[arg(long, conflicts_with = "memory")]
    open: Option<String>,
    /// Mapping a memory type.
    #[arg(long)]
    memory: Option<String>,
}

#[derive(Debug, Args)]
pub(crate) struct ExplainArgs {
    /// Policy file or directory [default: the embedded default policy].
    #[arg(long)]
    policy: Option<PathBuf>,
    /// The task: uid=N (required: root is uid=0, never implied), gid=N (default: the uid),
    /// groups=a:b, exe=PATH, exe_sha256=HEX, cgroup=PATH, lsm_label=LABEL, abi=NAME; or a TLS
    /// client: tls_san_uri=U, tls_san_dns=D, tls_subject_cn=CN.
    #[arg(long, default_value = "")]
    principal: String,
    /// The service: class=C,name=N and KEY=VALUE properties. A name alone is looked up in the
    /// broker's configuration (`--config`), which gives its class and properties.
    #[arg(long)]
    service: String,
    /// Broker configuration in which `--service name=N` is looked up [default: the embedded one].
    #[arg(long)]
    config: Option<PathBuf>,
    #[command(flatten)]
    request: RequestArgs,
    /// An argument of the call, NAME=VALUE (a scalar by name, or `len` for the struct
    /// length); repeat for each. Checked against the granting rule's argument constraints.
    #[arg(long = "arg", requires = "method")]
    args: Vec<String>,
    /// Print the decision and every rule considered as JSON.
    #[arg(long)]
    json: bool,
}

fn pairs(spec: &str) -> impl Iterator<Item = Result<(&str, &str), String>> {
    spec.split(',')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').ok_or_else(|| format!("{p:?} is not KEY=VALUE")))
}

/// The task of `--principal`, and what was taken without being said (a gid from the uid).
fn parse_task(spec: &str) -> Result<(TaskParts, Vec<String>), String> {
    let mut t = TaskParts {
        uid: 0,
        gid: 0,
        groups: Vec::new(),
        exe: None,
        abi: AbiId::native(),
        exe_sha256: None,
        cgroup: None,
        lsm_label: None,
        remote: None,
    };
    let (mut uid, mut gid) = (None, None);
    for pair in pairs(spec) {
        let (k, v) = pair?;
        let number = |v: &str| v.parse::<u32>().map_err(|_| format!("{k}={v}: not a number"));
        match k {
            "uid" => uid = Some(number(v)?),
            "gid" => gid = Some(number(v)?),
            "groups" => t
                .groups
                .extend(v.split(':').filter(|g| !g.is_empty()).map(String::from)),
            "exe" => t.exe = Some(v.to_string()),
            "exe_sha256" => t.exe_sha256 = Some(v.to_ascii_lowercase()),
            "cgroup" => t.cgroup = Some(v.to_string()),
            "lsm_label" => t.lsm_label = Some(v.to_string()),
            "abi" => t.abi = AbiId::by_name(v).ok_or_else(|| format!("unknown ABI {v:?}"))?,
            // A TCP client: what its certificate says.
            "tls_san_uri" | "tls_san_dns" | "tls_subject_cn" => {
                let (uris, dns, cn) = t.remote.get_or_insert_with(Default::default);
                match k {
                    "tls_san_uri" => uris.push(v.to_string()),
                    "tls_san_dns" => dns.push(v.to_string()),
                    _ => *cn = Some(v.to_string()),
                }
            }
            other => {
                return Err(format!(
                    "unknown principal attribute {other:?}{} (uid, gid, groups, exe, exe_sha256, cgroup, lsm_label, abi; tls_san_uri, tls_san_dns, tls_subject_cn for a TLS client)",
                    portcullis_policy::did_you_mean(
                        other,
                        "uid gid groups exe exe_sha256 cgroup lsm_label abi tls_san_uri tls_san_dns tls_subject_cn"
                            .split(' ')
                    )
                ));
            }
        }
    }
    let mut notes = Vec::new();
    if t.remote.is_none() {
        t.uid = uid.ok_or("--principal needs uid=N: the task's uid is never implied (root is uid=0)")?;
        t.gid = match gid {
            Some(gid) => gid,
            None => {
                notes.push(format!("gid not given: taken as {} (the uid)", t.uid));
                t.uid
            }
        };
    } else if uid.is_some() || gid.is_some() {
        return Err("a TLS client has no uid or gid: give its certificate's attributes only".into());
    }
    Ok((t, notes))
}

/// Refuses a class, method or memory type no driver has, suggesting the closest.
fn check_request_names(class: &str, method: Option<&str>, memory: Option<&str>) -> Result<(), String> {
    let families = drivers::families();
    let Some(family) = families.iter().find(|f| f.class == class) else {
        return Err(format!(
            "no driver has class {class:?}{} (classes: {})",
            portcullis_policy::did_you_mean(class, families.iter().map(|f| f.class)),
            families.iter().map(|f| f.class).collect::<Vec<_>>().join(", ")
        ));
    };
    let rows = family.methods().rows();
    if let Some(m) = method
        && !rows.iter().any(|r| r.name == m)
    {
        return Err(format!(
            "class {class} has no method {m:?}{}",
            portcullis_policy::did_you_mean(m, rows.iter().map(|r| r.name))
        ));
    }
    let types = family.memory_types();
    if let Some(m) = memory
        && !types.iter().any(|t| t.name == m)
    {
        return Err(format!(
            "class {class} has no memory type {m:?}{}",
            portcullis_policy::did_you_mean(m, types.iter().map(|t| t.name))
        ));
    }
    Ok(())
}

struct ServiceSpec {
    class: String,
    name: String,
    properties: Properties,
}

fn parse_service(spec: &str) -> Result<ServiceSpec, String> {
    let mut s = ServiceSpec {
        class: String::new(),
        name: String::new(),
        properties: Properties::new(),
    };
    for pair in pairs(spec) {
        let (k, v) = pair?;
        match k {
            "class" => s.class = v.to_string(),
            "name" => s.name = v.to_string(),
            key => {
                let value = v
                    .parse::<u64>()
                    .map_or_else(|_| PropValue::Text(v.to_string()), PropValue::Unsigned);
                s.properties.insert(key.to_string(), value);
            }
        }
    }
    Ok(s)
}

/// Fills in a service named without a class from the broker configuration: its driver's class
/// and its configured properties (those given on the command line win).
fn configured(service: &mut ServiceSpec, config: Option<&Path>) -> Result<(), String> {
    if service.name.is_empty() {
        return Err("--service needs class=C, or name=N of a configured device".into());
    }
    let devices = configured_devices(config)?;
    let (_, class, properties) = devices.iter().find(|(name, ..)| *name == service.name).ok_or_else(|| {
        let known: Vec<&str> = devices.iter().map(|(name, ..)| name.as_str()).collect();
        format!(
            "no device {:?} in the configuration (it has: {}); give its class with class=C",
            service.name,
            known.join(", ")
        )
    })?;
    service.class.clone_from(class);
    for (key, value) in properties {
        service.properties.entry(key.clone()).or_insert_with(|| value.clone());
    }
    Ok(())
}

/// The privilege a method of a class requires, from the drivers' tables.
pub(super) fn method_privilege(class: &str, method: &str) -> Option<&'static str> {
    drivers::families()
        .into_iter()
        .filter(|f| f.class == class)
        .find_map(|f| f.methods().by_name(method).and_then(|m| m.privilege))
}

fn load(path: Option<&Path>) -> Result<Policy, String> {
    config::load_policy(path).map_err(|e| e.to_string())
}

/// Runs a policy command. `explain` exits like `pkcheck`: 0 allowed, 1 denied, 2 a usage error;
/// the others 0 on success and 1 on failure.
pub(crate) fn run(command: PolicyCommand, run_dir: &super::RunDir) -> std::process::ExitCode {
    if let PolicyCommand::Explain(args) = command {
        return match explain(args) {
            Ok(true) => std::process::ExitCode::SUCCESS,
            Ok(false) => std::process::ExitCode::from(1),
            Err(message) => {
                eprintln!("portcullis: {message}");
                std::process::ExitCode::from(2)
            }
        };
    }
    super::finish(run_tool(command, run_dir))
}

fn run_tool(command: PolicyCommand, run_dir: &super::RunDir) -> Result<(), String> {
    match command {
        PolicyCommand::Check {
            path,
            config,
            deny_warnings,
        } => check(&path, config.as_deref(), deny_warnings),
        PolicyCommand::Explain(_) => Ok(()),
        PolicyCommand::WhoCan(args) => who_can(args),
        PolicyCommand::Suggest { from, policy } => suggest(&from, policy.as_deref()),
        PolicyCommand::Schema => serde_json::to_string_pretty(&super::policy_schema::schema())
            .map(|text| println!("{text}"))
            .map_err(|e| e.to_string()),
        PolicyCommand::Test {
            cases,
            policy,
            coverage,
            format,
        } => test(&cases, policy.as_deref(), coverage, format),
        PolicyCommand::Reload { dry_run } => reload(run_dir, dry_run),
        PolicyCommand::Status { json } => status(run_dir, json),
        PolicyCommand::Diff { old, new, exit_code } => diff(&old, &new, exit_code),
        PolicyCommand::Fmt { path, check, diff } => fmt(&path, check, diff),
    }
}

/// Runs one request to the running broker on a current-thread runtime.
fn with_broker<T>(
    run_dir: &super::RunDir,
    f: impl AsyncFnOnce(portcullis_client::Client) -> Result<T, String>,
) -> Result<T, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(async {
        let client = run_dir.connect().await.map_err(|e| e.to_string())?;
        f(client).await
    })
}

fn reload(run_dir: &super::RunDir, dry_run: bool) -> Result<(), String> {
    let refused = |e: portcullis_client::ClientError| match e {
        portcullis_client::ClientError::Rpc(status) => format!("reload refused: {}", status.message()),
        e => e.to_string(),
    };
    with_broker(run_dir, async |client| {
        if dry_run {
            let r = client.reload_policy_dry_run().await.map_err(refused)?;
            let revision = r.revision.get(..12).unwrap_or_default();
            for c in &r.would_change {
                println!(
                    "uid {} pid {} {} handle {}: {}",
                    c.uid, c.pid, c.service, c.handle, c.change
                );
            }
            println!(
                "dry run: the policy files hold revision {revision}; a reload would change {} live user client(s); nothing was changed",
                r.would_change.len()
            );
            return Ok(());
        }
        let (generation, rules) = client.reload_policy().await.map_err(refused)?;
        println!("policy reloaded: generation {generation}, {rules} rules");
        Ok(())
    })
}

fn status(run_dir: &super::RunDir, json: bool) -> Result<(), String> {
    let stats = with_broker(run_dir, async |client| {
        client.stats().await.map_err(|e| match e {
            portcullis_client::ClientError::Rpc(status) => status.message().to_string(),
            e => e.to_string(),
        })
    })?;
    let p = stats.policy.ok_or("the broker did not say what its policy is")?;
    if json {
        let last = p.last_reload.as_ref().map(|r| {
            serde_json::json!({ "time": r.time, "accepted": r.accepted, "revision": r.revision, "error": r.error, "generation": r.generation })
        });
        let out = serde_json::json!({ "revision": p.revision, "generation": p.generation, "mode": p.mode, "files": p.files, "rules": p.rules, "last_reload": last });
        println!("{out}");
        return Ok(());
    }
    println!("revision    {}", p.revision);
    println!("generation  {}", p.generation);
    println!("mode        {}", p.mode);
    println!("rules       {}", p.rules);
    match p.files.as_slice() {
        [] => println!("files       (the embedded default)"),
        files => println!("files       {}", files.join(", ")),
    }
    match &p.last_reload {
        None => println!("last reload (none)"),
        Some(r) if r.accepted => println!(
            "last reload accepted at {:.0}: generation {}, revision {}",
            r.time,
            r.generation,
            r.revision.get(..12).unwrap_or_default()
        ),
        Some(r) => println!("last reload refused at {:.0}: {}", r.time, r.error),
    }
    Ok(())
}

fn check(path: &Path, config: Option<&Path>, deny_warnings: bool) -> Result<(), String> {
    match config::load_policy(Some(path)) {
        Ok(policy) => {
            let mut warnings: Vec<String> = policy
                .warnings()
                .iter()
                .chain(&policy.lint())
                .map(ToString::to_string)
                .collect();
            warnings.extend(
                config::policy_trust_problems(path)
                    .into_iter()
                    .map(|p| format!("warning: a root broker refuses this policy: {p}")),
            );
            if let Some(config) = config {
                let devices = configured_devices(Some(config))?;
                let views: Vec<ServiceView<'_>> = devices
                    .iter()
                    .map(|(name, class, properties)| ServiceView {
                        name,
                        class,
                        properties,
                    })
                    .collect();
                warnings.extend(policy.vacuous_assertions(&views).iter().map(ToString::to_string));
            }
            for warning in &warnings {
                println!("{warning}");
            }
            println!(
                "{}: ok ({} rules, {} assertions hold; revision {}){}",
                path.display(),
                policy.rule_count(),
                policy.assertion_count(),
                policy.revision().get(..12).unwrap_or_default(),
                match warnings.len() {
                    0 => String::new(),
                    n => format!("; {n} warning(s)"),
                }
            );
            if deny_warnings && !warnings.is_empty() {
                return Err(format!("{} warning(s), and --deny-warnings", warnings.len()));
            }
            Ok(())
        }
        Err(config::ConfigError::Policy(PolicyError::Invalid(errors))) => {
            for e in &errors {
                println!("{e}");
            }
            Err(format!("{} error(s)", errors.len()))
        }
        Err(e) => Err(e.to_string()),
    }
}

/// The services a configuration publishes, as policy sees them: name, class, properties.
fn configured_devices(config: Option<&Path>) -> Result<Vec<(String, String, Properties)>, String> {
    let config = config::Config::load(config).map_err(|e| e.to_string())?;
    config
        .devices
        .iter()
        .map(|device| {
            let family = drivers::family(&device.driver)
                .ok_or_else(|| format!("device {:?}: unknown driver {:?}", device.name, device.driver))?;
            let mut properties = device.registry_properties().map_err(|e| e.to_string())?;
            properties
                .entry("driver".into())
                .or_insert_with(|| PropValue::Text(device.driver.clone()));
            Ok((device.name.clone(), family.class.to_string(), properties))
        })
        .collect()
}

fn diff(old: &Path, new: &Path, exit_code: bool) -> Result<(), String> {
    let (before, after) = (load(Some(old))?, load(Some(new))?);
    let catalog = drivers::catalog();
    let changes = portcullis_policy::diff(&before, &after, Some(&catalog)).map_err(|e| e.to_string())?;
    let decided = |d: &portcullis_policy::Decision| {
        if d.allowed {
            format!("allowed by {:?}", d.rule)
        } else if d.rule == portcullis_policy::DEFAULT_DENY {
            "default deny".to_string()
        } else {
            format!("denied by {:?}", d.rule)
        }
    };
    let gained = changes.iter().filter(|c| c.new.allowed).count();
    for c in &changes {
        let (task, service) = c.world.describe();
        let sign = if c.new.allowed { '+' } else { '-' };
        println!("{sign} {} on {service} to {task}", c.question);
        println!("    was {}; now {}", decided(&c.old), decided(&c.new));
    }
    let others = before.rule_changes(&after);
    for line in &others {
        println!("{line}");
    }
    println!(
        "{} change(s): {gained} newly allowed, {} no longer allowed{}",
        changes.len(),
        changes.len() - gained,
        match others.len() {
            0 => String::new(),
            n => format!("; {n} change(s) of mode, constraints, rates or assertions"),
        }
    );
    if exit_code && !(changes.is_empty() && others.is_empty()) {
        return Err("the policies differ".into());
    }
    Ok(())
}

fn fmt(path: &Path, check: bool, diff: bool) -> Result<(), String> {
    // Only a policy that loads is formatted: fmt never hides an error.
    load(Some(path))?;
    let files = config::policy_files(path).map_err(|e| e.to_string())?;
    let mut unformatted = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
        let formatted = portcullis_policy::format(&text).map_err(|e| format!("{}: {e}", file.display()))?;
        if formatted == text {
            continue;
        }
        if diff {
            let name = file.display().to_string();
            print!(
                "{}",
                similar::TextDiff::from_lines(&text, &formatted)
                    .unified_diff()
                    .context_radius(3)
                    .header(&name, &format!("{name} (formatted)"))
            );
        } else if check {
            println!("{}: not formatted", file.display());
        } else {
            std::fs::write(file, &formatted).map_err(|e| format!("{}: {e}", file.display()))?;
            println!("{}: formatted", file.display());
        }
        unformatted.push(file);
    }
    if (check || diff) && !unformatted.is_empty() {
        return Err(format!("{} file(s) not formatted", unformatted.len()));
    }
    Ok(())
}

/// The one request `--method`, `--open` or `--memory` names, on a class; a class, method or
/// memory type no driver has is refused with a suggestion.
fn request<'a>(
    class: &str,
    method: Option<&'a str>,
    open: Option<&str>,
    memory: Option<&'a str>,
) -> Result<Request<'a>, String> {
    check_request_names(class, method, memory)?;
    Ok(match (method, open, memory) {
        (Some(name), None, None) => Request::Method {
            name,
            privilege: method_privilege(class, name),
        },
        (None, Some(mode), None) => match mode {
            "shared" => Request::Open { exclusive: false },
            "exclusive" => Request::Open { exclusive: true },
            other => return Err(format!("open mode {other:?}: shared or exclusive")),
        },
        (None, None, Some(name)) => Request::Memory { name },
        _ => return Err("give exactly one of --method, --open, --memory".into()),
    })
}

/// Explains one request; `Ok(allowed)` (a refusal in audit mode goes through: allowed), or a
/// usage error.
fn explain(args: ExplainArgs) -> Result<bool, String> {
    let policy = load(args.policy.as_deref())?;
    let (task, notes) = parse_task(&args.principal)?;
    let mut service = parse_service(&args.service)?;
    if service.class.is_empty() {
        configured(&mut service, args.config.as_deref())?;
    }
    let view = ServiceView {
        name: &service.name,
        class: &service.class,
        properties: &service.properties,
    };
    let req = request(
        &service.class,
        args.request.method.as_deref(),
        args.request.open.as_deref(),
        args.request.memory.as_deref(),
    )?;
    let mut explanation = policy.explain(&task.task(), &view, req);
    let mut argument_line = None;
    if let (Some(method), false) = (args.request.method.as_deref(), args.args.is_empty()) {
        let (scalars, struct_in) = call_args(&service.class, method, &args.args)?;
        let admitted = with_method_ref(&service.class, method, |method_ref| {
            policy.admit(&task.task(), &view, false, std::slice::from_ref(method_ref), &[])
        });
        if let Ok(grant) = admitted
            && grant.check(0).is_ok()
        {
            match grant.check_args(0, &scalars, &struct_in) {
                Ok(rule) => {
                    argument_line = Some(format!("arguments: admitted by rule {rule:?}"));
                    explanation.decision.rule = rule.to_string();
                }
                Err(denial) => {
                    argument_line = Some(format!("arguments: {}", denial.reason));
                    explanation.decision = portcullis_policy::Decision {
                        allowed: false,
                        audit: denial.audit,
                        rule: denial.rule,
                    };
                }
            }
        }
    }
    let allowed = explanation.decision.allowed || explanation.decision.audit;
    if args.json {
        let d = &explanation.decision;
        let rules: Vec<serde_json::Value> = explanation
            .rules
            .iter()
            .map(|r| {
                serde_json::json!({
                    "id": r.id,
                    "effect": if r.effect == portcullis_policy::Effect::Allow { "allow" } else { "forbid" },
                    "principal": r.principal.as_ref().map_or_else(|why| serde_json::json!({ "matches": false, "why": why }), |p| serde_json::json!({ "matches": true, "principal": p })),
                    "service": r.service.as_ref().map_or_else(|why| serde_json::json!({ "matches": false, "why": why }), |()| serde_json::json!({ "matches": true })),
                    "says": r.says,
                    "decided": r.id == d.rule,
                })
            })
            .collect();
        let out = serde_json::json!({
            "decision": match (d.allowed, d.audit) { (true, _) => "allow", (false, true) => "would_deny", (false, false) => "deny" },
            "rule": d.rule,
            "arguments": argument_line,
            "notes": notes,
            "rules": rules,
        });
        println!("{}", serde_json::to_string_pretty(&out).map_err(|e| e.to_string())?);
        return Ok(allowed);
    }
    let text = explanation.to_string();
    let (first, rest) = text.split_once('\n').unwrap_or((&text, ""));
    println!("{first}");
    if let Some(line) = argument_line {
        println!("{line}");
    }
    for note in notes {
        println!("note: {note}");
    }
    print!("{rest}");
    Ok(allowed)
}

fn suggest(from: &Path, policy_path: Option<&Path>) -> Result<(), String> {
    let policy = load(policy_path)?;
    let (rules, notes) = super::policy_suggest::suggest(from, &policy)?;
    for note in &notes {
        println!("# note: {note}");
    }
    if rules.is_empty() {
        println!("# nothing to suggest: no refusal an allow rule would undo");
        return Ok(());
    }
    // The suggestions must load beside the policy: checked before they are shown.
    let base = match policy_path {
        Some(p) => config::policy_files(p)
            .map_err(|e| e.to_string())?
            .iter()
            .map(|f| std::fs::read_to_string(f).map_err(|e| format!("{}: {e}", f.display())))
            .collect::<Result<Vec<_>, _>>()?
            .join("\n"),
        None => config::DEFAULT_POLICY.to_string(),
    };
    let combined = format!("{base}\n{rules}");
    Policy::parse_checked(
        &[portcullis_policy::Source {
            origin: "policy + suggestions",
            text: &combined,
        }],
        Some(&drivers::catalog()),
    )
    .map_err(|e| format!("the suggestions do not load beside the policy (a bug): {e}"))?;
    print!("{rules}");
    Ok(())
}

fn who_can(args: WhoCanArgs) -> Result<(), String> {
    let policy = load(args.policy.as_deref())?;
    let service = parse_service(&args.service)?;
    if service.class.is_empty() {
        return Err("--service needs class=C".into());
    }
    let req = request(
        &service.class,
        args.request.method.as_deref(),
        args.request.open.as_deref(),
        args.request.memory.as_deref(),
    )?;
    let name = (!service.name.is_empty()).then_some(service.name.as_str());
    let reach = policy.who_can(&service.class, name, req).map_err(|e| e.to_string())?;
    let question = portcullis_policy::Question::of(req);
    for r in &reach {
        let (task, on) = r.world.describe();
        let decided = if r.decision.rule == r.via {
            String::new()
        } else {
            format!("; decided by {:?}", r.decision.rule)
        };
        println!("{} (rule {:?}): e.g. {task} on {on}{decided}", r.principal, r.via);
    }
    println!(
        "{} principal(s) can reach {question} on class={}",
        reach.len(),
        service.class
    );
    Ok(())
}

/// Runs `f` with a method of a class as policy sees it: its privilege and parameters, from the
/// drivers' tables.
fn with_method_ref<R>(class: &str, method: &str, f: impl FnOnce(&portcullis_policy::MethodRef<'_>) -> R) -> R {
    let params = method_params(class, method);
    let refs: Vec<portcullis_policy::ParamRef<'_>> = params
        .iter()
        .map(|(n, at)| portcullis_policy::ParamRef { name: n, at: *at })
        .collect();
    f(&portcullis_policy::MethodRef {
        name: method,
        privilege: method_privilege(class, method),
        params: &refs,
    })
}

/// The parameters of a method of a class, from the drivers' tables.
fn method_params(class: &str, method: &str) -> Vec<(String, portcullis_policy::ParamAt)> {
    drivers::families()
        .into_iter()
        .filter(|f| f.class == class)
        .find_map(|f| {
            let table = f.methods();
            let index = table.rows().iter().position(|r| r.name == method)?;
            Some(table.params(index).to_vec())
        })
        .unwrap_or_default()
}

/// Scalars and a struct of the given length from NAME=VALUE arguments.
fn call_args(class: &str, method: &str, given: &[String]) -> Result<(Vec<u64>, Vec<u8>), String> {
    use portcullis_policy::ParamAt;
    let params = method_params(class, method);
    let mut scalars = vec![0u64; params.iter().filter(|(_, at)| matches!(at, ParamAt::Scalar(_))).count()];
    let mut struct_in = Vec::new();
    for arg in given {
        let (name, value) = arg
            .split_once('=')
            .ok_or_else(|| format!("--arg {arg:?} is not NAME=VALUE"))?;
        let value: u64 = value
            .parse()
            .map_err(|_| format!("--arg {name}: {value:?} is not a number"))?;
        match params.iter().find(|(n, _)| n == name).map(|(_, at)| *at) {
            Some(ParamAt::Scalar(i)) => {
                if let Some(slot) = scalars.get_mut(i) {
                    *slot = value;
                }
            }
            Some(ParamAt::StructLen) => {
                let len = usize::try_from(value).map_err(|_| "len too large".to_string())?;
                if len > portcullis_proto::limits::MAX_STRUCT as usize {
                    return Err(format!("len {len} is larger than any struct a method takes"));
                }
                struct_in = vec![0; len];
            }
            Some(_) => {
                return Err(format!(
                    "--arg {name}: struct fields cannot be given on the command line"
                ));
            }
            None => return Err(format!("{method} of {class} has no parameter {name:?}")),
        }
    }
    Ok((scalars, struct_in))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CasesFile {
    policy: Option<PathBuf>,
    #[serde(rename = "case", default)]
    cases: Vec<Case>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    #[serde(default)]
    principal: PrincipalCase,
    service: ServiceCase,
    method: Option<String>,
    open: Option<String>,
    memory: Option<String>,
    expect: Expect,
    rule: Option<String>,
    /// The call's arguments by parameter name (`args = { len = 800 }`), checked against the
    /// argument constraints of the rules granting the method.
    #[serde(default)]
    args: std::collections::BTreeMap<String, u64>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PrincipalCase {
    /// Required for a local task: a case never means root by omission.
    uid: Option<u32>,
    /// Default: the uid.
    gid: Option<u32>,
    #[serde(default)]
    groups: Vec<String>,
    exe: Option<String>,
    abi: Option<String>,
    exe_sha256: Option<String>,
    cgroup: Option<String>,
    lsm_label: Option<String>,
    /// A TCP client's certificate SAN URIs, SAN DNS names and CN (any one makes it a TLS client).
    #[serde(default)]
    tls_san_uri: Vec<String>,
    #[serde(default)]
    tls_san_dns: Vec<String>,
    tls_subject_cn: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceCase {
    class: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    properties: toml::Table,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
enum Expect {
    Allow,
    Deny,
    /// Refused by a rule in audit mode: let through, logged as "would deny".
    WouldDeny,
}

/// `policy test`'s output forms.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum TestFormat {
    /// `FAIL name: why` lines and `N passed, N failed`.
    Text,
    /// One JSON object: every case, the totals, the rules not exercised.
    Json,
    /// A JUnit XML test suite, one test case per case.
    Junit,
}

/// One case's result: `Ok(deciding rule)` or `Err((failed, why))` — a failure (the decision
/// differs) or an error (the case is wrong: a misspelled name, no uid).
type CaseResult = Result<String, (bool, String)>;

fn test(cases_path: &Path, policy: Option<&Path>, coverage: bool, format: TestFormat) -> Result<(), String> {
    let text = std::fs::read_to_string(cases_path).map_err(|e| format!("{}: {e}", cases_path.display()))?;
    let file: CasesFile = toml::from_str(&text).map_err(|e| format!("{}: {e}", cases_path.display()))?;
    let from_file = file
        .policy
        .map(|p| cases_path.parent().unwrap_or(Path::new(".")).join(p));
    let policy = load(policy.or(from_file.as_deref()))?;
    let results: Vec<(&Case, CaseResult)> = file.cases.iter().map(|case| (case, run_case(&policy, case))).collect();
    let count = |pred: &dyn Fn(&CaseResult) -> bool| results.iter().filter(|(_, r)| pred(r)).count();
    let passed = count(&|r| r.is_ok());
    let failed = count(&|r| matches!(r, Err((true, _))));
    let errors = count(&|r| matches!(r, Err((false, _))));
    let decided: std::collections::BTreeSet<&str> = results
        .iter()
        .filter_map(|(_, r)| r.as_ref().ok())
        .map(String::as_str)
        .collect();
    let uncovered: Vec<&str> = policy.rule_ids().filter(|id| !decided.contains(id)).collect();
    match format {
        TestFormat::Text => {
            for (case, result) in &results {
                match result {
                    Err((true, why)) => println!("FAIL {}: {why}", case.name),
                    Err((false, why)) => println!("ERROR {}: {why}", case.name),
                    Ok(_) => {}
                }
            }
            if coverage {
                match uncovered.as_slice() {
                    [] => println!("coverage: every rule decided a case"),
                    rules => println!("coverage: no case exercised {}", rules.join(", ")),
                }
            }
            let errors_said = if errors > 0 {
                format!(", {errors} error(s)")
            } else {
                String::new()
            };
            println!("{passed} passed, {failed} failed{errors_said}");
        }
        TestFormat::Json => {
            let cases: Vec<serde_json::Value> = results
                .iter()
                .map(|(case, result)| match result {
                    Ok(rule) => serde_json::json!({ "name": case.name, "result": "pass", "rule": rule }),
                    Err((failed, why)) => serde_json::json!({
                        "name": case.name,
                        "result": if *failed { "fail" } else { "error" },
                        "message": why,
                    }),
                })
                .collect();
            let out = serde_json::json!({
                "cases": cases,
                "passed": passed,
                "failed": failed,
                "errors": errors,
                "not_exercised": if coverage { serde_json::json!(uncovered) } else { serde_json::Value::Null },
            });
            println!("{}", serde_json::to_string_pretty(&out).map_err(|e| e.to_string())?);
        }
        TestFormat::Junit => print!("{}", junit(&cases_path.display().to_string(), &results)?),
    }
    if failed == 0 && errors == 0 {
        Ok(())
    } else {
        Err(String::new())
    }
}

/// The results as a JUnit XML test suite (quick-xml writes and escapes it).
fn junit(suite: &str, results: &[(&Case, CaseResult)]) -> Result<String, String> {
    use quick_xml::{Writer, events::BytesText};
    let failures = results.iter().filter(|(_, r)| matches!(r, Err((true, _)))).count();
    let errors = results.iter().filter(|(_, r)| matches!(r, Err((false, _)))).count();
    let mut writer = Writer::new_with_indent(Vec::new(), b' ', 2);
    writer
        .create_element("testsuite")
        .with_attributes([
            ("name", suite),
            ("tests", &results.len().to_string()),
            ("failures", &failures.to_string()),
            ("errors", &errors.to_string()),
        ])
        .write_inner_content(|w| {
            for (case, result) in results {
                let element = w
                    .create_element("testcase")
                    .with_attributes([("name", case.name.as_str()), ("classname", suite)]);
                match result {
                    Ok(_) => {
                        element.write_empty()?;
                    }
                    Err((failed, why)) => {
                        element.write_inner_content(|w| {
                            w.create_element(if *failed { "failure" } else { "error" })
                                .with_attribute(("message", why.as_str()))
                                .write_text_content(BytesText::new(why))?;
                            Ok(())
                        })?;
                    }
                }
            }
            Ok(())
        })
        .map_err(|e| e.to_string())?;
    let body = String::from_utf8(writer.into_inner()).map_err(|e| e.to_string())?;
    Ok(format!("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n{body}\n"))
}

fn run_case(policy: &Policy, case: &Case) -> CaseResult {
    let error = |why: String| (false, why);
    let p = &case.principal;
    let abi = match &p.abi {
        Some(name) => AbiId::by_name(name).ok_or_else(|| error(format!("unknown ABI {name:?}")))?,
        None => AbiId::native(),
    };
    let remote = (!p.tls_san_uri.is_empty() || !p.tls_san_dns.is_empty() || p.tls_subject_cn.is_some())
        .then(|| (p.tls_san_uri.clone(), p.tls_san_dns.clone(), p.tls_subject_cn.clone()));
    let uid = match (p.uid, &remote) {
        (Some(uid), None) => uid,
        (None, Some(_)) => 0,
        (None, None) => {
            return Err(error(
                "the principal needs a uid: a case never means root by omission (root is uid = 0)".into(),
            ));
        }
        (Some(_), Some(_)) => return Err(error("a TLS client has no uid".into())),
    };
    let task = TaskParts {
        uid,
        gid: p.gid.unwrap_or(uid),
        groups: p.groups.clone(),
        exe: p.exe.clone(),
        abi,
        exe_sha256: p.exe_sha256.clone(),
        cgroup: p.cgroup.clone(),
        lsm_label: p.lsm_label.clone(),
        remote,
    };
    let mut properties = Properties::new();
    for (k, v) in &case.service.properties {
        let value = match v {
            toml::Value::String(s) => PropValue::Text(s.clone()),
            toml::Value::Integer(i) => u64::try_from(*i).map_or(PropValue::Signed(*i), PropValue::Unsigned),
            toml::Value::Boolean(b) => PropValue::Flag(*b),
            _ => return Err(error(format!("property {k}: strings, integers and booleans only"))),
        };
        properties.insert(k.clone(), value);
    }
    let req = request(
        &case.service.class,
        case.method.as_deref(),
        case.open.as_deref(),
        case.memory.as_deref(),
    )
    .map_err(error)?;
    if let Some(rule) = &case.rule
        && rule != portcullis_policy::DEFAULT_DENY
        && !policy.rule_ids().any(|id| id == rule)
    {
        return Err(error(format!(
            "the policy has no rule {rule:?}{}",
            portcullis_policy::did_you_mean(rule, policy.rule_ids().chain([portcullis_policy::DEFAULT_DENY]))
        )));
    }
    let view = ServiceView {
        name: &case.service.name,
        class: &case.service.class,
        properties: &properties,
    };
    let got = match (&case.method, case.args.is_empty()) {
        (Some(method), false) => {
            let given: Vec<String> = case.args.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let (scalars, struct_in) = call_args(&case.service.class, method, &given).map_err(error)?;
            with_method_ref(&case.service.class, method, |method_ref| {
                policy.evaluate_call(&task.task(), &view, method_ref, &scalars, &struct_in)
            })
        }
        (None, false) => return Err(error("args are a method call's: give the method".into())),
        _ => policy.evaluate(&task.task(), &view, req),
    };
    let outcome = match (got.allowed, got.audit) {
        (true, _) => Expect::Allow,
        (false, true) => Expect::WouldDeny,
        (false, false) => Expect::Deny,
    };
    let word = |e: Expect| match e {
        Expect::Allow => "allow",
        Expect::Deny => "deny",
        Expect::WouldDeny => "would_deny",
    };
    if outcome != case.expect || case.rule.as_ref().is_some_and(|r| *r != got.rule) {
        return Err((
            true,
            format!(
                "expected {}{}, got {} (rule {:?})",
                word(case.expect),
                case.rule.as_ref().map(|r| format!(" (rule {r:?})")).unwrap_or_default(),
                word(outcome),
                got.rule
            ),
        ));
    }
    Ok(got.rule)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_task_reads_every_attribute() {
        let (t, notes) = parse_task(
            "uid=1000,gid=20,groups=dialout:video,exe=/usr/bin/app,exe_sha256=AB12,cgroup=/user.slice,lsm_label=unconfined,abi=i386",
        )
        .unwrap();
        assert_eq!(
            (t.uid, t.gid, t.groups.len(), t.exe.as_deref(), t.abi),
            (1000, 20, 2, Some("/usr/bin/app"), AbiId::I386)
        );
        assert_eq!(
            (t.exe_sha256.as_deref(), t.cgroup.as_deref(), t.lsm_label.as_deref()),
            (Some("ab12"), Some("/user.slice"), Some("unconfined"))
        );
        assert!(notes.is_empty());
        assert!(parse_task("uid=x").is_err());
        assert!(parse_task("shoe=1").is_err());
        // Never root by omission; a gid from the uid, said aloud.
        assert!(parse_task("").unwrap_err().contains("needs uid=N"));
        assert!(parse_task("gid=0").unwrap_err().contains("needs uid=N"));
        let (t, notes) = parse_task("uid=1000").unwrap();
        assert_eq!((t.uid, t.gid), (1000, 1000));
        assert_eq!(notes, ["gid not given: taken as 1000 (the uid)"]);
        assert!(parse_task("tls_subject_cn=a").is_ok());
        assert!(parse_task("uid=0,tls_subject_cn=a").is_err());
    }

    #[test]
    fn method_privilege_comes_from_the_driver_table() {
        assert_eq!(method_privilege("SampleDevice", "reset"), Some("sample.admin"));
        assert_eq!(method_privilege("SampleDevice", "add"), None);
    }
}
