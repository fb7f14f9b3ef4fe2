//! What each client identity holds across all its connections, so that one user cannot starve
//! the others: connection slots (with some kept for root and the broker's own user), pending
//! calls, messages queued for its clients to read, and executables being hashed.
//!
//! Local clients are counted by uid; TCP clients by their certificate's identity.

use std::{
    collections::HashMap,
    fmt,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicUsize, Ordering},
    },
};

use tokio::sync::Semaphore;

use crate::config::Limits;

/// Who an account belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum AccountKey {
    /// A local task's effective uid.
    Uid(u32),
    /// A TCP client, by the first of its certificate's SAN URI, SAN DNS name or subject CN.
    Remote(String),
}

impl fmt::Display for AccountKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AccountKey::Uid(uid) => write!(f, "uid {uid}"),
            AccountKey::Remote(name) => write!(f, "TLS client {name:?}"),
        }
    }
}

/// One identity's usage. Shared by its connections and sessions; counters go down as the
/// guards that hold them drop.
#[derive(Debug)]
pub struct Account {
    key: AccountKey,
    /// Connections being served (under the accounts lock, with the total).
    connections: AtomicUsize,
    /// Asynchronous calls pending, over all sessions.
    pub(crate) pending: Arc<AtomicUsize>,
    /// Messages queued for this identity's clients that they have not read yet.
    pub(crate) queued: Arc<AtomicUsize>,
    /// Executables being hashed at once for this identity.
    hashing: Arc<Semaphore>,
    /// Shared-memory rings held.
    pub(crate) rings: Arc<AtomicUsize>,
    /// Bytes of driver memory mapped, over all user clients.
    pub(crate) mapped: Arc<AtomicUsize>,
    /// Root and the broker's own user: not limited per identity (rings, mapped memory).
    exempt: bool,
    limits: Limits,
}

impl Account {
    /// Whom it counts.
    pub fn key(&self) -> &AccountKey {
        &self.key
    }

    /// One more pending call, unless the identity is at its bound.
    pub(crate) fn take_pending(&self) -> Option<super::Live> {
        take(&self.pending, self.limits.max_pending_calls_per_uid)
    }

    /// One more queued message, unless the identity is at its bound.
    pub(crate) fn take_queued(&self) -> Option<super::Live> {
        take(&self.queued, self.limits.max_queued_messages_per_uid)
    }

    /// One more ring, unless the identity holds as many as it may.
    pub(crate) fn take_ring(&self) -> Option<Held> {
        let max = if self.exempt {
            usize::MAX
        } else {
            self.limits.max_rings_per_uid
        };
        take_amount(&self.rings, 1, max)
    }

    /// `bytes` more of mapped driver memory, unless that would take the identity past its
    /// bound.
    pub(crate) fn take_mapped(&self, bytes: u64) -> Option<Held> {
        let max = if self.exempt {
            usize::MAX
        } else {
            usize::try_from(self.limits.max_mapped_bytes_per_uid).unwrap_or(usize::MAX)
        };
        take_amount(&self.mapped, usize::try_from(bytes).ok()?, max)
    }

    /// Whether the identity's clients have as many unread messages queued as it may.
    pub(crate) fn queue_full(&self) -> bool {
        self.queued.load(Ordering::Relaxed) >= self.limits.max_queued_messages_per_uid
    }

    /// Whether this identity holds more connections than it may have served in the foreground
    /// (never, for an administrator): its connections are then served by the background
    /// workers.
    pub(crate) fn over_foreground(&self) -> bool {
        !self.exempt && self.connections.load(Ordering::Relaxed) > self.limits.foreground_connections_per_uid
    }

    /// Waits for a place to hash an executable for this identity; held while hashing (it keeps
    /// the account, and so its bound, alive).
    pub(crate) async fn hashing_slot(self: &Arc<Self>) -> Option<HashingSlot> {
        let permit = self.hashing.clone().acquire_owned().await.ok()?;
        Some(HashingSlot {
            _account: self.clone(),
            _permit: permit,
        })
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }
}

