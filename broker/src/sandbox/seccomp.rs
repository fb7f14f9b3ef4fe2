//! Seccomp filters per thread role, from the data files in `broker/seccomp/` (seccompiler's
//! JSON: one filter per file, named after its role; every rule says in a `comment` which code
//! path needs the call). A thread's filters stack: the main thread's is installed before the
//! runtime exists, so every thread inherits it; a runtime thread adds the worker filter as it
//! starts, a ring thread the ring filter. A call is allowed only if every filter on the thread
//! allows it.

use std::collections::HashMap;

use seccompiler::BpfProgram;

/// A thread's role, and the file its filter comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// The serving process's main thread (and, inherited, every thread).
    Main,
    /// The async runtime's threads (workers and blocking pool).
    Worker,
    /// A shared-memory ring's thread.
    Ring,
    /// The privileged helper.
    Helper,
}

impl Role {
    /// Every role.
    pub const ALL: [Role; 4] = [Role::Main, Role::Worker, Role::Ring, Role::Helper];

    /// The role's name (its filter's name, and its file's).
    pub fn name(self) -> &'static str {
        match self {
            Role::Main => "main",
            Role::Worker => "worker",
            Role::Ring => "ring",
            Role::Helper => "helper",
        }
    }

    /// Its filter file's text.
    pub fn source(self) -> &'static str {
        match self {
            Role::Main => include_str!("../../seccomp/main.json"),
            Role::Worker => include_str!("../../seccomp/worker.json"),
            Role::Ring => include_str!("../../seccomp/ring.json"),
            Role::Helper => include_str!("../../seccomp/helper.json"),
        }
    }
}

/// The compiled filters.
#[derive(Debug, Default)]
pub struct Filters {
    programs: HashMap<Role, BpfProgram>,
}

impl Filters {
    /// Compiles every role's filter for this machine's architecture.
    pub fn compile() -> Result<Filters, String> {
        let arch = std::env::consts::ARCH
            .try_into()
            .map_err(|e| format!("seccomp on {}: {e:?}", std::env::consts::ARCH))?;
        let mut programs = HashMap::new();
        for role in Role::ALL {
            let mut map = seccompiler::compile_from_json(role.source().as_bytes(), arch)
                .map_err(|e| format!("seccomp/{}.json: {e}", role.name()))?;
            let program = map
                .remove(role.name())
                .ok_or_else(|| format!("seccomp/{}.json has no filter named {:?}", role.name(), role.name()))?;
            programs.insert(role, program);
        }
        Ok(Filters { programs })
    }

    /// Installs `role`'s filter on the calling thread (and the threads it starts later).
    pub fn apply(&self, role: Role) -> Result<(), String> {
        let program = self
            .programs
            .get(&role)
            .ok_or_else(|| format!("no {} filter", role.name()))?;
        seccompiler::apply_filter(program).map_err(|e| format!("installing the {} seccomp filter: {e}", role.name()))
    }
}

/// Seccomp filters on the calling thread (`Seccomp_filters` in `/proc/thread-self/status`).
pub fn filters_on_this_thread() -> u32 {
    std::fs::read_to_string("/proc/thread-self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Seccomp_filters:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every rule of every filter names the code path that needs it, every file compiles, and
    /// no role allows what none may do.
    #[test]
    fn every_rule_says_why_and_every_filter_compiles() {
        Filters::compile().unwrap();
        for role in Role::ALL {
            let json: serde_json::Value = serde_json::from_str(role.source()).unwrap();
            let filter = json
                .get(role.name())
                .unwrap_or_else(|| panic!("{} has no filter", role.name()));
            let rules = filter.get("filter").and_then(|f| f.as_array()).unwrap();
            assert!(!rules.is_empty());
            let mut seen = std::collections::HashSet::new();
            for rule in rules {
                let syscall = rule.get("syscall").and_then(|s| s.as_str()).unwrap();
                let comment = rule.get("comment").and_then(|c| c.as_str()).unwrap_or_default();
                assert!(
                    comment.trim().len() >= 10,
                    "seccomp/{}.json: {syscall} has no comment naming the code path that needs it",
                    role.name()
                );
                if rule.get("args").is_none() {
                    assert!(
                        seen.insert(syscall.to_string()),
                        "seccomp/{}.json: {syscall} twice",
                        role.name()
                    );
                }
                for never in [
                    "execve",
                    "execveat",
                    "ptrace",
                    "mount",
                    "umount2",
                    "unshare",
                    "setns",
                    "pivot_root",
                    "init_module",
                    "finit_module",
                    "kexec_load",
                    "bpf",
                    "process_vm_writev",
                    "userfaultfd",
                    "keyctl",
                    "add_key",
                ] {
                    assert_ne!(syscall, never, "seccomp/{}.json allows {never}", role.name());
                }
            }
        }
    }
}
