//! Adds two numbers on the sample device, with the blocking client.
//!
//! Run a broker (`cargo run --release -- broker`), then:
//! `cargo run -p portcullis-client --example add -- 2 3`
//! The run dir is `$PORTCULLIS_RUN_DIR`, or the broker's default.

#![forbid(unsafe_code)]

use std::path::Path;

use portcullis_client::{ClientError, OpenMode, blocking::Client, default_run_dir, matching};

/// Connects to the broker at `run_dir`, opens `sample0` and returns `a + b` as it computed it.
pub fn add(run_dir: &Path, a: u64, b: u64) -> Result<u64, ClientError> {
    let client = Client::connect(run_dir)?;
    let session = client.session()?;
    let sample = session.find_one(matching::by_name("sample0"))?;
    let user_client = session.open(sample.id, OpenMode::Shared)?;
    let out = session.call_named(&user_client, "add", &[a, b], &[])?;
    session.close(&user_client)?;
    out.scalars
        .first()
        .copied()
        .ok_or_else(|| ClientError::Protocol("add returned no scalar".into()))
}

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let numbers: Vec<Result<u64, _>> = args.iter().map(|a| a.parse::<u64>()).collect();
    let [Ok(a), Ok(b)] = numbers.as_slice() else {
        eprintln!("usage: add A B   (two unsigned integers; got {args:?})");
        return std::process::ExitCode::from(2);
    };
    match add(&default_run_dir(), *a, *b) {
        Ok(sum) => {
            println!("{a} + {b} = {sum}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("add: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
