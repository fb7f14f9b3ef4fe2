//! Many clients at once: 16, 32 and 64 apps, each its own process and its own uid, calling
//! `add` over the native socket — against the broker, and against the raw `SOCK_SEQPACKET` peer
//! that answers with the broker's own bytes (as in the `native` benchmark). Both are served by
//! the broker's runtime in this process, and both are called by the same client code.
//!
//! Two measures for each count, contenders alternating round by round (which goes first, too):
//! - **fairness**: every client calls in a closed loop for the same window; Jain's index of the
//!   calls each client completed (1 when all completed as many, 1/n when one took everything);
//! - **latency at equal throughput**: every client calls on a fixed schedule, together a quarter
//!   of what the broker completed in the closed loop, halved until both contenders keep to the
//!   schedule (a load the machine does not carry measures a growing backlog, not a call); the
//!   same schedule against both contenders, the clients' schedules a share of the interval apart
//!   (calls arrive evenly spread); the p99 over all clients of each call's latency from its
//!   scheduled start (a call held up by a late one before it counts its wait).

use std::{
    io::{BufRead, BufReader, Write},
    os::{fd::OwnedFd, unix::process::CommandExt},
    path::Path,
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
};

use portcullis_broker::transport::native;
use portcullis_proto::{
    frame::{Body, ClientFrame, Hello, MAX_FRAME, PROTOCOL_VERSION, Request, RequestFrame, ServerFrame, encode},
    layout::AbiId,
};
use rustix::{
    net::{AddressFamily, RecvFlags, SendFlags, SocketAddrUnix, SocketType},
    thread::ClockId,
};
use tokio_seqpacket::UnixSeqpacketListener;

use crate::{core, policy::median, server_runtime};

/// The first client's uid; client `i` runs as `FIRST_UID + i`, a user of its own.
const FIRST_UID: u32 = 71_000;

/// The counts of clients measured.
const COUNTS: &[usize] = &[16, 32, 64];

/// The paced runs' first throughput, as a share of what the broker completed in the closed
/// loop. A paced client sleeps between calls, and on two CPUs its wake-ups cost more than the
/// calls: a share the machine does not carry leaves every call later than the one before, and
/// p99 measures the backlog at the end of the window (seconds), not a call. So the share is
/// halved until both contenders keep up (see [`keeps_up`]), at most [`HALVINGS`] times.
const PACED_SHARE: f64 = 0.25;
const HALVINGS: usize = 6;

/// The socket names in the run directory.
const BROKER: &str = "native.sock";
const PEER: &str = "peer.sock";

