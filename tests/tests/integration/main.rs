//! Integration tests against a real `portcullis` broker process on real sockets.

#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod abi_matrix;
mod bad_input;
mod block;
mod cli;
mod client_example;
mod concurrency;
mod decision_log;
mod discovery;
mod exclusive;
mod faults;
mod gate;
mod limits;
mod native;
mod net;
mod policy;
mod policy_tools;
mod power;
mod python_client;
mod qualify;
mod reload;
mod ring;
mod sandbox;
mod session;
mod systemd;
mod tls;
mod tty;
