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

/// The latencies of a client calling `add` at a normal pace (every `every`) for `for_`: root,
/// a native connection of its own, the sample device opened shared.
pub(crate) fn paced(broker: &Broker, for_: Duration, every: Duration) -> Result<Vec<Duration>, String> {
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
        let mut took = Vec::new();
        let end = Instant::now() + for_;
        let mut next = Instant::now();
        while Instant::now() < end {
            let begun = Instant::now();
            s.call(h, 0, &[1, 2], &[], 0)
                .await
                .map_err(|e| format!("the paced client's call failed: {e}"))?;
            took.push(begun.elapsed());
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
