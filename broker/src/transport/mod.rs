//! Transports: decode a client's bytes, call the session core, encode the answer. No policy or
//! driver logic lives here.

pub mod grpc;
