//! Kernel uevents (`NETLINK_KOBJECT_UEVENT`), parsed strictly: the first piece of hotplug
//! (docs: issue "Discovery, driver matching and hotplug").
//!
//! A kernel uevent is `ACTION@DEVPATH\0` followed by `KEY=VALUE\0` pairs, among them `ACTION`,
//! `DEVPATH`, `SUBSYSTEM` and `SEQNUM`. Only the kernel's messages are believed: a message whose
//! sender's netlink port id is not 0 came from user space (udev's CVE-2009-1185 was exactly
//! such a forged uevent), and udev's own re-broadcasts (`libudev\0…`) are refused too. Every
//! bound is checked before anything is kept: the message size, the number of variables, each
//! key's form, UTF-8, a header that agrees with the variables, no duplicate key.

use std::fmt;

/// The largest message accepted: the kernel's uevent buffer (`UEVENT_BUFFER_SIZE`, 2048 bytes)
/// plus the `ACTION@DEVPATH` header, rounded up.
pub const MAX_MESSAGE: usize = 4096;

/// The most variables a message may carry (the kernel's `UEVENT_NUM_ENVP` is 64).
pub const MAX_VARS: usize = 64;

/// The longest key accepted.
pub const MAX_KEY: usize = 64;

/// What happened to the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// A device appeared.
    Add,
    /// A device went away.
    Remove,
    /// A device changed (a loop device attached or detached, media inserted or removed).
    Change,
    /// A device was renamed or moved.
    Move,
    /// A device (a CPU, memory) came online.
    Online,
    /// A device went offline.
    Offline,
    /// A kernel driver bound to the device.
    Bind,
    /// A kernel driver unbound from it.
    Unbind,
}

impl Action {
    const ALL: [(&'static str, Action); 8] = [
        ("add", Action::Add),
        ("remove", Action::Remove),
        ("change", Action::Change),
        ("move", Action::Move),
        ("online", Action::Online),
        ("offline", Action::Offline),
        ("bind", Action::Bind),
        ("unbind", Action::Unbind),
    ];

    fn parse(text: &str) -> Option<Action> {
        Action::ALL.iter().find(|(name, _)| *name == text).map(|(_, a)| *a)
    }

    /// The kernel's word for it.
    pub fn name(self) -> &'static str {
        Action::ALL
            .iter()
            .find(|(_, a)| *a == self)
            .map_or("?", |(name, _)| name)
    }
}

/// A kernel uevent, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Uevent {
    /// What happened.
    pub action: Action,
    /// The device's path under `/sys` (`/devices/virtual/block/loop0`).
    pub devpath: String,
    /// Its subsystem (`block`, `tty`, `net`).
    pub subsystem: String,
    /// The kernel's sequence number (events of one device arrive in this order).
    pub seqnum: u64,
    /// Every variable, in the order the kernel sent them (ACTION, DEVPATH, … included).
    pub vars: Vec<(String, String)>,
}

impl Uevent {
    /// A variable's value.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.vars.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// The message as the kernel sent it.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = format!("{}@{}\0", self.action.name(), self.devpath).into_bytes();
        for (k, v) in &self.vars {
            out.extend_from_slice(k.as_bytes());
            out.push(b'=');
            out.extend_from_slice(v.as_bytes());
            out.push(0);
        }
        out
    }
}

/// Why a message was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum UeventError {
    /// Not from the kernel: the sender's netlink port id is not 0.
    #[error("a uevent from port {0}, not the kernel (0): refused (forged in user space?)")]
    NotFromKernel(u32),
    /// Larger than any kernel uevent.
    #[error("a uevent of {0} bytes: more than {MAX_MESSAGE}")]
    TooLong(usize),
    /// The message is malformed; the reason says where.
    #[error("a malformed uevent: {0}")]
    Malformed(&'static str),
}

/// Refuses a message whose sender is not the kernel (netlink port id 0).
pub fn from_kernel(sender_port: u32) -> Result<(), UeventError> {
    if sender_port == 0 {
        Ok(())
    } else {
        Err(UeventError::NotFromKernel(sender_port))
    }
}

/// Parses one kernel uevent message.
pub fn parse(message: &[u8]) -> Result<Uevent, UeventError> {
    use UeventError::Malformed;
    if message.len() > MAX_MESSAGE {
        return Err(UeventError::TooLong(message.len()));
    }
    // Every field ends with a NUL, the last one too.
    let body = message
        .strip_suffix(&[0])
        .ok_or(Malformed("it does not end with a NUL"))?;
    let mut fields = body.split(|b| *b == 0);
    let header = fields.next().ok_or(Malformed("empty"))?;
    let header = std::str::from_utf8(header).map_err(|_| Malformed("the header is not UTF-8"))?;
    if header == "libudev" {
        return Err(Malformed("a udev message, not the kernel's"));
    }
    let (action, devpath) = header
        .split_once('@')
        .ok_or(Malformed("the header is not ACTION@DEVPATH"))?;
    let action = Action::parse(action).ok_or(Malformed("an unknown action"))?;
    let mut vars: Vec<(String, String)> = Vec::new();
    for field in fields {
        if vars.len() == MAX_VARS {
            return Err(Malformed("more variables than the kernel sends"));
        }
        let field = std::str::from_utf8(field).map_err(|_| Malformed("a variable is not UTF-8"))?;
        let (key, value) = field.split_once('=').ok_or(Malformed("a variable is not KEY=VALUE"))?;
        let key_ok = !key.is_empty()
            && key.len() <= MAX_KEY
            && key
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
        if !key_ok {
            return Err(Malformed("a key is not 1-64 of A-Z, 0-9 and _"));
        }
        if value.chars().any(char::is_control) {
            return Err(Malformed("a value holds a control character"));
        }
        if vars.iter().any(|(k, _)| k == key) {
            return Err(Malformed("a key appears twice"));
        }
        vars.push((key.to_string(), value.to_string()));
    }
    let get = |key: &str| vars.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str());
    if get("ACTION") != Some(action.name()) {
        return Err(Malformed("ACTION disagrees with the header"));
    }
    if get("DEVPATH") != Some(devpath) {
        return Err(Malformed("DEVPATH disagrees with the header"));
    }
    let path_ok = devpath.starts_with('/')
        && !devpath.split('/').any(|part| part == ".." || part == ".")
        && !devpath.contains("//")
        && !devpath.chars().any(char::is_control);
    if !path_ok {
        return Err(Malformed("DEVPATH is not a plain absolute path"));
    }
    let subsystem = get("SUBSYSTEM").ok_or(Malformed("no SUBSYSTEM"))?.to_string();
    let seqnum = get("SEQNUM")
        .ok_or(Malformed("no SEQNUM"))?
        .parse::<u64>()
        .map_err(|_| Malformed("SEQNUM is not a number"))?;
    Ok(Uevent {
        action,
        devpath: devpath.to_string(),
        subsystem,
        seqnum,
        vars,
    })
}

