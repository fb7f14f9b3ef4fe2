//! The power domain (I/O Kit's `IOPMrootDomain`): the broker's own service for the machine's
//! sleep and wake. Apps read the power state, and — with the `power.assert` privilege — hold a
//! sleep assertion (`IOPMAssertionCreateWithName` with `PreventSystemSleep`), which the broker
//! holds as a logind *block* inhibitor for as long as the user client holds it, released when
//! the client goes, however it goes.

mod device;
mod methods;

pub use device::{FAMILY, PowerDomain};
pub use methods::Selector;
