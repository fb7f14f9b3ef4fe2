//! Test helper: enables a ring, opens the sample device, and submits pipelined calls (and
//! asynchronous waits) without end; prints `submitting` after the first batch so that a test
//! can kill it in the middle of one.
//! usage: ring_batch RUN_DIR

#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use portcullis_client::ring::{RingClient, RingOptions};

fn main() {
    let run_dir = std::env::args().nth(1).expect("usage: ring_batch RUN_DIR");
    let mut ring = RingClient::connect(run_dir, RingOptions::default()).unwrap();
    let sample = ring.find("sample0").unwrap()[0].id;
    let handle = ring.open(sample, false).unwrap();
    // Asynchronous calls left pending when the process dies.
    for _ in 0..8 {
        ring.submit_call(handle, 3, &[60_000], &[], 0).unwrap();
    }
    let mut announced = false;
    loop {
        for i in 0..512u64 {
            ring.submit_call(handle, 0, &[i, 1], &[], 0).unwrap();
        }
        ring.flush().unwrap();
        if !announced {
            println!("submitting");
            announced = true;
        }
        for _ in 0..256 {
            ring.next_response().unwrap();
        }
    }
}
