//! Adds two numbers on the sample device, with the blocking client.
//!
//! Run a broker (`cargo run --release -- broker`), then:
//! `cargo run -p portcullis-client --example add -- 2 3`
//! The run dir is `$PORTCULLIS_RUN_DIR`, or the broker's default.

use portcullis_client::{OpenMode, blocking::Client, default_run_dir, matching};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1).map(|a| a.parse::<u64>());
    let a = args.next().unwrap_or(Ok(2))?;
    let b = args.next().unwrap_or(Ok(3))?;

    let client = Client::connect(default_run_dir())?;
    let session = client.session()?;
    let sample = session.find_one(matching::by_name("sample0"))?;
    let user_client = session.open(sample.id, OpenMode::Shared)?;
    let out = session.call_named(&user_client, "add", &[a, b], &[])?;
    println!("{a} + {b} = {}", out.scalars.first().copied().unwrap_or_default());
    session.close(&user_client)?;
    Ok(())
}