/// A place to hash an executable, for one identity.
#[derive(Debug)]
pub(crate) struct HashingSlot {
    _account: Arc<Account>,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

/// An amount counted against an identity for as long as it is held.
#[derive(Debug)]
pub(crate) struct Held {
    counter: Arc<AtomicUsize>,
    amount: usize,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.counter.fetch_sub(self.amount, Ordering::AcqRel);
    }
}

fn take_amount(counter: &Arc<AtomicUsize>, amount: usize, max: usize) -> Option<Held> {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            n.checked_add(amount).filter(|total| *total <= max)
        })
        .ok()
        .map(|_| Held {
            counter: counter.clone(),
            amount,
        })
}

fn take(counter: &Arc<AtomicUsize>, max: usize) -> Option<super::Live> {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1))
        .ok()
        .map(|_| super::Live::adopt(counter))
}

/// Every identity's account, and the connection slots.
#[derive(Debug)]
pub struct Accounts {
    inner: Mutex<Inner>,
    max_connections: usize,
    limits: Limits,
    /// The broker's own uid, which (like root) may use the reserved slots.
    own_uid: u32,
    /// Connections served by the background workers right now.
    background: Arc<AtomicUsize>,
    /// When the memory of closed connections is handed back: a transport's per-connection
    /// buffers (HTTP/2's) may outlive the connection's session.
    trim: super::core::TrimMark,
}

#[derive(Debug, Default)]
struct Inner {
    accounts: HashMap<AccountKey, Weak<Account>>,
    /// Connections being served over all identities.
    total: usize,
}

/// Why a connection was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SlotRefusal {
    /// Every slot is taken (those kept for administrators excepted, for others).
    #[error(
        "the broker serves at most {max} connections at once and all of them are taken{}; try again later, or ask the administrator to raise max_connections",
        if *.reserved > 0 { format!(" ({} of them kept for root and the broker's own user)", .reserved) } else { String::new() }
    )]
    Full {
        /// max_connections.
        max: usize,
        /// Slots kept for administrators.
        reserved: usize,
    },
    /// The identity already holds as many connections as one may.
    #[error(
        "{key} already holds {max} connections, the most one user may; close some, or ask the administrator to raise limits.max_connections_per_uid"
    )]
    PerIdentity {
        /// Whose.
        key: AccountKey,
        /// The limit.
        max: usize,
    },
}

/// A connection's slot, held for its life.
#[derive(Debug)]
pub struct ConnectionSlot {
    accounts: Arc<Accounts>,
    account: Option<Arc<Account>>,
    background: bool,
    /// Counts the connection as served in the background, while it is.
    counted: Option<super::Live>,
}

impl ConnectionSlot {
    /// The account the connection counts against (`None` for a TCP connection before its
    /// certificate is known).
    pub fn account(&self) -> Option<&Arc<Account>> {
        self.account.as_ref()
    }

    /// Whether the connection is to be served in the background: its identity, not an
    /// administrator's, already had `limits.foreground_connections_per_uid` connections when
    /// it came (where a transport places a connection once, as gRPC does).
    pub fn background(&self) -> bool {
        self.background
    }

    /// Counts the connection among those the background workers serve, for as long as the
    /// slot lives.
    pub(crate) fn serve_in_background(&mut self) {
        self.counted = Some(self.accounts.serving_in_background());
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let live = {
            let mut inner = self.accounts.lock();
            inner.total = inner.total.saturating_sub(1);
            inner.total
        };
        if let Some(account) = &self.account {
            account.connections.fetch_sub(1, Ordering::Relaxed);
        }
        self.accounts.trim.ended(live);
    }
}

