//! `cargo xtask fuzz`: build every cargo-fuzz target, run them (in turn or in parallel) with a
//! live progress table, minimize the corpora, print a summary; a crash is saved with a
//! one-command reproducer and fails the run. `--coverage` reports per-file line coverage of the
//! decoders; `--capture` records seed corpora from the integration tests' real traffic.

use std::{
    collections::BTreeMap,
    fs,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use crate::{Result, install_debian, root, run, step};

/// The targets, in the order they run.
pub(crate) const TARGETS: &[&str] = &[
    "native_frame",
    "grpc_request",
    "layout_translate",
    "layout_differential",
    "policy_text",
    "session_ops",
    "ring_records",
    "uevent",
    "personality",
    "helper_request",
];

/// The files whose line coverage `--coverage` reports (the decoders and the policy parser).
const COVERAGE_FILES: &[&str] = &[
    "proto/src/frame.rs",
    "proto/src/layout/abi.rs",
    "proto/src/layout/c.rs",
    "proto/src/layout/compute.rs",
    "proto/src/layout/desc.rs",
    "proto/src/layout/plan.rs",
    "policy/src/model.rs",
    "policy/src/args.rs",
    "policy/src/grant.rs",
    "broker/src/bus/uevent.rs",
    "broker/src/registry/personality.rs",
    "broker/src/sandbox/protocol.rs",
    "broker/src/sandbox/helper.rs",
];

/// The cargo-fuzz release `cargo xtask fuzz` installs when it is missing.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

struct Options {
    seconds: u64,
    jobs: usize,
    targets: Vec<String>,
    coverage: bool,
    capture: bool,
    minimize: bool,
}

fn parse(args: &[String]) -> Result<Options> {
    let mut o = Options {
        seconds: 60,
        jobs: 1,
        targets: Vec::new(),
        coverage: false,
        capture: false,
        minimize: true,
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--minutes" => o.seconds = number(value("--minutes")?)? * 60,
            "--seconds" => o.seconds = number(value("--seconds")?)?,
            "--jobs" => o.jobs = usize::try_from(number(value("--jobs")?)?.max(1)).unwrap_or(1),
            "--target" => {
                let t = value("--target")?;
                if !TARGETS.contains(&t.as_str()) {
                    return Err(format!("unknown target {t:?} (targets: {})", TARGETS.join(", ")));
                }
                o.targets.push(t.clone());
            }
            "--coverage" => o.coverage = true,
            "--capture" => o.capture = true,
            "--no-minimize" => o.minimize = false,
            other => {
                return Err(format!(
                    "unknown argument {other:?}\nusage: cargo xtask fuzz [--minutes N | --seconds N] [--jobs J] [--target T]... [--no-minimize] | --coverage [--target T]... | --capture"
                ));
            }
        }
    }
    if o.targets.is_empty() {
        o.targets = TARGETS.iter().map(|t| t.to_string()).collect();
    }
    Ok(o)
}

fn number(s: &str) -> Result<u64> {
    s.parse().map_err(|_| format!("{s:?} is not a whole number"))
}

fn fuzz_dir() -> PathBuf {
    root().join("fuzz")
}

fn binary(target: &str) -> PathBuf {
    fuzz_dir().join("target/x86_64-unknown-linux-gnu/release").join(target)
}

/// The checked-in seeds of a target.
fn seeds(target: &str) -> PathBuf {
    fuzz_dir().join("corpus").join(target)
}

/// The working corpus a campaign grows (kept between runs, not checked in).
fn working(target: &str) -> PathBuf {
    crate::target_dir().join("fuzz-corpus").join(target)
}

fn artifacts(target: &str) -> PathBuf {
    fuzz_dir().join("artifacts").join(target)
}

/// `cargo +nightly fuzz …`, from the project root.
fn cargo_fuzz() -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root()).args(["+nightly", "fuzz"]);
    // The stable toolchain's variables must not leak into the nightly build.
    for var in ["RUSTC", "RUSTDOC", "CARGO", "RUSTUP_TOOLCHAIN", "CARGO_TARGET_DIR"] {
        cmd.env_remove(var);
    }
    cmd
}

