//! `cargo xtask <command>`: the project's automation.
//!
//! - `test`: install what the suite needs (a Python venv with grpcio for the stock-client test),
//!   check generated code is current, build the broker once, run every test in the workspace.
//! - `bench [--quick]`: build the benchmarks in release mode and run them.
//! - `chaos [--short] [--only S,..] [--json F]`: what the broker survives, against a release
//!   broker (docs/RELIABILITY.md); `test` runs the short version.
//! - `codegen [--check]`: regenerate the checked-in gRPC code; with `--check`, fail on a diff.
//! - `fuzz [--minutes N] [--jobs J] [--target T] | --coverage | --capture`: fuzzing campaigns
//!   (docs/FUZZING.md).

#![forbid(unsafe_code)]

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

mod fuzz;

type Result<T> = std::result::Result<T, String>;

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let rest = args.get(1..).unwrap_or_default();
    let result = match args.first().map(String::as_str) {
        Some("test") => test(rest),
        Some("bench") => bench(rest),
        Some("codegen") => codegen(args.iter().any(|a| a == "--check")),
        Some("fuzz") => fuzz::fuzz(rest),
        Some("chaos") => chaos(rest),
        _ => Err(
            "usage: cargo xtask <test [-- cargo-test-args] | bench [--quick] | chaos [--short] [--only S,..] [--json F] | codegen [--check] | fuzz [--minutes N] [--jobs J] [--target T] | fuzz --coverage | fuzz --capture>"
                .into(),
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn target_dir() -> PathBuf {
    env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

fn cargo() -> Command {
    let mut cmd = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root());
    cmd
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: running {cmd:?}");
    let status = cmd.status().map_err(|e| format!("cannot start {cmd:?}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{cmd:?} failed: {status}"))
    }
}

fn step(title: &str) {
    eprintln!("\n==> {title}");
}

fn test(extra: &[String]) -> Result<()> {
    step("ABI matrix toolchains (cross compilers, qemu-user)");
    ensure_matrix_toolchains()?;

    step(
        "device and service test tools (iproute2, util-linux's losetup, nsenter and mount, e2fsprogs' mkfs, systemd-analyze, the font of qualify's plot)",
    );
    install_debian(&[
        "iproute2",
        "util-linux",
        "mount",
        "e2fsprogs",
        "systemd",
        "passwd",
        "fonts-dejavu-core",
    ])?;

    step("the broker's service user (portcullis), which a root broker serves as");
    ensure_service_user()?;

    step("logind, polkitd and a D-Bus daemon (the power tests' own system bus), and the polkit rule the product ships");
    install_debian(&["dbus-daemon", "polkitd", "systemd"])?;
    ensure_polkit_rule()?;

    step("python venv with grpcio (stock gRPC client test)");
    let python = ensure_python_venv()?;

    step("generated code is current");
    codegen(true)?;

    step("building the broker once for every integration test");
    let bin = build_suite_broker()?;

    step("the whole workspace test suite");
    let extra: Vec<&String> = extra.iter().skip_while(|a| *a == "--").collect();
    run(cargo()
        .args(["test", "--workspace", "--no-fail-fast"])
        .args(extra)
        .env("PORTCULLIS_BIN", &bin)
        .env("PORTCULLIS_PYTHON", &python))?;

    step(
        "chaos, the short version: clients killed, hostile rings, devices pulled, the broker killed and restarted, a crowd, stalled and flooding clients",
    );
    run(cargo()
        .args([
            "run",
            "--quiet",
            "--package",
            "portcullis-tests",
            "--bin",
            "chaos",
            "--",
            "--short",
        ])
        .env("PORTCULLIS_BIN", &bin))?;

    step("every fuzz target, 30 s each (any crash fails)");
    fuzz::ensure_tools()?;
    fuzz::build()?;
    let targets: Vec<String> = fuzz::TARGETS.iter().map(|t| t.to_string()).collect();
    fuzz::campaign(&targets, 30, 2, false)
}

/// A venv under `target/` holding the pinned packages of `tests/python/requirements.txt`;
/// reinstalled only when that file changes.
fn ensure_python_venv() -> Result<PathBuf> {
    let requirements = root().join("tests/python/requirements.txt");
    let wanted = fs::read_to_string(&requirements).map_err(|e| format!("{}: {e}", requirements.display()))?;
    let venv = target_dir().join("py");
    let python = venv.join("bin/python");
    let stamp = venv.join("requirements.installed");
    if python.exists() && fs::read_to_string(&stamp).ok().as_deref() == Some(wanted.as_str()) {
        eprintln!("xtask: {} is current", venv.display());
        return Ok(python);
    }
    let python3 = env::var("PYTHON3").unwrap_or_else(|_| "python3".into());
    if Command::new(&python3).arg("--version").output().is_err() {
        install_debian(&["python3", "python3-venv", "python3-pip"])?;
    }
    if !python.exists()
        && Command::new(&python3)
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .map(|s| !s.success())
            .unwrap_or(true)
    {
        install_debian(&["python3-venv"])?;
        run(Command::new(&python3).args(["-m", "venv"]).arg(&venv))?;
    }
    run(Command::new(&python)
        .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-r"])
        .arg(&requirements))?;
    fs::write(&stamp, wanted).map_err(|e| format!("{}: {e}", stamp.display()))?;
    Ok(python)
}

/// The Debian packages of tests/abi_matrix/abis.tsv (fourth column), plus make.
fn ensure_matrix_toolchains() -> Result<()> {
    let path = root().join("tests/abi_matrix/abis.tsv");
    let text = fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut packages = vec!["make".to_string()];
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
        let cols: Vec<&str> = line.split('\t').collect();
        let list = cols
            .get(3)
            .ok_or_else(|| format!("{}: no package column in {line:?}", path.display()))?;
        packages.extend(list.split_whitespace().map(str::to_string));
    }
    packages.sort();
    packages.dedup();
    install_debian(&packages.iter().map(String::as_str).collect::<Vec<_>>())
}