impl Accounts {
    /// Accounts under these limits; `max_connections` over all identities.
    pub fn new(max_connections: usize, limits: Limits) -> Arc<Accounts> {
        Arc::new(Accounts {
            inner: Mutex::new(Inner::default()),
            max_connections,
            limits,
            own_uid: crate::sandbox::starter_uid(),
            background: Arc::new(AtomicUsize::new(0)),
            trim: super::core::TrimMark::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Whether this uid is an administrator's: root or the broker's own user.
    pub fn is_admin(&self, uid: u32) -> bool {
        uid == 0 || uid == self.own_uid
    }

    /// The account of `key`, made if it has none.
    pub fn account(&self, key: AccountKey) -> Arc<Account> {
        let mut inner = self.lock();
        self.account_locked(&mut inner, key)
    }

    fn account_locked(&self, inner: &mut Inner, key: AccountKey) -> Arc<Account> {
        if let Some(live) = inner.accounts.get(&key).and_then(Weak::upgrade) {
            return live;
        }
        if inner.accounts.len() >= 1024 {
            inner.accounts.retain(|_, a| a.strong_count() > 0);
        }
        let account = Arc::new(Account {
            key: key.clone(),
            connections: AtomicUsize::new(0),
            pending: Arc::new(AtomicUsize::new(0)),
            queued: Arc::new(AtomicUsize::new(0)),
            hashing: Arc::new(Semaphore::new(self.limits.max_exe_hashes_per_uid.max(1))),
            rings: Arc::new(AtomicUsize::new(0)),
            mapped: Arc::new(AtomicUsize::new(0)),
            exempt: matches!(key, AccountKey::Uid(uid) if self.is_admin(uid)),
            limits: self.limits,
        });
        inner.accounts.insert(key, Arc::downgrade(&account));
        account
    }

    /// A slot for a local connection from `uid`: within the identity's own limit, and outside
    /// the slots kept for administrators unless `uid` is one.
    pub fn connect_local(self: &Arc<Self>, uid: u32) -> Result<ConnectionSlot, SlotRefusal> {
        let mut inner = self.lock();
        let admin = self.is_admin(uid);
        let reserved = self.limits.reserved(self.max_connections);
        let room = if admin {
            self.max_connections
        } else {
            self.max_connections - reserved
        };
        if inner.total >= room {
            return Err(SlotRefusal::Full {
                max: self.max_connections,
                reserved,
            });
        }
        let account = self.account_locked(&mut inner, AccountKey::Uid(uid));
        if !admin && account.connections.load(Ordering::Relaxed) >= self.limits.max_connections_per_uid {
            return Err(SlotRefusal::PerIdentity {
                key: AccountKey::Uid(uid),
                max: self.limits.max_connections_per_uid,
            });
        }
        let before = account.connections.fetch_add(1, Ordering::Relaxed);
        inner.total += 1;
        self.trim.started(inner.total);
        let background = !admin && before >= self.limits.foreground_connections_per_uid;
        Ok(ConnectionSlot {
            accounts: self.clone(),
            account: Some(account),
            background,
            counted: None,
        })
    }

    /// A slot for a TCP connection, whose identity is not known until its handshake: it counts
    /// in the total only, outside the administrators' slots.
    pub fn connect_remote(self: &Arc<Self>) -> Result<ConnectionSlot, SlotRefusal> {
        let mut inner = self.lock();
        let reserved = self.limits.reserved(self.max_connections);
        if inner.total >= self.max_connections - reserved {
            return Err(SlotRefusal::Full {
                max: self.max_connections,
                reserved,
            });
        }
        inner.total += 1;
        self.trim.started(inner.total);
        Ok(ConnectionSlot {
            accounts: self.clone(),
            account: None,
            background: false,
            counted: None,
        })
    }

    /// Connections being served by the background workers right now.
    pub fn background_connections(&self) -> usize {
        self.background.load(Ordering::Relaxed)
    }

    /// Counts one connection served by the background workers, for as long as the guard lives.
    pub(crate) fn serving_in_background(&self) -> super::Live {
        super::Live::new(&self.background)
    }

    /// Connections being served.
    pub fn connections(&self) -> usize {
        self.lock().total
    }

    /// Messages queued for clients over every identity.
    pub fn queued_messages(&self) -> usize {
        self.lock()
            .accounts
            .values()
            .filter_map(Weak::upgrade)
            .map(|a| a.queued.load(Ordering::Relaxed))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(per_uid: usize, reserved: usize) -> Limits {
        Limits {
            max_connections_per_uid: per_uid,
            reserved_connections: Some(reserved),
            ..Limits::default()
        }
    }

    #[test]
    fn one_uid_cannot_take_every_slot() {
        let accounts = Accounts::new(10, limits(4, 2));
        let held: Vec<_> = (0..4).map(|_| accounts.connect_local(1000).unwrap()).collect();
        assert!(matches!(
            accounts.connect_local(1000),
            Err(SlotRefusal::PerIdentity { max: 4, .. })
        ));
        assert!(accounts.connect_local(1001).is_ok(), "another uid is unaffected");
        drop(held);
        assert!(
            accounts.connect_local(1000).is_ok(),
            "slots come back when connections close"
        );
    }

    #[test]
    fn reserved_slots_are_kept_for_root() {
        let accounts = Accounts::new(4, limits(10, 2));
        let _a = accounts.connect_local(1000).unwrap();
        let _b = accounts.connect_local(1001).unwrap();
        assert!(matches!(
            accounts.connect_local(1002),
            Err(SlotRefusal::Full { max: 4, reserved: 2 })
        ));
        assert!(matches!(accounts.connect_remote(), Err(SlotRefusal::Full { .. })));
        let _root = accounts.connect_local(0).unwrap();
        let _root2 = accounts.connect_local(0).unwrap();
        assert!(accounts.connect_local(0).is_err(), "the total still holds");
        assert_eq!(accounts.connections(), 4);
    }

    #[tokio::test]
    async fn hashing_is_one_at_a_time_per_uid() {
        let accounts = Accounts::new(10, Limits::default());
        let held = accounts.account(AccountKey::Uid(7)).hashing_slot().await.unwrap();
        let again = accounts.account(AccountKey::Uid(7));
        let next = tokio::spawn(async move { again.hashing_slot().await.is_some() });
        // Another uid's executable is hashed meanwhile.
        assert!(accounts.account(AccountKey::Uid(8)).hashing_slot().await.is_some());
        tokio::task::yield_now().await;
        assert!(!next.is_finished(), "a second hash for the same uid waits its turn");
        drop(held);
        assert!(next.await.unwrap());
    }

    #[test]
    fn pending_calls_are_bounded_per_account_and_released() {
        let accounts = Accounts::new(
            10,
            Limits {
                max_pending_calls_per_uid: 2,
                ..Limits::default()
            },
        );
        let account = accounts.account(AccountKey::Uid(5));
        let a = account.take_pending().unwrap();
        let _b = accounts.account(AccountKey::Uid(5)).take_pending().unwrap();
        assert!(account.take_pending().is_none());
        assert!(accounts.account(AccountKey::Uid(6)).take_pending().is_some());
        drop(a);
        assert!(account.take_pending().is_some());
    }

    #[test]
    fn rings_and_mapped_bytes_are_bounded_per_uid_but_not_for_root() {
        let accounts = Accounts::new(
            10,
            Limits {
                max_rings_per_uid: 2,
                max_mapped_bytes_per_uid: 3 << 20,
                ..Limits::default()
            },
        );
        let user = accounts.account(AccountKey::Uid(1000));
        let rings = [user.take_ring().unwrap(), user.take_ring().unwrap()];
        assert!(user.take_ring().is_none());
        assert!(accounts.account(AccountKey::Uid(1001)).take_ring().is_some());
        drop(rings);
        assert!(user.take_ring().is_some());
        let two = user.take_mapped(2 << 20).unwrap();
        assert!(user.take_mapped(2 << 20).is_none(), "4 MiB is past 3 MiB");
        let one = user.take_mapped(1 << 20).unwrap();
        assert!(user.take_mapped(1).is_none());
        drop(two);
        assert!(user.take_mapped(2 << 20).is_some());
        drop(one);
        assert!(user.take_mapped(u64::MAX).is_none());
        let root = accounts.account(AccountKey::Uid(0));
        let held: Vec<_> = (0..10).map(|_| root.take_ring().unwrap()).collect();
        assert!(root.take_mapped(64 << 20).is_some());
        drop(held);
    }
}
