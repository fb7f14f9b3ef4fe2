//! The decision log: one JSON object per line, for security teams. Every admission and every
//! refusal is recorded with the deciding rule (or `default deny`), the policy generation and
//! the task; allowed calls are counted per session and summed up when it ends. Each session
//! has a budget of lines per second, so a client that floods refusals cannot flood the log:
//! what it exceeds is counted and reported in a `dropped` record. Writing never blocks a
//! request: records go through a bounded queue to a writer task, and a full queue drops.

use std::{
    io::Write,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
    time::{SystemTime, UNIX_EPOCH},
};

use serde_json::{Value, json};
use tokio::sync::mpsc;

/// Records queued for the writer before new ones are dropped.
const QUEUE: usize = 4096;
/// Lines per second a session may cause, sustained.
const LINES_PER_SECOND: f64 = 50.0;
/// Lines a session may cause in a burst.
const BURST: f64 = 100.0;

/// Where decisions go.
#[derive(Debug)]
pub struct DecisionLog {
    tx: mpsc::Sender<Value>,
    next_id: AtomicU64,
    /// Records lost because the writer fell behind.
    overflow: std::sync::Arc<AtomicU64>,
}

impl DecisionLog {
    /// Opens (appends to) `path` and starts the writer task. The log names every client's uid,
    /// pid and executable: it is created `0640`, never through a symbolic link (`O_NOFOLLOW`),
    /// and must be a regular file (a FIFO or a device is refused, without blocking).
    pub fn open(path: &Path) -> std::io::Result<DecisionLog> {
        Ok(DecisionLog::start(DecisionLog::open_file(path)?, path))
    }

    /// The file [`DecisionLog::open`] opens, checked (no runtime needed: a root broker opens it
    /// before its serving process gives up root).
    pub fn open_file(path: &Path) -> std::io::Result<std::fs::File> {
        use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o640)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::ELOOP) => std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "is a symbolic link: the decision log is never opened through one (name the file itself)",
                ),
                _ => e,
            })?;
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "is not a regular file",
            ));
        }
        if meta.mode() & 0o004 != 0 {
            tracing::warn!(path = %path.display(), mode = format!("{:o}", meta.mode() & 0o777), "the decision log is readable by every user; it names every client's uid, pid and executable (chmod 640)");
        }
        Ok(file)
    }

    /// Starts the writer task for `file` (opened by [`DecisionLog::open_file`]). Needs a
    /// runtime.
    pub fn start(mut file: std::fs::File, path: &Path) -> DecisionLog {
        let (tx, mut rx) = mpsc::channel::<Value>(QUEUE);
        let overflow = std::sync::Arc::new(AtomicU64::new(0));
        let lost = overflow.clone();
        let path: PathBuf = path.to_path_buf();
        tokio::task::spawn_blocking(move || {
            while let Some(first) = rx.blocking_recv() {
                let mut batch = vec![first];
                while let Ok(more) = rx.try_recv() {
                    batch.push(more);
                }
                let dropped = lost.swap(0, Ordering::Relaxed);
                if dropped > 0 {
                    batch.push(
                        json!({ "time": now(), "event": "dropped", "reason": "writer behind", "count": dropped }),
                    );
                }
                let mut text = String::new();
                for record in batch {
                    text.push_str(&record.to_string());
                    text.push('\n');
                }
                if let Err(e) = file.write_all(text.as_bytes()).and_then(|()| file.flush()) {
                    tracing::error!(error = %e, path = %path.display(), "cannot write the decision log");
                }
            }
        });
        DecisionLog {
            tx,
            next_id: AtomicU64::new(1),
            overflow,
        }
    }

    /// Queues a record, stamping it with an id and the time.
    pub fn write(&self, mut record: Value) {
        if let Some(map) = record.as_object_mut() {
            map.insert("id".into(), json!(self.next_id.fetch_add(1, Ordering::Relaxed)));
            map.insert("time".into(), json!(now()));
        }
        if self.tx.try_send(record).is_err() {
            self.overflow.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Seconds since the epoch, with milliseconds.
fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| (d.as_millis() as f64) / 1000.0)
}

/// One session's line budget.
#[derive(Debug)]
pub(crate) struct Budget {
    bucket: super::bucket::TokenBucket,
    dropped: u64,
}

impl Default for Budget {
    fn default() -> Self {
        Budget {
            bucket: super::bucket::TokenBucket::new(LINES_PER_SECOND, BURST),
            dropped: 0,
        }
    }
}

impl Budget {
    /// Whether one more line may be written now; if lines were dropped before, also how many.
    pub(crate) fn take(&mut self) -> (bool, u64) {
        self.take_at(std::time::Instant::now())
    }

    fn take_at(&mut self, now: std::time::Instant) -> (bool, u64) {
        if self.bucket.take_at(now) {
            (true, std::mem::take(&mut self.dropped))
        } else {
            self.dropped += 1;
            (false, 0)
        }
    }

    /// Lines dropped and not yet reported.
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_allows_a_burst_then_counts_drops() {
        let mut b = Budget::default();
        let start = b.bucket.last();
        let allowed = (0..1000).filter(|_| b.take_at(start).0).count();
        assert_eq!(allowed, 100, "the burst");
        assert_eq!(b.dropped(), 900);
        let (ok, reported) = b.take_at(start + std::time::Duration::from_millis(20));
        assert!(ok, "one line a fiftieth of a second");
        assert_eq!(reported, 900, "the drops are reported with the next line");
        assert_eq!(b.dropped(), 0);
        assert_eq!(b.take_at(start + std::time::Duration::from_millis(20)), (false, 0));
    }
}
