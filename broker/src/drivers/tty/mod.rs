//! The tty family (`TtyDevice`): a tty character device — a serial port on a real machine, the
//! follower side of a pty pair in tests — owned by the broker, one user client at a time.

mod device;
mod methods;
#[allow(unsafe_code)]
mod sys;

pub use device::{FAMILY, TtyDevice};
pub use methods::{IO_MAX, Selector, modem};
