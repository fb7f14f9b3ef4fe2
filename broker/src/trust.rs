//! StrictModes for the files that decide what the broker enforces: a broker running as root
//! loads its configuration and policy only from files and directories that no one but root (and
//! the broker's own user) can change — as sshd refuses an `authorized_keys` others may write.
//! A policy file anyone can write, loaded by a root broker with reload on change, would let
//! anyone on the machine grant themselves every device.
//!
//! Checked for the file and every directory above it, along the path as given and along the
//! real path (so a symbolic link on the way counts, and so does what it points to):
//! - each is owned by root or the broker's user;
//! - none is writable by group or others — except a directory with the sticky bit (`/tmp`),
//!   where others cannot replace the entries they do not own, which the next step checks.

use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

/// What makes `path` untrusted for a broker whose user is `broker_uid`, one sentence each with
/// the path at fault and the fix; empty when it can be trusted.
pub fn problems(path: &Path, broker_uid: u32) -> Vec<String> {
    let mut out = Vec::new();
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    chain(&absolute, broker_uid, &mut out);
    if let Ok(real) = std::fs::canonicalize(&absolute)
        && real != absolute
    {
        chain(&real, broker_uid, &mut out);
    }
    out.dedup();
    out
}

/// Checks `path` and each directory above it.
fn chain(path: &Path, broker_uid: u32, out: &mut Vec<String>) {
    let owners = if broker_uid == 0 {
        "root".to_string()
    } else {
        format!("root or the broker's uid {broker_uid}")
    };
    let mut at: Option<PathBuf> = Some(path.to_path_buf());
    let mut first = true;
    while let Some(p) = at {
        let Ok(meta) = std::fs::symlink_metadata(&p) else {
            // What does not exist is reported by whoever reads it.
            at = p.parent().map(Path::to_path_buf);
            first = false;
            continue;
        };
        let shown = p.display();
        if meta.uid() != 0 && meta.uid() != broker_uid {
            out.push(format!(
                "{shown} is owned by uid {}, not {owners}: that user could change what the broker enforces (fix: chown root {shown})",
                meta.uid()
            ));
        }
        let mode = meta.mode();
        let sticky_dir = meta.is_dir() && mode & 0o1000 != 0 && !first;
        if !meta.file_type().is_symlink() && mode & 0o022 != 0 && !sticky_dir {
            let who = match (mode & 0o020 != 0, mode & 0o002 != 0) {
                (true, true) => "its group and every user",
                (true, false) => "its group",
                _ => "every user",
            };
            out.push(format!(
                "{shown} is writable by {who} (mode {:o}): they could change what the broker enforces (fix: chmod go-w {shown})",
                mode & 0o7777
            ));
        }
        at = p.parent().map(Path::to_path_buf);
        first = false;
    }
}

/// The broker's uid: the user who started it (root, for a broker whose serving process runs
/// as a service user: what it trusts is what root would).
pub fn broker_uid() -> u32 {
    crate::sandbox::starter_uid()
}

/// Whether this broker enforces StrictModes: when it runs as root.
pub fn enforced() -> bool {
    broker_uid() == 0
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn mode(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn a_file_or_directory_others_can_write_or_own_is_untrusted() {
        // Inside a private directory under /tmp (sticky, root's): trusted when root's and 0644.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("policy.toml");
        std::fs::write(&file, "").unwrap();
        mode(&file, 0o644);
        assert_eq!(problems(&file, 0), Vec::<String>::new());
        mode(&file, 0o666);
        let found = problems(&file, 0);
        assert!(
            found.len() == 1
                && found[0].contains("writable by its group and every user (mode 666)")
                && found[0].contains("chmod go-w"),
            "{found:?}"
        );
        mode(&file, 0o644);
        mode(dir.path(), 0o777);
        let found = problems(&file, 0);
        assert!(
            found.len() == 1 && found[0].starts_with(&dir.path().display().to_string()),
            "{found:?}"
        );
        mode(dir.path(), 0o1777);
        assert_eq!(
            problems(&file, 0),
            Vec::<String>::new(),
            "a sticky directory keeps others' hands off"
        );
        mode(dir.path(), 0o700);
        rustix::fs::chown(&file, Some(rustix::process::Uid::from_raw(65534)), None).unwrap();
        let found = problems(&file, 0);
        assert!(found.len() == 1 && found[0].contains("owned by uid 65534"), "{found:?}");
        assert_eq!(
            problems(&file, 65534),
            Vec::<String>::new(),
            "the broker's own user may own it"
        );
        // Through a symbolic link: the link's directory and the real file both count.
        let link = dir.path().join("link.toml");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert!(problems(&link, 0).iter().any(|p| p.contains("owned by uid 65534")));
    }
}
