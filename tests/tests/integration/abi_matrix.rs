//! The mixed-architecture matrix (tests/abi_matrix): real clients built by each ABI's cross
//! compiler, run under qemu-user against one real broker; and the golden-layout check that
//! every driver struct's layout, as the broker computes it, is what each ABI's compiler says.
//! `cargo xtask test` installs the toolchains listed in tests/abi_matrix/abis.tsv.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use portcullis_proto::layout::ABIS;
use portcullis_tests::{Broker, BrokerSetup, bin};

struct Row {
    abi: String,
    compiler: String,
    runner: String,
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn rows() -> Vec<Row> {
    let text = std::fs::read_to_string(root().join("tests/abi_matrix/abis.tsv")).unwrap();
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let cols: Vec<&str> = l.split('\t').collect();
            Row {
                abi: cols[0].into(),
                compiler: cols[1].into(),
                runner: cols[2].into(),
            }
        })
        .collect()
}

fn require(tool: &str) {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .unwrap()
        .status
        .success();
    assert!(
        found,
        "{tool} is not installed: run the suite with `cargo xtask test`, which installs the matrix toolchains"
    );
}

fn work_dir(name: &str) -> PathBuf {
    let dir = root().join("target/abi-matrix").join(name);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn abi_list_is_the_matrix() {
    let listed: Vec<String> = rows().into_iter().map(|r| r.abi).collect();
    let known: Vec<&str> = ABIS.iter().map(|a| a.name).collect();
    assert_eq!(
        listed, known,
        "tests/abi_matrix/abis.tsv must list every ABI, in wire order"
    );
}

#[test]
fn golden_layouts_match_every_abis_compiler() {
    let dir = work_dir("golden");
    let mut checked = Vec::new();
    for row in rows() {
        require(&row.compiler);
        let asserts = Command::new(bin())
            .args(["schema", "--c-asserts", &row.abi])
            .output()
            .unwrap();
        assert!(asserts.status.success(), "{}", String::from_utf8_lossy(&asserts.stderr));
        let source = dir.join(format!("{}.c", row.abi));
        std::fs::write(&source, &asserts.stdout).unwrap();
        // Freestanding: only the compiler's own headers, so layout-only ABIs need no libc.
        let out = Command::new(&row.compiler)
            .args(["-std=c11", "-ffreestanding", "-fsyntax-only"])
            .arg(&source)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{} disagrees with the broker's layout for {}:\n{}",
            row.compiler,
            row.abi,
            String::from_utf8_lossy(&out.stderr)
        );
        checked.push(row.abi);
    }
    assert_eq!(checked.len(), ABIS.len());
}

/// A command that runs `program` (built for `row`'s ABI): directly, or under its qemu-user.
fn run_on(row: &Row, program: &Path) -> Command {
    if row.runner == "native" {
        return Command::new(program);
    }
    require(&row.runner);
    let mut c = Command::new(&row.runner);
    c.arg(program);
    c
}

/// Builds libportcullis and the matrix client for one ABI; returns the client's path.
fn build_client(row: &Row) -> PathBuf {
    build_program(row, "client")
}

/// Builds libportcullis and `tests/abi_matrix/<name>.c` for one ABI; returns the program.
fn build_program(row: &Row, name: &str) -> PathBuf {
    // Each program in a directory of its own: tests build them at the same time.
    let dir = work_dir(&format!("{name}-{}", row.abi));
    let make = Command::new("make")
        .arg("-s")
        .arg("-C")
        .arg(root().join("shims/c"))
        .arg(format!("CC={}", row.compiler))
        .arg(format!("BUILD={}", dir.display()))
        .arg("all")
        .output()
        .unwrap();
    assert!(
        make.status.success(),
        "{}: libportcullis build failed:\n{}",
        row.abi,
        String::from_utf8_lossy(&make.stderr)
    );
    let client = dir.join(name);
    let cc = Command::new(&row.compiler)
        .args(["-std=c99", "-static", "-O1", "-Wall", "-Wextra", "-Werror"])
        .arg("-I")
        .arg(root().join("shims/c/include"))
        .arg(root().join(format!("tests/abi_matrix/{name}.c")))
        .arg(dir.join("libportcullis.a"))
        .args(["-lm", "-o"])
        .arg(&client)
        .output()
        .unwrap();
    assert!(
        cc.status.success(),
        "{}: {name} build failed:\n{}",
        row.abi,
        String::from_utf8_lossy(&cc.stderr)
    );
    client
}