impl fmt::Display for Uevent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}@{} ({}, seq {})",
            self.action.name(),
            self.devpath,
            self.subsystem,
            self.seqnum
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What this machine's kernel sends when a loop device's media goes away.
    const LOOP_CHANGE: &[u8] = b"change@/devices/virtual/block/loop0\0ACTION=change\0DEVPATH=/devices/virtual/block/loop0\0SUBSYSTEM=block\0DISK_MEDIA_CHANGE=1\0MAJOR=7\0MINOR=0\0DEVNAME=loop0\0DEVTYPE=disk\0DISKSEQ=9\0SEQNUM=4242\0";

    #[test]
    fn a_kernel_uevent_parses_and_encodes_to_the_same_bytes() {
        let e = parse(LOOP_CHANGE).unwrap();
        assert_eq!(
            (e.action, e.devpath.as_str(), e.subsystem.as_str(), e.seqnum),
            (Action::Change, "/devices/virtual/block/loop0", "block", 4242)
        );
        assert_eq!(
            (e.get("DISK_MEDIA_CHANGE"), e.get("DEVNAME")),
            (Some("1"), Some("loop0"))
        );
        assert_eq!(e.encode(), LOOP_CHANGE);
        assert_eq!(e.to_string(), "change@/devices/virtual/block/loop0 (block, seq 4242)");
    }

    #[test]
    fn only_the_kernel_is_believed() {
        assert!(from_kernel(0).is_ok());
        assert_eq!(from_kernel(1234), Err(UeventError::NotFromKernel(1234)));
        let mut udev = b"libudev\0".to_vec();
        udev.extend_from_slice(&LOOP_CHANGE[LOOP_CHANGE.iter().position(|b| *b == 0).unwrap() + 1..]);
        assert!(matches!(parse(&udev), Err(UeventError::Malformed(_))));
    }

    #[test]
    fn every_malformed_message_is_refused_with_a_reason() {
        let text = std::str::from_utf8(LOOP_CHANGE).unwrap();
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (LOOP_CHANGE[..LOOP_CHANGE.len() - 1].to_vec(), "does not end with a NUL"),
            (text.replacen("change@", "explode@", 1).into_bytes(), "unknown action"),
            (
                text.replacen("ACTION=change", "ACTION=add", 1).into_bytes(),
                "ACTION disagrees",
            ),
            (
                text.replacen("DEVPATH=/devices/virtual/block/loop0", "DEVPATH=/devices/x", 1)
                    .into_bytes(),
                "DEVPATH disagrees",
            ),
            (
                text.replace("/devices/virtual/block/loop0", "/devices/../etc")
                    .into_bytes(),
                "plain absolute path",
            ),
            (
                text.replacen("SEQNUM=4242", "SEQNUM=x", 1).into_bytes(),
                "SEQNUM is not a number",
            ),
            (text.replacen("SUBSYSTEM=block\0", "", 1).into_bytes(), "no SUBSYSTEM"),
            (text.replacen("MAJOR=7", "major=7", 1).into_bytes(), "a key is not"),
            (text.replacen("MINOR=0", "MAJOR=0", 1).into_bytes(), "appears twice"),
            (
                text.replacen("DEVNAME=loop0", "DEVNAME=lo\u{1b}op0", 1).into_bytes(),
                "control character",
            ),
            (
                text.replacen("DEVTYPE=disk", "DEVTYPE", 1).into_bytes(),
                "not KEY=VALUE",
            ),
        ];
        for (message, says) in cases {
            let e = parse(&message).unwrap_err();
            assert!(e.to_string().contains(says), "{says}: {e}");
        }
        let mut long = LOOP_CHANGE.to_vec();
        long.resize(MAX_MESSAGE + 1, b'A');
        assert_eq!(parse(&long), Err(UeventError::TooLong(MAX_MESSAGE + 1)));
        let mut many = text.to_string();
        for i in 0..MAX_VARS {
            many.push_str(&format!("X{i}=1\0"));
        }
        assert!(
            parse(many.as_bytes())
                .unwrap_err()
                .to_string()
                .contains("more variables")
        );
        assert!(matches!(
            parse(b"change@/x\0ACTION=change\0DEVPATH=/x\0SUBSYSTEM=block\0SEQNUM=1\0\xff=1\0"),
            Err(UeventError::Malformed(_))
        ));
    }
}