/// Builds the integration suite's broker — with the test-only `fault` driver (a driver made to
/// panic, and the sandbox tests' forbidden calls) — and returns its path.
pub(crate) fn build_suite_broker() -> Result<PathBuf> {
    run(cargo().args([
        "build",
        "--package",
        "portcullis-cli",
        "--bin",
        "portcullis",
        "--features",
        "fault-injection",
    ]))?;
    Ok(target_dir().join("debug").join("portcullis"))
}

/// The system user a root broker's serving process becomes (`[sandbox] user`'s default),
/// made when missing: no home, no login shell.
fn ensure_service_user() -> Result<()> {
    let known = Command::new("id")
        .arg("portcullis")
        .output()
        .is_ok_and(|o| o.status.success());
    if known {
        return Ok(());
    }
    run(Command::new("useradd").args([
        "--system",
        "--no-create-home",
        "--home-dir",
        "/nonexistent",
        "--shell",
        "/usr/sbin/nologin",
        "portcullis",
    ]))
}

/// `dist/polkit/50-portcullis.rules` in `/etc/polkit-1/rules.d`, where polkitd reads it: what an
/// installation of the broker does, so that its user may hold logind's sleep inhibitors.
fn ensure_polkit_rule() -> Result<()> {
    let rule = root().join("dist/polkit/50-portcullis.rules");
    let installed = Path::new("/etc/polkit-1/rules.d/50-portcullis.rules");
    let text = fs::read(&rule).map_err(|e| format!("{}: {e}", rule.display()))?;
    if fs::read(installed).ok().as_deref() == Some(text.as_slice()) {
        return Ok(());
    }
    eprintln!("xtask: installing {}", installed.display());
    fs::create_dir_all(installed.parent().unwrap_or(Path::new("/")))
        .and_then(|()| fs::write(installed, text))
        .map_err(|e| format!("{}: {e}", installed.display()))
}