#[test]
fn c_example_builds_with_make_and_runs() {
    let broker = Broker::start();
    let dir = work_dir("example");
    let make = Command::new("make")
        .arg("-s")
        .arg("-C")
        .arg(root().join("shims/c"))
        .arg(format!("BUILD={}", dir.display()))
        .args(["all", "example"])
        .output()
        .unwrap();
    assert!(make.status.success(), "{}", String::from_utf8_lossy(&make.stderr));
    for built in ["libportcullis.a", "libportcullis.so", "portcullis.pc", "add"] {
        assert!(dir.join(built).exists(), "make did not produce {built}");
    }
    let out = Command::new(dir.join("add")).arg(broker.run_dir()).output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "2 + 3 = 5\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn abi_matrix_clients_run_against_one_broker() {
    let broker = Broker::start();
    let runnable: Vec<Row> = rows().into_iter().filter(|r| r.runner != "layout-only").collect();
    let mut results = Vec::new();
    for row in &runnable {
        require(&row.compiler);
        let client = build_client(row);
        let mut cmd = run_on(row, &client);
        // The broker's ABI, which each client must learn from the Welcome.
        let broker_abi = portcullis_proto::layout::AbiId::native() as u8;
        cmd.arg(broker.run_dir())
            .env("PORTCULLIS_EXPECT_BROKER_ABI", broker_abi.to_string());
        let socket = cmd.output().unwrap();
        // The same client again, upgraded to the shared-memory ring.
        let ring = cmd.arg("ring").output().unwrap();
        let stdout = [&socket, &ring]
            .iter()
            .map(|out| String::from_utf8_lossy(&out.stdout).to_string())
            .collect::<Vec<_>>()
            .join("");
        let ok = socket.status.success()
            && ring.status.success()
            && stdout.contains(&format!(" on {}\n", row.abi))
            && stdout.contains(&format!(" on {} over the ring\n", row.abi));
        results.push((row.abi.clone(), ok, stdout));
    }
    let failed: Vec<String> = results
        .iter()
        .filter(|(_, ok, _)| !ok)
        .map(|(abi, _, out)| format!("{abi}:\n{out}"))
        .collect();
    assert!(failed.is_empty(), "ABI matrix failures:\n{}", failed.join("\n"));
    // The issue's floor: at least 12 ABIs run, including i386, m68k, armhf and three big-endian ones.
    let ran: Vec<&str> = results.iter().map(|(abi, _, _)| abi.as_str()).collect();
    assert!(ran.len() >= 12, "{ran:?}");
    for must in ["i386", "m68k", "armhf"] {
        assert!(ran.contains(&must), "{must} must run: {ran:?}");
    }
    let big_endian = ABIS.iter().filter(|a| a.big_endian && ran.contains(&a.name)).count();
    assert!(big_endian >= 3, "{big_endian} big-endian ABIs ran");
    for (abi, _, out) in &results {
        eprintln!("{abi}: {}", out.trim());
    }
}

/// Sleeping ring calls per ABI: far more than the 255 rings that filled the broker's old
/// eventfd doorbell for a big-endian client under qemu-user.
const SLEEPING_CALLS: &str = "2000";

#[test]
fn abi_matrix_clients_make_thousands_of_sleeping_ring_calls_each_under_50_ms() {
    // The broker in sleep mode: every call finds it asleep, so every call rings its doorbell.
    let broker = Broker::with(BrokerSetup {
        config: Some("[ring]\nwait = \"sleep\"\n\n[[device]]\nname = \"sample0\"\ndriver = \"sample\"\n"),
        ..BrokerSetup::default()
    });
    let runnable: Vec<Row> = rows().into_iter().filter(|r| r.runner != "layout-only").collect();
    let mut failed = Vec::new();
    for row in &runnable {
        require(&row.compiler);
        let client = build_client(row);
        let mut cmd = run_on(row, &client);
        let out = cmd
            .arg(broker.run_dir())
            .args(["sleeping-ring", SLEEPING_CALLS])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        let expect = format!("ok: {SLEEPING_CALLS} sleeping ring calls on {}, ", row.abi);
        if !out.status.success() || !stdout.contains(&expect) {
            failed.push(format!("{}: {stdout}{}", row.abi, String::from_utf8_lossy(&out.stderr)));
        }
        eprint!("{stdout}");
    }
    assert!(failed.is_empty(), "sleeping ring failures:\n{}", failed.join("\n"));
    let big_endian = ABIS
        .iter()
        .filter(|a| a.big_endian && runnable.iter().any(|r| r.abi == a.name))
        .count();
    assert!(big_endian >= 3, "{big_endian} big-endian ABIs ran");
}

const DEVICE_POLICY: &str = r#"
[[principal]]
name = "local"

[[rule]]
id = "devices"
effect = "allow"
principals = ["local"]
methods = ["*"]
memory = ["dma"]
"#;

/// FNV-1a 64.
fn fnv1a(bytes: &[u8]) -> u64 {
    portcullis_tests::fnv1a(bytes)
}

