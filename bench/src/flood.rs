//! One user at its limits does not slow the others: the p99 of a client's `add` round trips
//! over the native socket, with another uid flooding the broker (every connection its uid may
//! hold, each sending `add` as fast as the broker answers, and more connections refused) and
//! without — the same flooder, stopped (`SIGSTOP`) and resumed (`SIGCONT`) round by round, so
//! that both conditions share the run. Target: p99 with the flood ≤ 2× without.

use std::{
    os::unix::process::CommandExt,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use portcullis_broker::transport::native;
use portcullis_client::native::NativeSession;
use portcullis_proto::layout::AbiId;

use crate::{Args, client_runtime, core, server_runtime, summarize};

/// The flooder's uid.
const NOBODY: u32 = 65534;

/// Connections the flooder opens (the default per-uid limit is 64: it holds them all and is
/// refused the rest).
const FLOOD_CONNECTIONS: usize = 80;

/// The flooder, run as another uid: floods until killed.
pub(crate) fn client(run_dir: &Path) {
    client_runtime().block_on(async {
        let mut tasks = Vec::new();
        let mut refused = 0;
        for _ in 0..FLOOD_CONNECTIONS {
            let Ok(mut s) = NativeSession::connect(run_dir, AbiId::native()).await else {
                refused += 1;
                continue;
            };
            let Ok(sample) = s.find("sample0").await else { continue };
            let Some(sample) = sample.first() else { continue };
            let Ok(handle) = s.open(sample.id, false).await else {
                continue;
            };
            tasks.push(tokio::spawn(async move {
                loop {
                    if s.call(handle, 0, &[2, 3], &[], 0).await.is_err() {
                        return;
                    }
                }
            }));
        }
        println!("flooding on {} connections, {refused} refused", tasks.len());
        std::future::pending::<()>().await;
    });
}

struct Flooder(Child);

impl Drop for Flooder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Flooder {
    fn signal(&self, signal: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_raw(self.0.id() as i32).unwrap();
        rustix::process::kill_process(pid, signal).unwrap();
    }
}

pub(crate) fn run(args: &Args) {
    println!("### One user at its limits does not slow the others\n");
    let dir = crate::shared_tempdir("portcullis-bench-flood-");
    let servers = server_runtime();
    {
        let _guard = servers.enter();
        let listener = native::bind(&dir.path().join(portcullis_client::NATIVE_SOCKET)).unwrap();
        servers.spawn(native::serve(
            core(),
            listener,
            Default::default(),
            std::future::pending(),
        ));
    }
    // The flooder is this program, copied where the other uid may run it.
    let program = dir.path().join("flooder");
    std::fs::copy(std::env::current_exe().unwrap(), &program).unwrap();
    let mut child = Command::new(&program)
        .arg("--flood-as-client")
        .arg(dir.path())
        .uid(NOBODY)
        .gid(NOBODY)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut said = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut said).unwrap();
    let flooder = Flooder(child);
    let runtime = client_runtime();
    let mut victim = runtime.block_on(async {
        let mut s = NativeSession::connect(dir.path(), AbiId::native()).await.unwrap();
        let sample = s.find("sample0").await.unwrap().remove(0);
        let handle = s.open(sample.id, false).await.unwrap();
        (s, handle)
    });
    let (mut quiet, mut flooded) = (Vec::new(), Vec::new());
    let mut round = |samples: &mut Vec<Duration>| {
        runtime.block_on(async {
            for _ in 0..args.iters {
                let start = Instant::now();
                victim.0.call(victim.1, 0, &[2, 3], &[], 0).await.unwrap();
                samples.push(start.elapsed());
            }
        });
    };
    for _ in 0..args.rounds {
        flooder.signal(rustix::process::Signal::STOP);
        round(&mut quiet);
        flooder.signal(rustix::process::Signal::CONT);
        round(&mut flooded);
    }
    drop(flooder);
    let (q, f) = (summarize(&mut quiet), summarize(&mut flooded));
    println!("the flooder (uid {NOBODY}): {}", said.trim());
    println!(
        "{} rounds × {} sequential `add` round trips by a root client, flooder stopped and running in turns\n",
        args.rounds, args.iters
    );
    println!("| the other client's `add` | p50 µs | p99 µs | p99.9 µs |");
    println!("|---|---|---|---|");
    for (name, s) in [("flooder stopped", &q), ("flooder running", &f)] {
        println!(
            "| {name} | {:.1} | {:.1} | {:.1} |",
            s.p50.as_secs_f64() * 1e6,
            s.p99.as_secs_f64() * 1e6,
            s.p999.as_secs_f64() * 1e6
        );
    }
    let ratio = f.p99.as_secs_f64() / q.p99.as_secs_f64();
    println!(
        "\nratio: p99 {ratio:.2}× (target ≤ 2×: {})\n",
        if ratio <= 2.0 { "met" } else { "NOT met" }
    );
}
