//! Test helper: opens a service exclusively, prints `held`, and holds it until killed.
//! usage: holder RUN_DIR SERVICE

#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use portcullis_client::{OpenMode, blocking::Client, matching};

fn main() {
    let mut args = std::env::args().skip(1);
    let run_dir = args.next().expect("usage: holder RUN_DIR SERVICE");
    let service = args.next().expect("usage: holder RUN_DIR SERVICE");
    let client = Client::connect(run_dir).unwrap();
    let session = client.session().unwrap();
    let info = session.find_one(matching::by_name(&service)).unwrap();
    let _held = session.open(info.id, OpenMode::Exclusive).unwrap();
    println!("held");
    loop {
        std::thread::park();
    }
}