/// Answers the client's tty line: reads `hello from ABI\n` from the pty master and writes back
/// `back to ABI\n`. Polls with a bound, so a client that never writes fails the test instead of
/// hanging it.
fn play_the_tty(master: &std::os::fd::OwnedFd, abi: &str) -> Result<(), String> {
    use rustix::event::{PollFd, PollFlags, Timespec, poll};
    let mut got = Vec::new();
    while !got.ends_with(b"\n") {
        let mut fds = [PollFd::new(master, PollFlags::IN)];
        let bound = Timespec { tv_sec: 60, tv_nsec: 0 };
        if poll(&mut fds, Some(&bound)).map_err(|e| e.to_string())? == 0 {
            return Err(format!("{abi}: nothing on the tty within 60 s"));
        }
        let mut buf = [0u8; 128];
        let n = rustix::io::read(master, &mut buf).map_err(|e| e.to_string())?;
        got.extend_from_slice(&buf[..n]);
    }
    let want = format!("hello from {abi}\n");
    if got != want.as_bytes() {
        return Err(format!("{abi}: the tty got {:?}", String::from_utf8_lossy(&got)));
    }
    rustix::io::write(master, format!("back to {abi}\n").as_bytes()).map_err(|e| e.to_string())?;
    Ok(())
}

#[test]
fn abi_matrix_clients_drive_real_devices() {
    // The hardware: a pty the test holds, a loop device over a file, a TUN in the broker's own
    // network namespace with a UDP echo socket behind it.
    let master = rustix::pty::openpt(
        rustix::pty::OpenptFlags::RDWR | rustix::pty::OpenptFlags::NOCTTY | rustix::pty::OpenptFlags::CLOEXEC,
    )
    .unwrap();
    rustix::pty::grantpt(&master).unwrap();
    rustix::pty::unlockpt(&master).unwrap();
    let follower = rustix::pty::ptsname(&master, Vec::new()).unwrap();
    let contents: Vec<u8> = (0..4u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 9) as u8)
        .collect();
    let disk = portcullis_tests::LoopDevice::attach(&contents, false);
    let config = format!(
        "[[device]]\nname = \"tty0\"\ndriver = \"tty\"\npath = \"{}\"\n\n[[device]]\nname = \"disk0\"\ndriver = \"block\"\npath = \"{}\"\n\n[[device]]\nname = \"net0\"\ndriver = \"net\"\ninterface = \"pc0\"\n",
        follower.to_str().unwrap(),
        disk.path.display()
    );
    let broker = Broker::with(portcullis_tests::BrokerSetup {
        config: Some(&config),
        policy: Some(DEVICE_POLICY),
        wrapper: &["unshare", "--net", "--"],
        ..portcullis_tests::BrokerSetup::default()
    });
    for args in [
        &["link", "set", "pc0", "up"][..],
        &["addr", "add", "192.0.2.1/24", "dev", "pc0"][..],
    ] {
        let out = broker.in_netns("ip", args).output().unwrap();
        assert!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let runnable: Vec<Row> = rows().into_iter().filter(|r| r.runner != "layout-only").collect();
    let (mut echo, _echo_out) = crate::net::udp_echo(&broker, runnable.len() * 2);
    let want_fnv = format!("block fnv: {:016x}", fnv1a(&contents[4096..4096 + 2048]));
    let mut failed = Vec::new();
    for row in &runnable {
        require(&row.compiler);
        let program = build_program(row, "devices");
        for ring in [false, true] {
            let mut cmd = run_on(row, &program);
            cmd.arg(broker.run_dir()).stdout(std::process::Stdio::piped());
            if ring {
                cmd.arg("ring");
            }
            let child = cmd.spawn().unwrap();
            let played = play_the_tty(&master, &row.abi);
            let out = child.wait_with_output().unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout).to_string();
            let mode = if ring { " over the ring" } else { "" };
            let expected = [
                format!("tty read: back to {}\n", row.abi),
                "tty get_modem: UNSUPPORTED\n".to_string(),
                "block shared write_blocks: NOT_WRITABLE\n".to_string(),
                "block geometry: size 4194304 logical 512 read_only 0\n".to_string(),
                format!("{want_fnv}\n"),
                format!("net reply: abi {}\n", row.abi),
                format!("ok: devices on {}{mode}\n", row.abi),
            ];
            let missing: Vec<&String> = expected.iter().filter(|e| !stdout.contains(e.as_str())).collect();
            if played.is_err() || !out.status.success() || !missing.is_empty() {
                failed.push(format!("{}{mode}: {played:?}, missing {missing:?}\n{stdout}", row.abi));
            }
        }
    }
    assert!(failed.is_empty(), "device matrix failures:\n{}", failed.join("\n"));
    let _ = echo.wait();
    assert!(runnable.len() >= 12, "{} ABIs ran", runnable.len());
}
