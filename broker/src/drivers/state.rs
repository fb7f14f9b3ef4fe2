//! What drivers leave in the run dir (`<run dir>/state/`) so that a broker killed without a
//! chance to clean up can undo what it did to a device when it starts again: a tty's settings
//! from before the broker made it raw. Written by the serving process, removed when the driver
//! lets the device go cleanly; read back by the next broker on the same run dir.

use std::{
    path::{Path, PathBuf},
    sync::OnceLock,
};

static DIR: OnceLock<PathBuf> = OnceLock::new();

/// The directory's name inside the run dir.
pub const STATE_DIR: &str = "state";

/// Where drivers keep their state from now on (once; the server sets it before any device).
pub(crate) fn set_dir(dir: &Path) {
    let _ = DIR.set(dir.to_path_buf());
}

fn path(name: &str) -> Option<PathBuf> {
    DIR.get().map(|dir| dir.join(name))
}

/// The text a broker left under `name`, if any.
pub(crate) fn read(name: &str) -> Option<String> {
    // Small, the broker's own: a larger file is not one it wrote.
    let text = std::fs::read(path(name)?).ok()?;
    if text.len() > 4096 {
        return None;
    }
    String::from_utf8(text).ok()
}

/// Keeps `text` under `name` (nothing without a state directory).
pub(crate) fn write(name: &str, text: &str) {
    if let Some(path) = path(name)
        && let Err(e) = std::fs::write(&path, text)
    {
        tracing::warn!(path = %path.display(), error = %e, "could not keep a device's state: a broker killed now could not undo what it did to the device");
    }
}

/// Forgets `name`.
pub(crate) fn remove(name: &str) {
    if let Some(path) = path(name) {
        let _ = std::fs::remove_file(path);
    }
}
