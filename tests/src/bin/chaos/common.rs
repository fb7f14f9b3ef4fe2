//! What every scenario needs: leak checks, latency figures, a random source.

use std::time::{Duration, Instant};

use portcullis_client::native::NativeSession;
use portcullis_proto::layout::AbiId;
use portcullis_tests::Broker;

/// Waits (30 s at most) until the broker holds nothing for any client and no more descriptors
/// than `baseline_fds`; says what it still holds otherwise.
pub(crate) fn no_leaks(broker: &Broker, baseline_fds: u64) -> Result<(), String> {
    broker.released(baseline_fds, Duration::from_secs(30))
}

/// The broker's resident memory, in MiB, as it reports it.
pub(crate) fn rss_mib(broker: &Broker) -> f64 {
    broker.stats()["rss_bytes"].as_f64().unwrap_or(0.0) / (1024.0 * 1024.0)
}

/// A fresh client is served: it opens the sample device exclusively and calls it.
pub(crate) fn served(broker: &Broker) -> Result<(), String> {
    let rt = runtime();
    rt.block_on(async {
        let mut s = NativeSession::connect(broker.run_dir(), AbiId::native())
            .await
            .map_err(|e| format!("a fresh client cannot connect: {e}"))?;
        let id = s
            .find("sample0")
            .await
            .map_err(|e| e.to_string())?
            .first()
            .map(|s| s.id)
            .ok_or("no sample0")?;
        let h = s
            .open(id, true)
            .await
            .map_err(|e| format!("a fresh client cannot open sample0 exclusively: {e}"))?;
        let out = s.call(h, 0, &[40, 2], &[], 0).await.map_err(|e| e.to_string())?;
        (out.scalars == [42])
            .then_some(())
            .ok_or_else(|| format!("add answered {:?}", out.scalars))
    })
}

pub(crate) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Bytes of each call to the echo peer, and of its answer: about a native `add`'s frame.
const PEER_FRAME: usize = 64;

/// A plain echo server in a process of its own at the broker's priority (`chaos peer SOCKET`):
/// a multi-thread tokio runtime, a worker per CPU as the broker's, answering each 64-byte read
/// with the same bytes. Measured beside the broker, under the same crowd, it says how much of
/// the paced client's wait the machine adds whatever serves it. Stopped when dropped.
pub(crate) struct Peer {
    child: std::process::Child,
    socket: std::path::PathBuf,
}

impl Peer {
    /// Starts the peer on a socket in `dir`.
    pub(crate) fn start(dir: &std::path::Path) -> Result<Peer, String> {
        use std::io::BufRead;
        let socket = dir.join("peer.sock");
        let mut child = std::process::Command::new(std::env::current_exe().map_err(|e| e.to_string())?)
            .arg("peer")
            .arg(&socket)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| format!("the echo peer: {e}"))?;
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().ok_or("no stdout")?)
            .read_line(&mut line)
            .map_err(|e| e.to_string())?;
        if line.trim() != "ready" {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("the echo peer did not start: {line:?}"));
        }
        Ok(Peer { child, socket })
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `chaos peer SOCKET`: the echo peer's process (see [`Peer`]).
pub(crate) fn peer_main(args: &[String]) -> std::process::ExitCode {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let [socket] = args else {
        eprintln!("usage: chaos peer SOCKET");
        return std::process::ExitCode::from(2);
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let _ = std::fs::remove_file(socket);
        let listener = match tokio::net::UnixListener::bind(socket) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("chaos peer: {socket}: {e}");
                return std::process::ExitCode::FAILURE;
            }
        };
        println!("ready");
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut buf = [0u8; PEER_FRAME];
                while stream.read_exact(&mut buf).await.is_ok() {
                    if stream.write_all(&buf).await.is_err() {
                        break;
                    }
                }
            });
        }
    })
}

/// What a paced client measured: its calls to the broker and, half a period after each, to the
/// echo peer when there is one.
pub(crate) struct Paced {
    pub(crate) broker: Vec<Duration>,
    pub(crate) peer: Vec<Duration>,
}

/// The latencies of a client calling `add` at a normal pace (every `every`) for `for_`: root,
/// a native connection of its own, the sample device opened shared; and, half a period after
/// each call, a call of the same size to `peer`.
pub(crate) fn paced(broker: &Broker, for_: Duration, every: Duration, peer: Option<&Peer>) -> Result<Paced, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rt = runtime();
    rt.block_on(async {
        let mut s = NativeSession::connect(broker.run_dir(), AbiId::native())
            .await
            .map_err(|e| e.to_string())?;
        let id = s
            .find("sample0")
            .await
            .map_err(|e| e.to_string())?
            .first()
            .map(|s| s.id)
            .ok_or("no sample0")?;
        let h = s.open(id, false).await.map_err(|e| e.to_string())?;
        let mut echo = match peer {
            Some(p) => Some(
                tokio::net::UnixStream::connect(&p.socket)
                    .await
                    .map_err(|e| format!("the echo peer: {e}"))?,
            ),
            None => None,
        };
        let mut took = Paced {
            broker: Vec::new(),
            peer: Vec::new(),
        };
        let mut buf = [7u8; PEER_FRAME];
        let end = Instant::now() + for_;
        let mut next = Instant::now();
        while Instant::now() < end {
            let begun = Instant::now();
            s.call(h, 0, &[1, 2], &[], 0)
                .await
                .map_err(|e| format!("the paced client's call failed: {e}"))?;
            took.broker.push(begun.elapsed());
            if let Some(echo) = &mut echo {
                tokio::time::sleep_until((next + every / 2).into()).await;
                let begun = Instant::now();
                echo.write_all(&buf).await.map_err(|e| format!("the echo peer: {e}"))?;
                echo.read_exact(&mut buf)
                    .await
                    .map_err(|e| format!("the echo peer: {e}"))?;
                took.peer.push(begun.elapsed());
            }
            next += every;
            tokio::time::sleep_until(next.into()).await;
        }
        Ok(took)
    })
}

/// The `q` quantile of `samples`, in microseconds.
pub(crate) fn quantile_us(samples: &[Duration], q: f64) -> f64 {
    let mut v: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e6).collect();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return 0.0;
    }
    v[((v.len() - 1) as f64 * q).round() as usize]
}