/// The installed nightly, and cargo-fuzz (installed from crates.io when missing).
pub(crate) fn ensure_tools() -> Result<()> {
    let nightly = Command::new("rustc").args(["+nightly", "--version"]).output();
    if !nightly.map(|o| o.status.success()).unwrap_or(false) {
        return Err("fuzzing needs the nightly toolchain (`rustup toolchain list` shows none)".into());
    }
    let have = cargo_fuzz()
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !have {
        install_debian(&["build-essential"])?;
        run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked", "--version", CARGO_FUZZ_VERSION]))?;
    }
    Ok(())
}

pub(crate) fn build() -> Result<()> {
    step("building the fuzz targets (nightly, release, address sanitizer)");
    run(cargo_fuzz().args(["build", "-O"]))
}

pub(crate) fn fuzz(args: &[String]) -> Result<()> {
    let o = parse(args)?;
    ensure_tools()?;
    if o.capture {
        return capture();
    }
    build()?;
    if o.coverage {
        return coverage(&o.targets);
    }
    campaign(&o.targets, o.seconds, o.jobs, o.minimize)
}

/// What one running target reported last.
#[derive(Clone, Debug, Default)]
struct Progress {
    started: Option<Instant>,
    finished: Option<Duration>,
    execs: u64,
    exec_per_sec: u64,
    cov: u64,
    features: u64,
    corpus: u64,
    crashes: Vec<PathBuf>,
    failed: Option<String>,
}

/// Reads a libFuzzer status line (`#4096 pulse cov: 412 ft: 980 corp: 37/1210b … exec/s: 2048`).
fn parse_status(line: &str, p: &mut Progress) {
    let words: Vec<&str> = line.split_whitespace().collect();
    if let Some(n) = words.first().and_then(|w| w.strip_prefix('#'))
        && let Ok(n) = n.parse()
    {
        p.execs = n;
    }
    for pair in words.windows(2) {
        let [key, value] = pair else { continue };
        let num = || {
            value
                .split('/')
                .next()
                .and_then(|v| v.trim_end_matches(['b', 'k', 'M', 'K']).parse().ok())
        };
        match *key {
            "cov:" => p.cov = num().unwrap_or(p.cov),
            "ft:" => p.features = num().unwrap_or(p.features),
            "corp:" => p.corpus = num().unwrap_or(p.corpus),
            "exec/s:" => p.exec_per_sec = num().unwrap_or(p.exec_per_sec),
            _ => {}
        }
    }
    if let Some(n) = line.strip_prefix("stat::number_of_executed_units: ") {
        p.execs = n.trim().parse().unwrap_or(p.execs);
    }
}

fn dictionary(target: &str) -> Option<PathBuf> {
    let dict = fuzz_dir().join("dict").join(format!("{target}.dict"));
    dict.exists().then_some(dict)
}

