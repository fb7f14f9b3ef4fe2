//! Struct layouts across ABIs: descriptions, the closed ABI list, C layout computation and the
//! translation plans the broker runs between a client's layout and its own.

mod abi;
mod c;
mod compute;
mod desc;
mod plan;

pub use abi::{ABIS, Abi, AbiId};
pub use compute::{FieldLayout, StructLayout};
pub use desc::{Elem, Field, LayoutError, SCALAR_NAMES, Scalar, Schema, StructDesc};
pub use plan::{Plan, TranslateError};

#[cfg(test)]
mod tests;
