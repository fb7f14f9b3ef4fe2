//! The block family (`BlockDevice`): a block device node (a disk, a partition, a loop device
//! over a file in tests) whose blocks clients read and write through their `dma` memory.

mod device;
mod methods;
#[allow(unsafe_code)]
mod sys;

pub use device::{BlockDevice, FAMILY};
pub use methods::{DMA, Selector};
