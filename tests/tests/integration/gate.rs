//! The gate's holes, tried as a hostile local user would: read-only memory written through
//! another path, revocation defeated by seals, identity borrowed from another program,
//! descriptors leaked across exec.

use std::{path::PathBuf, process::Command};

use portcullis_client::{OpenMode, native::NativeSession};
use portcullis_proto::layout::AbiId;
use portcullis_tests::{Broker, BrokerSetup, NOBODY, bin, stdout_ok};
use serde_json::Value;

fn hostile() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_hostile_client"))
}

/// Runs the hostile client as `nobody` and returns its report.
fn hostile_as_nobody(broker: &Broker, args: &[&str]) -> Value {
    let program = broker.copy_program(&hostile(), "hostile_client");
    let out = broker.run_as(NOBODY, &program, args);
    serde_json::from_str(&stdout_ok(&out)).unwrap()
}

#[tokio::test]
async fn registers_memory_is_read_only_whatever_path_a_client_takes() {
    let broker = Broker::start();
    let run_dir = broker.run_dir();
    let report = hostile_as_nobody(&broker, &["registers", run_dir.to_str().unwrap()]);
    for attempt in [
        "reopen_rw",
        "mmap_shared_write",
        "write",
        "ftruncate_shrink",
        "ftruncate_grow",
        "fallocate_grow",
        "fallocate_punch",
        "add_seal_seal",
        "add_seal_shrink",
        "add_seal_grow",
        "add_seal_write",
        "add_seal_future_write",
        "add_seal_exec",
    ] {
        assert_ne!(report[attempt], "ok", "{attempt} worked: {report}");
    }
    assert_eq!(report["size"], 4096, "{report}");
    // Another client still reads what the driver wrote: version 1, magic "PCUL" (LE words).
    let mut other = NativeSession::connect(&run_dir, AbiId::native()).await.unwrap();
    let sample = other.find("sample0").await.unwrap().remove(0);
    let handle = other.open(sample.id, false).await.unwrap();
    let mapped = other.map_memory(handle, 0).await.unwrap();
    let mut page = vec![0u8; 4096];
    assert_eq!(rustix::io::pread(&mapped.fd, &mut page, 0).unwrap(), 4096);
    assert_eq!(report["first_bytes"], hex(&page[..8]), "{report}");
    assert!(page[8..].iter().all(|b| *b == 0), "the rest of the page is untouched");
    assert_ne!(&page[..8], &[0u8; 8], "the driver's registers are there");
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn dma_revocation_holds_after_a_client_tries_every_seal() {
    let broker = Broker::start();
    let run_dir = broker.run_dir();
    let report = hostile_as_nobody(&broker, &["dma", run_dir.to_str().unwrap()]);
    for seal in ["seal", "shrink", "grow", "write", "future_write", "exec"] {
        assert_ne!(
            report[format!("add_seal_{seal}")],
            "ok",
            "F_SEAL_{seal} was added: {report}"
        );
    }
    assert_eq!(
        report["blocks_after_close"], 0,
        "the client kept its dma memory: {report}"
    );
    assert_eq!(
        report["read_after_close"], "0000000000000000000000",
        "the data is gone: {report}"
    );
}

#[tokio::test]
async fn a_process_that_became_another_program_is_refused_at_admission() {
    let broker = Broker::start();
    let run_dir = broker.run_dir();
    let first = broker.copy_program(&hostile(), "hostile_client");
    // The same bytes in another file: another program as the kernel knows it (and one whose
    // SHA-256 is the same, which must not help it).
    let second = broker.copy_program(&hostile(), "hostile_client_again");
    let out = broker.run_as(
        NOBODY,
        &first,
        &["exec", run_dir.to_str().unwrap(), second.to_str().unwrap()],
    );
    let report: Value = serde_json::from_str(&stdout_ok(&out)).unwrap();
    assert_eq!(report["open_status"], 2, "NOT_PRIVILEGED expected: {report}");
    let message = report["open_message"].as_str().unwrap();
    assert!(message.contains("has become another program"), "{report}");
    assert_eq!(report["goodbye_status"], 2, "the session is closed: {report}");
    assert!(broker.log().contains("has become another program since it connected"));
}

#[test]
fn a_bind_mount_over_an_allowed_path_does_not_make_the_allowed_program() {
    // The genuine program and an impostor: both copies of the CLI, so both can make the call.
    let policy_dir = portcullis_tests::tempdir_named("portcullis-exe-");
    std::fs::set_permissions(policy_dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let allowed = policy_dir.path().join("allowed");
    let impostor = policy_dir.path().join("impostor");
    for copy in [&allowed, &impostor] {
        std::fs::copy(bin(), copy).unwrap();
        std::fs::set_permissions(copy, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    let policy = format!(
        "[[principal]]\nname = \"the-program\"\nuid = [{NOBODY}]\nexe = [\"{}\"]\n\n[[rule]]\nid = \"program-adds\"\neffect = \"allow\"\nprincipals = [\"the-program\"]\nmethods = [\"add\"]\n",
        allowed.display()
    );
    let broker = Broker::with(BrokerSetup {
        policy: Some(&policy),
        ..BrokerSetup::default()
    });
    let run_dir = broker.run_dir();
    let call = format!("call sample0 add --scalar 2 --scalar 3 --run-dir {}", run_dir.display());
    let as_nobody = format!("setpriv --reuid={NOBODY} --regid={NOBODY} --clear-groups");
    // The genuine program is admitted.
    let genuine = Command::new("sh")
        .arg("-c")
        .arg(format!("exec {as_nobody} {} {call}", allowed.display()))
        .output()
        .unwrap();
    assert_eq!(stdout_ok(&genuine).trim(), "5");
    // In a private mount namespace the impostor is mounted over the allowed path: the peer's
    // /proc/<pid>/exe names the allowed path, but it is another file.
    let attack = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(format!(
            "mount --bind {impostor} {allowed} && exec {as_nobody} {allowed} {call}",
            impostor = impostor.display(),
            allowed = allowed.display()
        ))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&attack.stderr);
    assert_eq!(
        attack.status.code(),
        Some(1),
        "the impostor was admitted: {}{stderr}",
        String::from_utf8_lossy(&attack.stdout)
    );
    assert!(stderr.contains("sample0"), "{stderr}");
}

/// Builds tests/c/cloexec.c against libportcullis (once per test run); returns the program.
fn c_cloexec_program() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT.get_or_init(build_c_cloexec).clone()
}

fn build_c_cloexec() -> PathBuf {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/c-cloexec");
    std::fs::create_dir_all(&dir).unwrap();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let make = Command::new("make")
        .arg("-s")
        .arg("-C")
        .arg(root.join("shims/c"))
        .arg(format!("BUILD={}", dir.display()))
        .arg("all")
        .output()
        .unwrap();
    assert!(make.status.success(), "{}", String::from_utf8_lossy(&make.stderr));
    let program = dir.join("cloexec");
    let cc = Command::new("cc")
        .args(["-std=c99", "-Wall", "-Wextra", "-Werror", "-I"])
        .arg(root.join("shims/c/include"))
        .arg(root.join("tests/c/cloexec.c"))
        .arg(dir.join("libportcullis.a"))
        .arg("-o")
        .arg(&program)
        .output()
        .unwrap();
    assert!(cc.status.success(), "{}", String::from_utf8_lossy(&cc.stderr));
    program
}

#[test]
fn c_client_descriptors_are_close_on_exec() {
    let broker = Broker::start();
    let program = c_cloexec_program();
    let out = Command::new(&program).arg(broker.run_dir()).output().unwrap();
    let stdout = stdout_ok(&out);
    // The program holds the socket, a mapping's pages and the ring's three descriptors: it
    // checks each descriptor it has, and that an exec'd child inherits none.
    assert!(stdout.contains("descriptors checked: "), "{stdout}");
    assert!(
        stdout.contains("inheritable: 0\n"),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("child sees: 0\n"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_root_session_is_unaffected_by_a_hostile_one() {
    // The hostile client's attempts leave the broker serving everyone, holding nothing.
    let broker = Broker::start();
    let run_dir = broker.run_dir();
    // The driver keeps its registers page once made: make it before the baseline.
    {
        let mut first = NativeSession::connect(&run_dir, AbiId::native()).await.unwrap();
        let sample = first.find("sample0").await.unwrap().remove(0);
        let handle = first.open(sample.id, false).await.unwrap();
        first.map_memory(handle, 0).await.unwrap();
    }
    broker.assert_no_leaks(u64::MAX);
    let baseline = broker.baseline_fds();
    hostile_as_nobody(&broker, &["registers", run_dir.to_str().unwrap()]);
    hostile_as_nobody(&broker, &["dma", run_dir.to_str().unwrap()]);
    let (session, sample) = broker.open("sample0", OpenMode::Shared).await;
    let out = session.call_named(&sample, "add", &[2, 3], &[]).await.unwrap();
    assert_eq!(out.scalars, vec![5]);
    drop(session);
    broker.assert_no_leaks(baseline);
}

/// Starts `portcullis ARGS`, which must fail: its stderr. A broker still running after 20 s
/// (a bound on a hang) fails the test.
fn broker_must_refuse(args: &[&std::ffi::OsStr]) -> String {
    let mut child = Command::new(bin())
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut stderr = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
            assert_eq!(status.code(), Some(1), "{stderr}");
            return stderr;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the broker started where it must refuse");
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

fn mode(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

#[test]
fn run_dir_through_a_symlink_or_writable_by_others_is_refused_and_left_alone() {
    use std::os::unix::fs::PermissionsExt;
    let dir = portcullis_tests::tempdir();
    let target = dir.path().join("target");
    std::fs::create_dir(&target).unwrap();
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o700)).unwrap();
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let stderr = broker_must_refuse(&["broker".as_ref(), "--run-dir".as_ref(), link.as_os_str()]);
    assert!(stderr.contains("is a symbolic link"), "{stderr}");
    assert_eq!(mode(&target), 0o700, "the link's target was changed");
    assert!(!target.join("grpc.sock").exists());

    let open = dir.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let stderr = broker_must_refuse(&["broker".as_ref(), "--run-dir".as_ref(), open.as_os_str()]);
    assert!(stderr.contains("writable by others"), "{stderr}");
    assert_eq!(mode(&open), 0o777);
}

#[test]
fn an_existing_run_dir_keeps_its_mode_and_a_new_one_is_0755() {
    use std::os::unix::fs::PermissionsExt;
    let broker = Broker::start();
    assert_eq!(mode(&broker.run_dir()), 0o755, "the run dir the broker made");
    let dir = portcullis_tests::tempdir();
    let own = dir.path().join("own");
    std::fs::create_dir(&own).unwrap();
    std::fs::set_permissions(&own, std::fs::Permissions::from_mode(0o700)).unwrap();
    let mut child = Command::new(bin())
        .args(["broker", "--run-dir"])
        .arg(&own)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(own.join("grpc.sock")).is_err() {
        assert!(child.try_wait().unwrap().is_none(), "the broker exited");
        assert!(std::time::Instant::now() < deadline, "the broker never served");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(
        mode(&own),
        0o700,
        "a directory the broker did not create keeps its mode"
    );
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn decision_log_is_never_opened_through_a_symlink_and_is_created_0640() {
    let dir = portcullis_tests::tempdir();
    let victim = dir.path().join("victim");
    std::fs::write(&victim, "important\n").unwrap();
    let link = dir.path().join("decisions.log");
    std::os::unix::fs::symlink(&victim, &link).unwrap();
    let run = dir.path().join("run");
    let stderr = broker_must_refuse(&[
        "broker".as_ref(),
        "--run-dir".as_ref(),
        run.as_os_str(),
        "--decision-log".as_ref(),
        link.as_os_str(),
    ]);
    assert!(stderr.contains("symbolic link"), "{stderr}");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "important\n");

    let log = dir.path().join("fresh.log");
    let broker = Broker::with(BrokerSetup {
        args: &["--decision-log", log.to_str().unwrap()],
        ..BrokerSetup::default()
    });
    // 0640 less the umask: never readable by other users (it names every client's uid, pid
    // and executable).
    let created = mode(&log);
    assert_eq!(created & !0o640, 0, "created {created:o}");
    drop(broker);
}

#[test]
fn a_huge_executable_is_hashed_only_when_the_policy_asks_and_then_not_past_the_limit() {
    // The CLI padded with a sparse GiB: a program the kernel runs, 1 GiB long, that costs its
    // author nothing and would cost the broker most of a second to hash.
    let dir = portcullis_tests::tempdir_named("portcullis-huge-");
    let huge = dir.path().join("huge");
    std::fs::copy(bin(), &huge).unwrap();
    let file = std::fs::OpenOptions::new().write(true).open(&huge).unwrap();
    file.set_len(file.metadata().unwrap().len() + (1 << 30)).unwrap();
    drop(file);
    std::fs::set_permissions(&huge, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let call = |broker: &Broker| {
        Command::new(&huge)
            .args(["call", "sample0", "add", "--scalar", "2", "--scalar", "3", "--run-dir"])
            .arg(broker.run_dir())
            .output()
            .unwrap()
    };
    // A policy that names no exe_sha256: nothing is hashed.
    let broker = Broker::start();
    assert_eq!(stdout_ok(&call(&broker)).trim(), "5");
    assert!(!broker.log().contains("not hashed"), "{}", broker.log());
    drop(broker);
    // One that does: the executable is over the limit, so it is not hashed, and it says why.
    let policy = "[[principal]]\nname = \"signed\"\nuid = [0]\nexe_sha256 = [\"0000000000000000000000000000000000000000000000000000000000000000\"]\n\n[[principal]]\nname = \"all\"\n\n[[rule]]\nid = \"all-add\"\neffect = \"allow\"\nprincipals = [\"all\"]\nmethods = [\"add\"]\n";
    let broker = Broker::with(BrokerSetup {
        policy: Some(policy),
        ..BrokerSetup::default()
    });
    assert_eq!(stdout_ok(&call(&broker)).trim(), "5");
    assert!(
        broker
            .log()
            .contains("executable not hashed: larger than max_exe_hash_bytes"),
        "{}",
        broker.log()
    );
}

#[test]
fn an_unprivileged_client_finds_its_own_broker_with_no_option() {
    // $XDG_RUNTIME_DIR/portcullis is where a user's own broker serves: here, the test broker.
    let broker = Broker::start();
    let xdg = broker.private_dir().join("xdg");
    std::fs::create_dir_all(&xdg).unwrap();
    std::os::unix::fs::symlink(broker.run_dir(), xdg.join("portcullis")).unwrap();
    std::fs::set_permissions(&xdg, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let env = |cmd: &mut Command| {
        use std::os::unix::process::CommandExt;
        cmd.env_remove("PORTCULLIS_RUN_DIR")
            .env("XDG_RUNTIME_DIR", &xdg)
            .uid(NOBODY)
            .gid(NOBODY);
    };
    // The CLI (the Rust client's rule)...
    let cli = broker.copy_program(&bin(), "portcullis");
    let mut ls = Command::new(&cli);
    ls.arg("ls");
    env(&mut ls);
    assert!(stdout_ok(&portcullis_tests::output_retrying_busy(&mut ls)).contains("sample0"));
    // ...and the C library's, the same.
    let c = broker.copy_program(&c_cloexec_program(), "cloexec");
    let mut run = Command::new(&c);
    run.arg("-");
    env(&mut run);
    let out = portcullis_tests::output_retrying_busy(&mut run);
    assert!(stdout_ok(&out).contains("inheritable: 0"));
}

#[test]
fn rust_client_descriptors_are_close_on_exec() {
    let broker = Broker::start();
    let run_dir = broker.run_dir();
    let report = hostile_as_nobody(&broker, &["cloexec", run_dir.to_str().unwrap()]);
    // The gRPC and native sockets, two memory descriptors, the ring's three.
    assert!(report["opened"].as_u64().unwrap() >= 7, "{report}");
    assert_eq!(report["inheritable"], serde_json::json!([]), "{report}");
}