/// Runs one target for `seconds`, reporting into `progress`.
fn run_target(target: &str, seconds: u64, progress: &Mutex<BTreeMap<String, Progress>>) -> Result<()> {
    let corpus = working(target);
    let artifact_dir = artifacts(target);
    for dir in [&corpus, &artifact_dir, &seeds(target)] {
        fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let mut cmd = Command::new(binary(target));
    cmd.arg(format!("-max_total_time={seconds}"))
        .arg("-print_final_stats=1")
        .arg("-timeout=30")
        .arg("-rss_limit_mb=2048")
        .arg(format!("-artifact_prefix={}/", artifact_dir.display()));
    if let Some(dict) = dictionary(target) {
        cmd.arg(format!("-dict={}", dict.display()));
    }
    cmd.arg(&corpus).arg(seeds(target));
    cmd.stdout(Stdio::null()).stderr(Stdio::piped());
    let before: Vec<PathBuf> = list(&artifact_dir);
    let mut child = cmd.spawn().map_err(|e| format!("{}: {e}", binary(target).display()))?;
    let update = |f: &mut dyn FnMut(&mut Progress)| {
        let mut all = progress.lock().unwrap_or_else(|e| e.into_inner());
        f(all.entry(target.to_string()).or_default());
    };
    update(&mut |p| p.started = Some(Instant::now()));
    if let Some(stderr) = child.stderr.take() {
        let log_path = crate::target_dir().join("fuzz-logs").join(format!("{target}.log"));
        let _ = fs::create_dir_all(log_path.parent().unwrap_or(Path::new(".")));
        let mut log = fs::File::create(&log_path).ok();
        for line in BufReader::new(stderr).lines().map_while(std::result::Result::ok) {
            if let Some(log) = log.as_mut() {
                use std::io::Write;
                let _ = writeln!(log, "{line}");
            }
            update(&mut |p| parse_status(&line, p));
        }
    }
    let status = child.wait().map_err(|e| e.to_string())?;
    let crashes: Vec<PathBuf> = list(&artifact_dir)
        .into_iter()
        .filter(|a| !before.contains(a))
        .collect();
    update(&mut |p| {
        p.finished = p.started.map(|s| s.elapsed());
        p.crashes = crashes.clone();
        if !status.success() && crashes.is_empty() {
            p.failed = Some(format!("exited with {status}"));
        }
    });
    Ok(())
}

fn list(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default()
}

fn print_table(progress: &BTreeMap<String, Progress>, targets: &[String], seconds: u64) {
    eprintln!(
        "{:<20} {:>9} {:>12} {:>9} {:>7} {:>8} {:>7} {:>8}",
        "target", "time", "execs", "exec/s", "cov", "ft", "corpus", "crashes"
    );
    for t in targets {
        let p = progress.get(t).cloned().unwrap_or_default();
        let time = match (p.started, p.finished) {
            (_, Some(d)) => format!("{}s", d.as_secs()),
            (Some(s), None) => format!("{}/{seconds}s", s.elapsed().as_secs()),
            (None, None) => "waiting".into(),
        };
        let crashes = if let Some(why) = &p.failed {
            why.clone()
        } else {
            p.crashes.len().to_string()
        };
        eprintln!(
            "{:<20} {:>9} {:>12} {:>9} {:>7} {:>8} {:>7} {:>8}",
            t, time, p.execs, p.exec_per_sec, p.cov, p.features, p.corpus, crashes
        );
    }
}

/// Runs every target for `seconds`, `jobs` at a time, with a progress table every 15 seconds.
pub(crate) fn campaign(targets: &[String], seconds: u64, jobs: usize, minimize: bool) -> Result<()> {
    step(&format!(
        "fuzzing {} target(s) for {seconds} s each, {jobs} at a time",
        targets.len()
    ));
    let progress: Arc<Mutex<BTreeMap<String, Progress>>> = Arc::new(Mutex::new(BTreeMap::new()));
    let queue: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(targets.iter().rev().cloned().collect()));
    let workers: Vec<_> = (0..jobs.min(targets.len()).max(1))
        .map(|_| {
            let (queue, progress) = (queue.clone(), progress.clone());
            thread::spawn(move || -> Result<()> {
                loop {
                    let Some(target) = queue.lock().unwrap_or_else(|e| e.into_inner()).pop() else {
                        return Ok(());
                    };
                    run_target(&target, seconds, &progress)?;
                }
            })
        })
        .collect();
    let started = Instant::now();
    while workers.iter().any(|w| !w.is_finished()) {
        thread::sleep(Duration::from_millis(500));
        if started.elapsed().as_secs().is_multiple_of(15) {
            print_table(&progress.lock().unwrap_or_else(|e| e.into_inner()), targets, seconds);
            thread::sleep(Duration::from_millis(600));
        }
    }
    for w in workers {
        w.join().map_err(|_| "a fuzzing worker panicked".to_string())??;
    }
    if minimize {
        step("minimizing the working corpora");
        for t in targets {
            minimize_into(t, &working(t), &[working(t), seeds(t)])?;
        }
    }
    let progress = progress.lock().unwrap_or_else(|e| e.into_inner()).clone();
    step("summary");
    print_table(&progress, targets, seconds);
    let total: u64 = progress.values().map(|p| p.execs).sum();
    eprintln!(
        "{total} executions in all; corpora in {}; logs in {}",
        crate::target_dir().join("fuzz-corpus").display(),
        crate::target_dir().join("fuzz-logs").display()
    );
    let mut failures = Vec::new();
    for (t, p) in &progress {
        for crash in &p.crashes {
            failures.push(format!(
                "{t}: {} — reproduce with: cargo +nightly fuzz run {t} {}",
                crash.display(),
                crash.display()
            ));
        }
        if let Some(why) = &p.failed {
            failures.push(format!(
                "{t}: {why} (log: {})",
                crate::target_dir().join("fuzz-logs").join(format!("{t}.log")).display()
            ));
        }
    }
    if failures.is_empty() {
        eprintln!("no crashes");
        Ok(())
    } else {
        Err(format!(
            "fuzzing found {} problem(s):\n{}",
            failures.len(),
            failures.join("\n")
        ))
    }
}

