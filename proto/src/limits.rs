//! Bounds on client input, the same for every transport. A request outside them is refused
//! before anything is allocated from its lengths.

/// Largest gRPC message either side encodes or decodes (set explicitly on client and server).
pub const MAX_GRPC_MESSAGE: usize = 256 * 1024;

/// Most scalar arguments or results of one method call (I/O Kit allows 16).
pub const MAX_SCALARS: usize = 16;

/// Largest struct input or output any method table may declare.
pub const MAX_STRUCT: u32 = 64 * 1024;

/// Most user clients one session may hold open at once, unless the configuration says otherwise
/// (`limits.max_user_clients_per_session`).
pub const MAX_USER_CLIENTS_PER_SESSION: usize = 256;

/// Most asynchronous calls one session may have pending at once.
pub const MAX_PENDING_CALLS_PER_SESSION: usize = 1024;

/// Most services one subscription may name.
pub const MAX_SUBSCRIBED_SERVICES: usize = 256;

/// Matching notifications one session may hold.
pub const MAX_MATCHING_WATCHES: usize = 16;
