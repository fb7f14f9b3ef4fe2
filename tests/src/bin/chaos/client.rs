//! The clients the kill scenario kills: each does one kind of thing forever and writes a byte
//! to stdout at each stage it reaches, so that the scenario knows where it was killed.
//!
//! Stages: `c` connected, `o` opened (`x`: exclusively), `m` memory mapped, `w` a call
//! pending, `r` a ring live, `p` half a handshake sent, `l` a call loop running; `!` an error
//! no client of a healthy broker should see (followed by the error).

use std::{io::Write, path::PathBuf, process::ExitCode};

use portcullis_client::{
    Client, ClientError, OpenMode, Status,
    native::NativeSession,
    ring::{RingClient, RingOptions},
};
use portcullis_proto::layout::AbiId;

/// The kinds of client.
pub(crate) const KINDS: [&str; 6] = [
    "grpc-calls",
    "grpc-pending",
    "native-exclusive-mapped",
    "native-pending",
    "ring-live",
    "half-handshake",
];

fn stage(b: u8) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(&[b]);
    let _ = out.flush();
}

/// A refusal a client of a busy device meets (another holds it exclusively): not an error.
fn contended(e: &ClientError) -> bool {
    matches!(e.status(), Some(Status::ExclusiveAccess))
}

fn fail(e: impl std::fmt::Display) -> ExitCode {
    stage(b'!');
    print!("{e}");
    ExitCode::FAILURE
}

pub(crate) fn main(args: &[String]) -> ExitCode {
    let (Some(run_dir), Some(kind)) = (args.first(), args.get(1)) else {
        return ExitCode::from(2);
    };
    let run_dir = PathBuf::from(run_dir);
    if kind == "ring-live" {
        return ring(&run_dir).unwrap_or_else(fail);
    }
    if kind == "half-handshake" {
        let Ok(mut s) = std::os::unix::net::UnixStream::connect(run_dir.join(portcullis_client::GRPC_SOCKET)) else {
            return fail("cannot connect");
        };
        stage(b'c');
        let _ = s.write_all(b"PRI * HTTP/2.0\r\n");
        stage(b'p');
        loop {
            std::thread::park();
        }
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let result = match kind.as_str() {
            "grpc-calls" | "grpc-pending" => grpc(&run_dir, kind == "grpc-pending").await,
            "native-exclusive-mapped" | "native-pending" => native(&run_dir, kind == "native-pending").await,
            _ => return ExitCode::from(2),
        };
        result.unwrap_or_else(fail)
    })
}

/// Waits for the kill.
async fn idle() -> Result<ExitCode, ClientError> {
    std::future::pending().await
}

async fn grpc(run_dir: &std::path::Path, pending: bool) -> Result<ExitCode, ClientError> {
    let client = Client::connect(run_dir).await?;
    let session = client.session().await?;
    stage(b'c');
    let sample = session
        .find_one(portcullis_client::matching::by_name("sample0"))
        .await?;
    let uc = match session.open(sample.id, OpenMode::Exclusive).await {
        Ok(uc) => {
            stage(b'x');
            uc
        }
        Err(e) if contended(&e) => match session.open(sample.id, OpenMode::Shared).await {
            Ok(uc) => uc,
            // Another holds it exclusively: connected is as far as this one gets.
            Err(e) if contended(&e) => return idle().await,
            Err(e) => return Err(e),
        },
        Err(e) => return Err(e),
    };
    stage(b'o');
    if pending {
        stage(b'w');
        session.call_named(&uc, "wait_event", &[600_000], &[]).await?;
    }
    stage(b'l');
    loop {
        match session.call_named(&uc, "echo", &[], &[0x5a; 512]).await {
            Ok(_) => {}
            Err(e) if contended(&e) => {}
            Err(e) => return Err(e),
        }
    }
}

async fn native(run_dir: &std::path::Path, pending: bool) -> Result<ExitCode, ClientError> {
    let mut s = NativeSession::connect(run_dir, AbiId::native()).await?;
    stage(b'c');
    let id = s.find("sample0").await?.first().map(|s| s.id).unwrap_or(0);
    let h = match s.open(id, true).await {
        Ok(h) => {
            stage(b'x');
            h
        }
        Err(e) if contended(&e) => match s.open(id, false).await {
            Ok(h) => h,
            Err(e) if contended(&e) => return idle().await,
            Err(e) => return Err(e),
        },
        Err(e) => return Err(e),
    };
    stage(b'o');
    let dma = s.map_memory(h, 1).await?;
    let _ = rustix::io::pwrite(&dma.fd, &[0xa5; 4096], 0);
    stage(b'm');
    if pending {
        stage(b'w');
        s.call(h, 3, &[600_000], &[], 0).await?;
    }
    stage(b'l');
    loop {
        s.call(h, 8, &[0, 4096], &[], 0).await?;
    }
}

fn ring(run_dir: &std::path::Path) -> Result<ExitCode, ClientError> {
    let mut ring = RingClient::connect(run_dir, RingOptions::default())?;
    stage(b'r');
    let id = ring.find("sample0")?.first().map(|s| s.id).unwrap_or(0);
    let h = match ring.open(id, false) {
        Ok(h) => h,
        // Another holds it exclusively: a live ring is as far as this one gets.
        Err(e) if contended(&e) => loop {
            std::thread::park();
        },
        Err(e) => return Err(e),
    };
    stage(b'o');
    stage(b'l');
    let mut i = 0u64;
    loop {
        // Pipelined: calls in flight in the shared memory when the kill comes.
        for _ in 0..16 {
            ring.submit_call(h, 0, &[i, 1], &[], 0)?;
            i += 1;
        }
        ring.flush()?;
        for _ in 0..16 {
            ring.next_response()?;
        }
    }
}