/// `-merge=1`: the smallest set of inputs from `sources` that keeps their coverage, into `into`.
fn minimize_into(target: &str, into: &Path, sources: &[PathBuf]) -> Result<()> {
    let fresh = into.with_extension("merging");
    let _ = fs::remove_dir_all(&fresh);
    fs::create_dir_all(&fresh).map_err(|e| format!("{}: {e}", fresh.display()))?;
    let before: usize = sources.iter().map(|s| list(s).len()).sum();
    let status = Command::new(binary(target))
        .arg("-merge=1")
        .arg(&fresh)
        .args(sources)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(|e| e.to_string())?;
    if !status.success() {
        return Err(format!("{target}: corpus merge failed: {status}"));
    }
    let _ = fs::remove_dir_all(into);
    fs::rename(&fresh, into).map_err(|e| format!("{}: {e}", into.display()))?;
    eprintln!("{target}: {before} inputs -> {}", list(into).len());
    Ok(())
}

/// Per-file line coverage of the decoders: every target's corpus run through a coverage build
/// (`cargo fuzz coverage`), the profiles merged, and one report over all the targets' binaries
/// (a line counts as covered when any target covers it).
fn coverage(targets: &[String]) -> Result<()> {
    step("line coverage of the decoders (cargo fuzz coverage + llvm-cov)");
    let llvm = llvm_tools()?;
    let mut profiles = Vec::new();
    let mut binaries = Vec::new();
    for t in targets {
        let mut corpus = working(t);
        if list(&corpus).is_empty() {
            corpus = seeds(t);
        }
        run(cargo_fuzz().args(["coverage", t.as_str()]).arg(&corpus))?;
        // cargo-fuzz builds coverage binaries under the project's target/, not fuzz/target/.
        binaries.push(
            root()
                .join("target/x86_64-unknown-linux-gnu/coverage/x86_64-unknown-linux-gnu/release")
                .join(t),
        );
        profiles.push(fuzz_dir().join("coverage").join(t).join("coverage.profdata"));
    }
    let merged = fuzz_dir().join("coverage").join("all.profdata");
    run(Command::new(llvm.join("llvm-profdata"))
        .args(["merge", "-sparse"])
        .args(&profiles)
        .arg("-o")
        .arg(&merged))?;
    let mut cmd = Command::new(llvm.join("llvm-cov"));
    cmd.args(["export", "--format=text", "--summary-only"])
        .arg(format!("--instr-profile={}", merged.display()));
    for (i, bin) in binaries.iter().enumerate() {
        if i > 0 {
            cmd.arg("-object");
        }
        cmd.arg(bin);
    }
    let out = cmd.output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "llvm-cov export failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let mut totals: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for (file, lines) in line_summary(&String::from_utf8_lossy(&out.stdout)) {
        if let Some(rel) = COVERAGE_FILES.iter().find(|f| file.ends_with(*f)) {
            totals.insert((*rel).to_string(), lines);
        }
    }
    eprintln!("{:<32} {:>8} {:>8} {:>7}", "file", "lines", "covered", "%");
    let (mut all_c, mut all_n) = (0, 0);
    for (file, (c, n)) in &totals {
        all_c += c;
        all_n += n;
        eprintln!("{:<32} {:>8} {:>8} {:>6.1}%", file, n, c, percent(*c, *n));
    }
    eprintln!(
        "{:<32} {:>8} {:>8} {:>6.1}%",
        "all",
        all_n,
        all_c,
        percent(all_c, all_n)
    );
    Ok(())
}

