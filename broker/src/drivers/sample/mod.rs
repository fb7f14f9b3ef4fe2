//! The sample device: the demo and test driver. Its methods exercise every path of the call
//! model: scalars, structs, an asynchronous completion, driver notifications and a privilege.

mod device;
mod methods;

pub use device::{FAMILY, SampleDevice};
pub use methods::{SAMPLE_VERSION, Selector};

/// The sample device's struct descriptions (for tests and fuzzing of translation).
pub(crate) use methods::LAYOUTS;
