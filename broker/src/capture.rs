//! Recording real traffic as fuzzing seeds: when `PORTCULLIS_CAPTURE_DIR` is set (by
//! `cargo xtask fuzz --capture`, around the integration tests), every native frame received,
//! every gRPC session's messages and every policy loaded are written there, one file each, under
//! the fuzz target they seed. Unset, this costs one check of a `OnceLock` per use.

use std::{
    path::PathBuf,
    sync::{
        OnceLock,
        atomic::{AtomicU64, Ordering},
    },
};

fn dir() -> Option<&'static PathBuf> {
    static DIR: OnceLock<Option<PathBuf>> = OnceLock::new();
    DIR.get_or_init(|| std::env::var_os("PORTCULLIS_CAPTURE_DIR").map(PathBuf::from))
        .as_ref()
}

/// Whether traffic is being recorded.
pub(crate) fn enabled() -> bool {
    dir().is_some()
}

/// Before the sandbox: makes the recording directory, writable by `owner` (the serving
/// process's uid), and returns it for the sandbox to leave writable; `None` when not recording.
pub(crate) fn prepare_dir(owner: u32) -> Option<PathBuf> {
    let dir = dir()?;
    // The targets' directories too: the serving process, once sandboxed, makes no directory.
    for path in std::iter::once(dir.clone()).chain(TARGETS.iter().map(|t| dir.join(t))) {
        if let Err(e) = std::fs::create_dir_all(&path).and_then(|()| std::os::unix::fs::chown(&path, Some(owner), None))
        {
            tracing::warn!(error = %e, path = %path.display(), "cannot prepare the fuzzing seed directory");
        }
    }
    Some(dir.clone())
}

/// The fuzz targets the broker records seeds for.
const TARGETS: [&str; 4] = ["grpc_request", "native_frame", "policy_text", "ring_records"];

/// Records one input of the fuzz target `target`.
pub(crate) fn record(target: &str, bytes: &[u8]) {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let Some(dir) = dir() else { return };
    debug_assert!(TARGETS.contains(&target), "{target} is not in capture::TARGETS");
    let dir = dir.join(target);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let path = dir.join(format!("{}-{n}", std::process::id()));
    // A sandboxed broker's directories were made before the sandbox (it makes none itself).
    let made = if dir.is_dir() {
        Ok(())
    } else {
        std::fs::create_dir_all(&dir)
    };
    if let Err(e) = made.and_then(|()| std::fs::write(&path, bytes)) {
        tracing::warn!(error = %e, path = %path.display(), "cannot record a fuzzing seed");
    }
}