fn percent(c: u64, n: u64) -> f64 {
    if n == 0 { 0.0 } else { c as f64 * 100.0 / n as f64 }
}

/// (file, (lines covered, lines)) from `llvm-cov export --summary-only` JSON.
fn line_summary(json: &str) -> Vec<(String, (u64, u64))> {
    let mut out = Vec::new();
    // The JSON is large but regular: each file object has "filename" then "summary" → "lines".
    for chunk in json.split("\"filename\":\"").skip(1) {
        let Some((name, rest)) = chunk.split_once('"') else {
            continue;
        };
        let Some(lines) = rest.split("\"lines\":{").nth(1) else {
            continue;
        };
        let field = |key: &str| {
            lines
                .split(&format!("\"{key}\":"))
                .nth(1)
                .and_then(|v| v.split([',', '}']).next())
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        if let (Some(count), Some(covered)) = (field("count"), field("covered")) {
            out.push((name.to_string(), (covered, count)));
        }
    }
    out
}

/// The nightly's llvm-tools (installing the rustup component when missing).
fn llvm_tools() -> Result<PathBuf> {
    let sysroot = Command::new("rustc")
        .args(["+nightly", "--print", "sysroot"])
        .output()
        .map_err(|e| e.to_string())?;
    let bin =
        PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim()).join("lib/rustlib/x86_64-unknown-linux-gnu/bin");
    if !bin.join("llvm-cov").exists() {
        run(Command::new("rustup").args(["component", "add", "llvm-tools-preview", "--toolchain", "nightly"]))?;
    }
    Ok(bin)
}

/// Records seed corpora from the integration tests' real traffic, then minimizes them into
/// `fuzz/corpus/<target>/` (checked in).
fn capture() -> Result<()> {
    step("recording frames and messages from the integration tests");
    let dir = crate::target_dir().join("fuzz-capture");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    // The tests' brokers inherit the capture directory.
    let python = crate::ensure_python_venv()?;
    // The suite's broker, as `cargo xtask test` builds it.
    let bin = crate::build_suite_broker()?;
    run(crate::cargo()
        .args([
            "test",
            "--package",
            "portcullis-tests",
            "--test",
            "integration",
            "--",
            "--skip",
            "abi_matrix",
        ])
        .env("PORTCULLIS_BIN", &bin)
        .env("PORTCULLIS_PYTHON", &python)
        .env("PORTCULLIS_CAPTURE_DIR", &dir))?;
    // Policies: the project's own.
    let policies = dir.join("policy_text");
    fs::create_dir_all(&policies).map_err(|e| e.to_string())?;
    for (i, p) in ["broker/src/default_policy.toml", "tests/policy/cases.toml"]
        .iter()
        .enumerate()
    {
        let text = fs::read(root().join(p)).map_err(|e| format!("{p}: {e}"))?;
        fs::write(policies.join(format!("project-{i}")), text).map_err(|e| e.to_string())?;
    }
    build()?;
    for t in ["native_frame", "grpc_request", "policy_text"] {
        let recorded = dir.join(t);
        let n = list(&recorded).len();
        eprintln!("{t}: {n} recorded inputs");
        if n > 0 {
            minimize_into(t, &seeds(t), &[recorded, seeds(t)])?;
        }
    }
    Ok(())
}