/// `apt-get install` the packages that are missing (the machines run as root).
fn install_debian(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
                .unwrap_or(false)
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    run(Command::new("apt-get")
        .arg("update")
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// `cargo xtask chaos`: the full chaos run (docs/RELIABILITY.md) against a release broker.
fn chaos(args: &[String]) -> Result<()> {
    step("chaos prerequisites (losetup, ip, setpriv) and the service user");
    install_debian(&["iproute2", "util-linux"])?;
    ensure_service_user()?;
    step("the broker and the chaos driver (release builds)");
    run(cargo().args([
        "build",
        "--release",
        "--package",
        "portcullis-cli",
        "--bin",
        "portcullis",
    ]))?;
    run(cargo().args(["build", "--release", "--package", "portcullis-tests", "--bin", "chaos"]))?;
    step("chaos");
    run(Command::new(target_dir().join("release").join("chaos"))
        .args(args)
        .env("PORTCULLIS_BIN", target_dir().join("release").join("portcullis")))
}

fn bench(args: &[String]) -> Result<()> {
    // iceoryx2 runs bindgen (libclang); the latency plot's labels use DejaVu Sans; the device
    // benchmarks make a loop device (losetup), a network namespace (unshare) and configure
    // TUN interfaces (ip).
    step("bench prerequisites");
    install_debian(&["libclang-dev", "fonts-dejavu-core", "iproute2", "util-linux"])?;
    step("the broker's service user (portcullis), for the sandbox benchmark's broker");
    ensure_service_user()?;
    step("the broker (release build), for the benchmarks that run it as a process");
    run(cargo().args([
        "build",
        "--release",
        "--package",
        "portcullis-cli",
        "--bin",
        "portcullis",
    ]))?;
    step("benchmarks (release build)");
    run(cargo()
        .env("PORTCULLIS_BIN", target_dir().join("release").join("portcullis"))
        .args([
            "run",
            "--release",
            "--package",
            "portcullis-bench",
            "--features",
            "peers",
            "--",
        ])
        .args(args))
}

/// One protobuf compilation: the .proto, the include path, and where its output is checked in.
struct Codegen {
    proto: &'static str,
    include: &'static str,
    out_dir: &'static str,
    /// The files of the output that are checked in (imports generate files of their own).
    outputs: &'static [&'static str],
    descriptor: Option<&'static str>,
    extern_paths: &'static [(&'static str, &'static str)],
    /// The codec the generated client and server use, when not prost's with tonic's buffers.
    codec_path: Option<&'static str>,
}

const CODEGEN: &[Codegen] = &[
    Codegen {
        proto: "proto/portcullis.proto",
        include: "proto",
        out_dir: "proto/src/generated",
        outputs: &["portcullis.v1.rs", "portcullis_descriptor.bin"],
        descriptor: Some("portcullis_descriptor.bin"),
        extern_paths: &[],
        codec_path: Some("crate::codec::LeanCodec"),
    },
    Codegen {
        proto: "bench/proto/echo.proto",
        include: "proto",
        out_dir: "bench/src/generated",
        outputs: &["portcullis.bench.rs"],
        descriptor: None,
        extern_paths: &[(".portcullis.v1", "::portcullis_proto::pb")],
        // The peer the broker is measured against keeps tonic's defaults.
        codec_path: None,
    },
];

/// The per-driver C headers, from `portcullis schema --c-header`.
fn c_headers(check: bool, stale: &mut Vec<String>) -> Result<()> {
    let tmp = tempfile::tempdir().map_err(|e| e.to_string())?;
    run(cargo()
        .args([
            "run",
            "--quiet",
            "--package",
            "portcullis-cli",
            "--bin",
            "portcullis",
            "--",
            "schema",
            "--c-header",
        ])
        .arg(tmp.path()))?;
    let dest = root().join("shims/c/include/portcullis");
    fs::create_dir_all(&dest).map_err(|e| e.to_string())?;
    let names = |dir: &Path| -> Result<Vec<std::ffi::OsString>> {
        let mut v: Vec<_> = fs::read_dir(dir)
            .map_err(|e| e.to_string())?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name())
            .collect();
        v.sort();
        Ok(v)
    };
    for name in names(tmp.path())? {
        let new = fs::read(tmp.path().join(&name)).map_err(|e| e.to_string())?;
        let path = dest.join(&name);
        if fs::read(&path).ok().as_deref() == Some(new.as_slice()) {
            continue;
        }
        if check {
            stale.push(path.display().to_string());
        } else {
            fs::write(&path, new).map_err(|e| format!("{}: {e}", path.display()))?;
            eprintln!("xtask: wrote {}", path.display());
        }
    }
    let generated = names(tmp.path())?;
    for name in names(&dest)?.into_iter().filter(|n| !generated.contains(n)) {
        stale.push(format!("{} (no longer generated)", dest.join(name).display()));
    }
    Ok(())
}

fn codegen(check: bool) -> Result<()> {
    let protoc = protoc_bin_vendored::protoc_bin_path().map_err(|e| format!("vendored protoc: {e}"))?;
    let mut stale = Vec::new();
    for job in CODEGEN {
        let tmp = tempfile::tempdir().map_err(|e| e.to_string())?;
        let mut config = prost_build::Config::new();
        config.protoc_executable(&protoc);
        let mut builder = tonic_prost_build::configure()
            .out_dir(tmp.path())
            .emit_rerun_if_changed(false);
        if let Some(descriptor) = job.descriptor {
            builder = builder.file_descriptor_set_path(tmp.path().join(descriptor));
        }
        if let Some(codec) = job.codec_path {
            builder = builder.codec_path(codec);
        }
        for (proto_path, rust_path) in job.extern_paths {
            builder = builder.extern_path(*proto_path, *rust_path);
        }
        let root = root();
        let include_dirs = [
            root.join(job.include),
            root.join(Path::new(job.proto).parent().unwrap_or(Path::new("."))),
        ];
        builder
            .compile_with_config(config, &[root.join(job.proto)], &include_dirs)
            .map_err(|e| format!("{}: {e}", job.proto))?;
        let out_dir = root.join(job.out_dir);
        fs::create_dir_all(&out_dir).map_err(|e| e.to_string())?;
        for name in job.outputs {
            let produced = tmp.path().join(name);
            let new = fs::read(&produced).map_err(|e| format!("{}: {e}", produced.display()))?;
            let dest = out_dir.join(name);
            if fs::read(&dest).ok().as_deref() == Some(new.as_slice()) {
                continue;
            }
            if check {
                stale.push(dest.display().to_string());
            } else {
                fs::write(&dest, new).map_err(|e| format!("{}: {e}", dest.display()))?;
                eprintln!("xtask: wrote {}", dest.display());
            }
        }
    }
    c_headers(check, &mut stale)?;
    if stale.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "generated code is stale, run `cargo xtask codegen`: {}",
            stale.join(", ")
        ))
    }
}