fn now_ns() -> u64 {
    let t = rustix::time::clock_gettime(ClockId::Monotonic);
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

fn sleep_until(ns: u64) {
    let at = rustix::time::Timespec {
        tv_sec: (ns / 1_000_000_000) as i64,
        tv_nsec: (ns % 1_000_000_000) as i64,
    };
    while rustix::thread::clock_nanosleep_absolute(ClockId::Monotonic, &at).is_err() {}
}

/// A blocking native connection: the same code against both contenders.
struct Conn {
    fd: OwnedFd,
    buf: Vec<u8>,
}

impl Conn {
    fn connect(path: &Path) -> Conn {
        let fd = rustix::net::socket(AddressFamily::UNIX, SocketType::SEQPACKET, None).unwrap();
        rustix::net::connect(&fd, &SocketAddrUnix::new(path).unwrap()).unwrap();
        Conn {
            fd,
            buf: vec![0; MAX_FRAME + 1],
        }
    }

    fn send(&self, bytes: &[u8]) {
        rustix::net::send(&self.fd, bytes, SendFlags::empty()).unwrap();
    }

    fn recv(&mut self) -> &[u8] {
        let (n, _) = rustix::net::recv(&self.fd, &mut self.buf[..], RecvFlags::empty()).unwrap();
        &self.buf[..n]
    }

    fn round_trip(&mut self, frame: &ClientFrame) -> ServerFrame {
        self.send(&encode(frame).unwrap());
        ServerFrame::decode(self.recv()).unwrap()
    }
}

fn request(request: Request) -> ClientFrame {
    ClientFrame::Request(RequestFrame { id: 1, request })
}

fn add(handle: u64) -> ClientFrame {
    request(Request::Call {
        handle,
        selector: 0,
        scalars: vec![2, 3],
        struct_in: vec![],
        struct_out_len: 0,
    })
}

/// Says hello, finds and opens `sample0`: the handle to call.
fn open_sample(c: &mut Conn) -> u64 {
    c.round_trip(&ClientFrame::Hello(Hello {
        version: PROTOCOL_VERSION,
        abi: AbiId::native() as u8,
    }));
    let ServerFrame::Response(found) = c.round_trip(&request(Request::FindServices {
        class: String::new(),
        name: "sample0".into(),
    })) else {
        panic!("no answer to FindServices")
    };
    let Body::Found(found) = found.body else {
        panic!("{:?}", found.body)
    };
    let ServerFrame::Response(opened) = c.round_trip(&request(Request::Open {
        service: found[0].id,
        exclusive: false,
    })) else {
        panic!("no answer to Open")
    };
    let Body::Opened { handle, .. } = opened.body else {
        panic!("{:?}", opened.body)
    };
    handle
}

/// One client, run as its own uid: connects to both contenders, says `ready`, then for each
/// line `go broker|peer START_NS END_NS INTERVAL_NS` on its input calls `add` from START to END
/// (in a closed loop when INTERVAL is 0, else once every INTERVAL) and answers with a line: the
/// calls it completed, then each call's latency in ns when paced.
pub(crate) fn client(run_dir: &Path) {
    let mut broker = Conn::connect(&run_dir.join(BROKER));
    let handle = open_sample(&mut broker);
    let mut peer = Conn::connect(&run_dir.join(PEER));
    let frame = encode(&add(handle)).unwrap();
    let expected = {
        broker.send(&frame);
        let answer = broker.recv().to_vec();
        let ServerFrame::Response(r) = ServerFrame::decode(&answer).unwrap() else {
            panic!()
        };
        assert_eq!(
            r.body,
            Body::Call {
                scalars: vec![5],
                struct_out: vec![]
            }
        );
        answer
    };
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready").unwrap();
    out.flush().unwrap();
    for line in std::io::stdin().lock().lines() {
        let line = line.unwrap();
        let words: Vec<&str> = line.split_whitespace().collect();
        let [_, target, start, end, interval] = words[..] else {
            panic!("bad command {line:?}")
        };
        let conn = if target == "broker" { &mut broker } else { &mut peer };
        let (start, end, interval): (u64, u64, u64) =
            (start.parse().unwrap(), end.parse().unwrap(), interval.parse().unwrap());
        let mut latencies = Vec::new();
        let mut calls = 0u64;
        sleep_until(start);
        let mut due = start;
        loop {
            if interval > 0 {
                sleep_until(due);
            }
            let sent = if interval > 0 { due } else { now_ns() };
            if sent >= end {
                break;
            }
            conn.send(&frame);
            // Every answer is checked: the same bytes from both contenders.
            assert_eq!(conn.recv(), &expected[..]);
            calls += 1;
            if interval > 0 {
                latencies.push(now_ns() - sent);
                due += interval;
            }
        }
        write!(out, "{calls}").unwrap();
        for l in latencies {
            write!(out, " {l}").unwrap();
        }
        writeln!(out).unwrap();
        out.flush().unwrap();
    }
}

struct Clients(Vec<(Child, ChildStdin, BufReader<ChildStdout>)>);

impl Drop for Clients {
    fn drop(&mut self) {
        for (child, _, _) in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// What one phase measured: calls per client, and every paced call's latency (ns).
struct Phase {
    calls: Vec<u64>,
    latencies: Vec<u64>,
}

impl Clients {
    fn start(program: &Path, dir: &Path, n: usize) -> Clients {
        let mut clients = Clients(Vec::new());
        for i in 0..n {
            let uid = FIRST_UID + i as u32;
            let mut child = Command::new(program)
                .arg("--many-clients-client")
                .arg(dir)
                .uid(uid)
                .gid(uid)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let stdin = child.stdin.take().unwrap();
            let stdout = BufReader::new(child.stdout.take().unwrap());
            clients.0.push((child, stdin, stdout));
        }
        for (_, _, stdout) in &mut clients.0 {
            let mut said = String::new();
            stdout.read_line(&mut said).unwrap();
            assert_eq!(said.trim(), "ready", "a client did not start");
        }
        clients
    }

    /// Every client calls `target` for `window_ns`, paced at `interval_ns` (0: closed loop).
    fn phase(&mut self, target: &str, window_ns: u64, interval_ns: u64) -> Phase {
        // A common start a little ahead, so that every client has read its command. Paced
        // clients start a share of the interval apart: calls arrive evenly spread, not all
        // clients at once (a burst that would measure how long the last of it waits).
        let start = now_ns() + 50_000_000;
        let end = start + window_ns;
        let n = self.0.len() as u64;
        for (i, (_, stdin, _)) in (0u64..).zip(&mut self.0) {
            let start = start + interval_ns * i / n;
            writeln!(stdin, "go {target} {start} {end} {interval_ns}").unwrap();
            stdin.flush().unwrap();
        }
        let mut phase = Phase {
            calls: Vec::new(),
            latencies: Vec::new(),
        };
        for (_, _, stdout) in &mut self.0 {
            let mut line = String::new();
            stdout.read_line(&mut line).unwrap();
            let mut words = line.split_whitespace().map(|w| w.parse::<u64>().unwrap());
            phase.calls.push(words.next().expect("a client died"));
            phase.latencies.extend(words);
        }
        phase
    }
}

/// Jain's fairness index of the calls each client completed.
fn jain(calls: &[u64]) -> f64 {
    let sum: f64 = calls.iter().map(|&c| c as f64).sum();
    let squares: f64 = calls.iter().map(|&c| (c as f64).powi(2)).sum();
    sum * sum / (calls.len() as f64 * squares)
}

fn p99_us(latencies: &mut [u64]) -> f64 {
    latencies.sort_unstable();
    latencies[((latencies.len() - 1) as f64 * 0.99).round() as usize] as f64 / 1e3
}

/// Whether a paced run's calls kept to their schedule: a client whose p99 call takes longer
/// than its own interval starts its next call late, and the lateness adds up over the window.
fn keeps_up(latencies: &mut [u64], interval_ns: u64) -> bool {
    p99_us(latencies) * 1e3 < interval_ns as f64
}

/// Whether a trial round kept to its schedule with room to spare (p99 under half the
/// interval): a load that only just keeps up in the trial falls behind in some later round.
fn keeps_up_with_room(latencies: &mut [u64], interval_ns: u64) -> bool {
    keeps_up(latencies, interval_ns / 2)
}

/// The figures of one count of clients.
pub(crate) struct Figures {
    pub(crate) clients: usize,
    pub(crate) p99_ratio: f64,
    pub(crate) jain: f64,
}

pub(crate) fn run(quick: bool) -> Vec<Figures> {
    println!("### Many clients: latency at equal throughput and fairness\n");
    let dir = crate::shared_tempdir("portcullis-bench-clients-");
    let servers = server_runtime();
    servers.block_on(async {
        let listener = native::bind(&dir.path().join(BROKER)).unwrap();
        tokio::spawn(native::serve(
            core(),
            listener,
            Default::default(),
            std::future::pending(),
        ));
        let peer_path = dir.path().join(PEER);
        let raw = UnixSeqpacketListener::bind(&peer_path).unwrap();
        std::fs::set_permissions(&peer_path, std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap();
        // The peer answers every packet with the broker's answer to `add`, which every client
        // captured first and checks: the packet's first bytes are the request's, and the
        // answer's id is the request's (1).
        let answer = {
            let mut c = Conn::connect(&dir.path().join(BROKER));
            let handle = open_sample(&mut c);
            c.send(&encode(&add(handle)).unwrap());
            c.recv().to_vec()
        };
        crate::native::serve_raw_peer(raw, answer);
    });
    // The clients are this program, copied where their uids may run it.
    let program = dir.path().join("client");
    std::fs::copy(std::env::current_exe().unwrap(), &program).unwrap();
    let (window, rounds, paced_window, paced_rounds) = if quick {
        (1_500_000_000, 2, 1_000_000_000, 5)
    } else {
        (4_000_000_000, 3, 3_000_000_000, 7)
    };
    println!(
        "Each count: {rounds} rounds per contender, alternating, of a {:.1} s closed loop, then {paced_rounds} of a {:.1} s paced run \
         at {:.0}% of the broker's closed-loop throughput, halved until both contenders keep to their schedule in a trial \
         (a client's p99 under half its interval; p99: the median of the rounds'; ratio: the median of each round's). \
         Every client is its own process and uid.\n",
        window as f64 / 1e9,
        paced_window as f64 / 1e9,
        PACED_SHARE * 100.0
    );
    println!(
        "| clients | closed loop: broker calls/s | peer calls/s | broker Jain (min–max calls per client) | peer Jain | \
         paced calls/s (share of the closed loop) | paced runs that fell behind | broker p99 µs | peer p99 µs | p99 ratio |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let mut figures = Vec::new();
    let mut share = PACED_SHARE;
    for &n in COUNTS {
        let mut clients = Clients::start(&program, dir.path(), n);
        let (mut b_calls, mut p_calls) = (Vec::new(), Vec::new());
        // Each round, the contender that goes first changes: neither always follows the other.
        let order = |round: usize| {
            if round.is_multiple_of(2) {
                ["broker", "peer"]
            } else {
                ["peer", "broker"]
            }
        };
        for round in 0..rounds {
            for target in order(round) {
                let calls = clients.phase(target, window, 0).calls;
                if target == "broker" { &mut b_calls } else { &mut p_calls }.push(calls);
            }
        }
        let total =
            |runs: &[Vec<u64>]| runs.iter().flatten().sum::<u64>() as f64 / (runs.len() as f64 * window as f64 / 1e9);
        let (b_rate, p_rate) = (total(&b_calls), total(&p_calls));
        // Fairness over the whole run: each client's calls summed over the rounds.
        let per_client = |runs: &[Vec<u64>]| (0..n).map(|i| runs.iter().map(|r| r[i]).sum()).collect::<Vec<u64>>();
        let (b_each, p_each) = (per_client(&b_calls), per_client(&p_calls));
        let (b_jain, p_jain) = (jain(&b_each), jain(&p_each));
        // The highest share of the closed-loop rate (halving from the share the fewer clients
        // were measured at, PACED_SHARE for the first count) that both contenders keep up with
        // in a trial round. Never more than for fewer clients: with more clients each one's
        // interval is longer, and a trial passes at a total load the machine carries only
        // just (64 clients at 12.5% passed and fell behind in 5 and 8 of 14 later rounds).
        let interval = loop {
            let interval = (n as f64 / (b_rate * share) * 1e9) as u64;
            let kept = ["broker", "peer"].iter().all(|target| {
                keeps_up_with_room(
                    &mut clients.phase(target, paced_window / 3, interval).latencies,
                    interval,
                )
            });
            if kept || share <= PACED_SHARE / f64::from(1 << HALVINGS) {
                break interval;
            }
            share /= 2.0;
        };
        // Each round's p99 per contender, and their ratio: a round that the machine disturbed
        // (a stall of milliseconds lands on one contender's phase) moves the median little.
        let (mut b_p99s, mut p_p99s, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        let mut behind = 0;
        for round in 0..paced_rounds {
            let mut p99 = [0.0; 2];
            for target in order(round) {
                let mut latencies = clients.phase(target, paced_window, interval).latencies;
                behind += usize::from(!keeps_up(&mut latencies, interval));
                p99[usize::from(target == "peer")] = p99_us(&mut latencies);
            }
            b_p99s.push(p99[0]);
            p_p99s.push(p99[1]);
            ratios.push(p99[0] / p99[1]);
        }
        let (b_p99, p_p99, ratio) = (median(b_p99s), median(p_p99s), median(ratios));
        let range = |v: &[u64]| {
            let per_round = |c: u64| c / rounds as u64;
            format!(
                "{}–{}",
                per_round(*v.iter().min().unwrap()),
                per_round(*v.iter().max().unwrap())
            )
        };
        println!(
            "| {n} | {b_rate:.0} | {p_rate:.0} | **{b_jain:.3}** ({}) | {p_jain:.3} ({}) | {:.0} ({:.1}%) | {behind} of {} | {b_p99:.1} | {p_p99:.1} | **{:.2}×** |",
            range(&b_each),
            range(&p_each),
            n as f64 * 1e9 / interval as f64,
            share * 100.0,
            paced_rounds * 2,
            ratio
        );
        figures.push(Figures {
            clients: n,
            p99_ratio: ratio,
            jain: b_jain,
        });
    }
    println!("\nTargets: p99 ≤ 1.2× the peer's at equal throughput; Jain's index ≥ 0.9.\n");
    figures
}
