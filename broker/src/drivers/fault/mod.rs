//! A driver made to fail, for the tests that prove one driver's bug stays that driver's problem:
//! a panic in a method ends the call with `INTERNAL` and terminates that one service. Built
//! only with the `fault-injection` feature (the test suite's broker); never in a release. With
//! the property `leak_on_open = true` it leaks a descriptor at every open, the leak `portcullis
//! qualify` must find.

mod device;
mod methods;

pub use device::{FAMILY, FaultDevice};
