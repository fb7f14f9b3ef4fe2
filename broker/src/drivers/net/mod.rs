//! The net family (`NetDevice`): a TUN interface the broker creates and owns; clients send and
//! receive IP packets through it, and with `net.admin` bring it up or down and set its MTU.

mod device;
mod methods;
#[allow(unsafe_code)]
mod sys;

pub(crate) use device::set_link;
pub use device::{FAMILY, NetDevice, open_tun};
pub use methods::{BATCH_MAX, PACKET_MAX, PACKETS, RECORD_HEADER, Selector};
