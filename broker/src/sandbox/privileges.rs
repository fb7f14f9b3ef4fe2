//! Giving privilege up: the serving process's uid, groups and every capability set; the
//! helper's capabilities cut to the three it uses. Each step is checked by reading it back.

use caps::{CapSet, Capability, CapsHashSet};

/// The capabilities the helper keeps: opening device nodes whatever their mode (ptys belong
/// to their user), making and configuring TUN interfaces, reading other processes'
/// executables.
pub(crate) const HELPER_CAPS: [Capability; 3] = [
    Capability::CAP_DAC_OVERRIDE,
    Capability::CAP_NET_ADMIN,
    Capability::CAP_SYS_PTRACE,
];

fn err(what: &str, e: impl std::fmt::Display) -> String {
    format!("{what}: {e}")
}

/// Empties the ambient and inheritable sets, then cuts the bounding, permitted and effective
/// sets to `keep`. The bounding set can only shrink with `CAP_SETPCAP`; without it (a broker
/// not started as root) the bounding set is left as it is — `no_new_privs` already keeps
/// anything from being gained through it.
pub(crate) fn keep_only(keep: &[Capability]) -> Result<(), String> {
    let keep: CapsHashSet = keep.iter().copied().collect();
    bound(&keep)?;
    let permitted = caps::read(None, CapSet::Permitted).map_err(|e| err("reading capabilities", e))?;
    let kept: CapsHashSet = permitted.intersection(&keep).copied().collect();
    caps::set(None, CapSet::Effective, &kept).map_err(|e| err("setting effective capabilities", e))?;
    caps::set(None, CapSet::Permitted, &kept).map_err(|e| err("setting permitted capabilities", e))?;
    Ok(())
}

/// Empties the ambient and inheritable sets and cuts the bounding set to `keep` (when the
/// process holds `CAP_SETPCAP`), leaving the effective and permitted sets as they are.
fn bound(keep: &CapsHashSet) -> Result<(), String> {
    caps::clear(None, CapSet::Ambient).map_err(|e| err("clearing ambient capabilities", e))?;
    caps::clear(None, CapSet::Inheritable).map_err(|e| err("clearing inheritable capabilities", e))?;
    if caps::has_cap(None, CapSet::Effective, Capability::CAP_SETPCAP).unwrap_or(false) {
        for cap in caps::all().difference(keep) {
            caps::drop(None, CapSet::Bounding, *cap).map_err(|e| err("dropping from the bounding set", e))?;
        }
    }
    Ok(())
}

/// Becomes `uid`/`gid` with no supplementary groups and no capability in any set (the
/// bounding set emptied first, while `CAP_SETPCAP` is still held), then sets
/// `no_new_privs`. Then checks: every uid and gid is the new one, every set is empty, and
/// `setuid(0)` fails. Must run while the process has one thread (capability sets are
/// per-thread).
pub(crate) fn become_user(uid: u32, gid: u32) -> Result<(), String> {
    use nix::unistd::{Gid, Uid, setgroups, setresgid, setresuid};
    bound(&CapsHashSet::new())?;
    setgroups(&[]).map_err(|e| err("setgroups", e))?;
    setresgid(Gid::from_raw(gid), Gid::from_raw(gid), Gid::from_raw(gid)).map_err(|e| err("setresgid", e))?;
    setresuid(Uid::from_raw(uid), Uid::from_raw(uid), Uid::from_raw(uid)).map_err(|e| err("setresuid", e))?;
    for set in [
        CapSet::Effective,
        CapSet::Permitted,
        CapSet::Inheritable,
        CapSet::Ambient,
    ] {
        caps::clear(None, set).map_err(|e| err("clearing capabilities", e))?;
    }
    rustix::thread::set_no_new_privs(true).map_err(|e| err("no_new_privs", e))?;
    let ids = nix::unistd::getresuid().map_err(|e| err("getresuid", e))?;
    let gids = nix::unistd::getresgid().map_err(|e| err("getresgid", e))?;
    if [ids.real, ids.effective, ids.saved].iter().any(|u| u.as_raw() != uid)
        || [gids.real, gids.effective, gids.saved]
            .iter()
            .any(|g| g.as_raw() != gid)
    {
        return Err("the uid or gid did not change everywhere".into());
    }
    for set in [
        CapSet::Effective,
        CapSet::Permitted,
        CapSet::Inheritable,
        CapSet::Ambient,
        CapSet::Bounding,
    ] {
        let left = caps::read(None, set).map_err(|e| err("reading capabilities", e))?;
        if !left.is_empty() && uid != 0 {
            return Err(format!("capabilities left in the {set:?} set: {left:?}"));
        }
    }
    if uid != 0 && nix::unistd::setuid(Uid::from_raw(0)).is_ok() {
        return Err("setuid(0) still succeeds".into());
    }
    Ok(())
}

/// The uid and gid of user `name`, through NSS (`/etc/passwd`, systemd's dynamic users …).
pub(crate) fn lookup(name: &str) -> Result<Option<(u32, u32)>, String> {
    match nix::unistd::User::from_name(name) {
        Ok(user) => Ok(user.map(|u| (u.uid.as_raw(), u.gid.as_raw()))),
        Err(e) => Err(format!("looking up user {name}: {e}")),
    }
}
