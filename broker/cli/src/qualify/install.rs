//! The install checklist, as `kextutil` checks a kext bundle before it loads: the files that
//! decide what the broker enforces parse and lint, are owned by root and writable by no one
//! else (the broker's own StrictModes, `portcullis_broker::trust`), and the binary is a release
//! build.

use std::path::{Path, PathBuf};

use portcullis_broker::{config, registry::personality::Personalities, trust};
use portcullis_client::pb;

/// One item of the checklist.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct Check {
    pub(crate) item: String,
    pub(crate) ok: bool,
    pub(crate) detail: String,
}

fn item(item: impl Into<String>, problems: Vec<String>, fine: impl Into<String>) -> Check {
    Check {
        item: item.into(),
        ok: problems.is_empty(),
        detail: if problems.is_empty() {
            fine.into()
        } else {
            problems.join("; ")
        },
    }
}

/// Ownership and modes of `path` and the directories above it, as a root broker requires.
fn owned_by_root(what: &str, path: &Path) -> Check {
    item(
        format!("{what}: root's, and no one else can write it"),
        trust::problems(path, 0),
        path.display().to_string(),
    )
}

/// The policy's source: its one file, or the directory holding its files.
fn policy_source(files: &[String]) -> Option<PathBuf> {
    let first = PathBuf::from(files.first()?);
    if files.len() == 1 {
        return Some(first);
    }
    first.parent().map(Path::to_path_buf)
}

/// The checklist for the broker that reported `install` and `policy` (its `stats`).
pub(crate) fn check(install: Option<&pb::BrokerInstall>, policy: Option<&pb::PolicyStatus>) -> Vec<Check> {
    let Some(install) = install else {
        return vec![item(
            "the broker says what it runs from",
            vec!["it does not (a broker older than this command)".into()],
            "",
        )];
    };
    let mut checks = vec![item(
        "the broker binary is a release build",
        if install.release {
            vec![]
        } else {
            vec!["it is a debug build: unoptimized, with debug assertions".into()]
        },
        "optimized",
    )];
    if !install.binary.is_empty() {
        checks.push(owned_by_root("the broker binary", Path::new(&install.binary)));
    }
    if install.config.is_empty() {
        checks.push(item("the configuration parses", vec![], "the embedded default"));
    } else {
        let path = Path::new(&install.config);
        checks.push(item(
            "the configuration parses",
            config::Config::load(Some(path))
                .err()
                .map(|e| e.to_string())
                .into_iter()
                .collect(),
            path.display().to_string(),
        ));
        checks.push(owned_by_root("the configuration", path));
    }
    match policy.map(|p| p.files.as_slice()).and_then(policy_source) {
        None => checks.push(item("the policy parses and checks", vec![], "the embedded default")),
        Some(source) => {
            checks.push(item(
                "the policy parses and checks",
                config::load_policy(Some(&source))
                    .err()
                    .map(|e| e.to_string())
                    .into_iter()
                    .collect(),
                source.display().to_string(),
            ));
            checks.push(owned_by_root("the policy", &source));
        }
    }
    if !install.drivers.is_empty() {
        let dir = Path::new(&install.drivers);
        let lint = match Personalities::load_dir(dir, true) {
            Ok(_) => vec![],
            Err(errors) => errors.iter().map(ToString::to_string).collect(),
        };
        checks.push(item("the driver personalities lint", lint, dir.display().to_string()));
        checks.push(owned_by_root("the driver personalities", dir));
    }
    checks
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn check_flags_a_debug_build_and_a_policy_others_can_write() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let policy = dir.path().join("policy.toml");
        std::fs::write(&policy, portcullis_broker::config::DEFAULT_POLICY).unwrap();
        std::fs::set_permissions(&policy, std::fs::Permissions::from_mode(0o666)).unwrap();
        let install = pb::BrokerInstall {
            release: false,
            ..pb::BrokerInstall::default()
        };
        let status = pb::PolicyStatus {
            files: vec![policy.display().to_string()],
            ..pb::PolicyStatus::default()
        };
        let checks = check(Some(&install), Some(&status));
        let find = |what: &str| checks.iter().find(|c| c.item.contains(what)).unwrap();
        assert!(!find("release build").ok);
        assert!(find("policy parses").ok, "{checks:?}");
        let owned = find("the policy: root's");
        assert!(
            !owned.ok && owned.detail.contains("writable by its group and every user"),
            "{owned:?}"
        );
        std::fs::set_permissions(&policy, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(check(Some(&install), Some(&status)).iter().filter(|c| !c.ok).count() == 1);
        // A policy that does not parse says why.
        std::fs::write(&policy, "[[rule]]\nid = 3\n").unwrap();
        assert!(
            !check(Some(&install), Some(&status))
                .iter()
                .find(|c| c.item.contains("policy parses"))
                .unwrap()
                .ok
        );
    }
}
