//! Hostile rings: clients that write garbage into their shared memory — indices past the ring,
//! bits flipped under records in flight, a head the broker never wrote — each ending at most its
//! own session, while a well-behaved client beside them sees no error at all.

use std::sync::{
    Mutex,
    atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
};

use portcullis_client::{
    ClientError,
    ring::{RingClient, RingOptions},
};
use portcullis_ring::wake;
use portcullis_tests::{Broker, BrokerSetup};

use crate::{Outcome, Scale, common};

/// How one hostile client's ring ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum End {
    /// The broker ended the session (the corruption was seen).
    Ended,
    /// The broker served on (the garbage was in words it does not trust or read).
    Served,
}

fn ring_on(broker: &Broker) -> Result<(RingClient, u64), ClientError> {
    let mut ring = RingClient::connect(broker.run_dir(), RingOptions::default())?;
    let id = ring.find("sample0")?.first().map(|s| s.id).unwrap_or(0);
    let h = ring.open(id, false)?;
    ring.call(h, 0, &[1, 1], &[], 0)?;
    Ok((ring, h))
}

/// One hostile client: corruption `kind` of its ring, then one more request.
fn corrupt(broker: &Broker, kind: usize, rng: &mut fastrand::Rng) -> Result<End, String> {
    let (mut ring, h) = ring_on(broker).map_err(|e| format!("a ring: {e}"))?;
    let map = ring.map_again().map_err(|e| e.to_string())?;
    let header = map.header();
    let outcome = match kind {
        // An index past the ring: the session must end.
        0 => {
            header.sq_tail.0.store(rng.u32(0x1000_0000..), Ordering::Release);
            let _ = wake::ring_broker(ring.broker_doorbell());
            ring.next_response().map(|_| ())
        }
        // Bits flipped over the records while calls are in flight.
        1 => {
            let stop = AtomicBool::new(false);
            let words = map.sq();
            std::thread::scope(|scope| {
                let (stop, seed) = (&stop, rng.u64(..));
                scope.spawn(move || {
                    let mut x = seed | 1;
                    while !stop.load(Ordering::Relaxed) {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        words[(x as usize >> 8) % words.len().min(64)].fetch_xor(1 << (x % 64), Ordering::Relaxed);
                    }
                });
                let mut result = Ok(());
                for i in 0..200u64 {
                    match ring.call(h, 0, &[i, 1], &[], 0) {
                        Ok(_) | Err(ClientError::Refused { .. }) => {}
                        Err(e) => {
                            result = Err(e);
                            break;
                        }
                    }
                }
                stop.store(true, Ordering::Relaxed);
                result
            })
        }
        // A completion head the broker never wrote, then a call.
        2 => {
            header.cq_head.0.store(rng.u32(..), Ordering::Release);
            let _ = wake::ring_broker(ring.broker_doorbell());
            ring.call(h, 0, &[2, 2], &[], 0).map(|_| ())
        }
        // Random bytes over every record, then a tail that claims one more.
        _ => {
            for w in map.sq() {
                w.store(rng.u64(..), Ordering::Relaxed);
            }
            let tail = header.sq_tail.0.load(Ordering::Acquire);
            header.sq_tail.0.store(tail.wrapping_add(8), Ordering::Release);
            let _ = wake::ring_broker(ring.broker_doorbell());
            ring.next_response().map(|_| ())
        }
    };
    Ok(match outcome {
        Ok(()) | Err(ClientError::Refused { .. }) => End::Served,
        Err(_) => End::Ended,
    })
}

pub(crate) fn run(scale: Scale) -> Result<Outcome, String> {
    let broker = Broker::with(BrokerSetup {
        config: Some(
            "[ring]\nmax_rings = 64\n[limits]\nmax_rings_per_uid = 64\n[[device]]\nname = \"sample0\"\ndriver = \"sample\"\n",
        ),
        log_level: Some("warn"),
        ..BrokerSetup::default()
    });
    let baseline = broker.baseline_fds();
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let (ended, served) = (AtomicUsize::new(0), AtomicUsize::new(0));
    let (bystander_calls, bystander_errors) = (AtomicU64::new(0), Mutex::new(Vec::<String>::new()));
    let failures: Mutex<Vec<String>> = Mutex::default();
    std::thread::scope(|scope| {
        // The well-behaved client: a ring of its own, calling all along.
        let (broker, stop, calls, errors) = (&broker, &stop, &bystander_calls, &bystander_errors);
        scope.spawn(move || match ring_on(broker) {
            Ok((mut ring, h)) => {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    match ring.call(h, 0, &[i, 1], &[], 0) {
                        Ok(out) if out.scalars == [i + 1] => {}
                        other => errors.lock().unwrap().push(format!("call {i}: {other:?}")),
                    }
                    i += 1;
                    calls.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(e) => errors.lock().unwrap().push(e.to_string()),
        });
        let workers: Vec<_> = (0..4u64)
            .map(|w| {
                let (next, ended, served, failures) = (&next, &ended, &served, &failures);
                scope.spawn(move || {
                    let mut rng = fastrand::Rng::with_seed(0xc0ffee ^ w);
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= scale.ring_corruptions {
                            return;
                        }
                        match corrupt(broker, i % 4, &mut rng) {
                            Ok(End::Ended) => ended.fetch_add(1, Ordering::Relaxed),
                            Ok(End::Served) => served.fetch_add(1, Ordering::Relaxed),
                            Err(e) => {
                                failures.lock().unwrap().push(e);
                                return;
                            }
                        };
                    }
                })
            })
            .collect();
        for w in workers {
            let _ = w.join();
        }
        stop.store(true, Ordering::Relaxed);
    });
    let failures = failures.into_inner().unwrap();
    if let Some(f) = failures.first() {
        return Err(format!("a hostile client could not even start: {f}"));
    }
    let errors = bystander_errors.into_inner().unwrap();
    if !errors.is_empty() {
        return Err(format!(
            "the well-behaved client met {} errors: {}",
            errors.len(),
            errors[0]
        ));
    }
    common::no_leaks(&broker, baseline)?;
    common::served(&broker)?;
    let (ended, served, calls) = (ended.into_inner(), served.into_inner(), bystander_calls.into_inner());
    Ok(Outcome {
        summary: format!(
            "{} hostile rings: {ended} sessions ended by the broker, {served} served on (garbage in words it does not trust); the client beside them made {calls} calls without an error; stats back to baseline",
            scale.ring_corruptions
        ),
        figures: serde_json::json!({ "corruptions": scale.ring_corruptions, "sessions_ended": ended, "served_on": served, "bystander_calls": calls, "bystander_errors": 0 }),
    })
}
