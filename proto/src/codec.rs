//! The gRPC codec of the `Broker` service: prost's, with small buffers.
//!
//! tonic allocates a codec buffer per direction for every RPC before a byte moves, 8 KiB each by
//! default, and a `Session` stream lives as long as the app's session: two of them were 16 KiB
//! of every idle gRPC session. Almost every message the broker exchanges (a call's scalars, its
//! status, an event) is tens of bytes, so the buffers start at [`BUFFER_SIZE`] and grow, in
//! steps of that size, only for a message that needs it.

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Where each direction's buffer starts, and the step it grows by.
pub const BUFFER_SIZE: usize = 512;

/// How many bytes of ready messages a stream gathers into one write at most (tonic's default).
const YIELD_THRESHOLD: usize = 32 * 1024;

/// prost encoding with buffers of [`BUFFER_SIZE`]; the generated client and server use it.
#[derive(Debug, Clone, Copy)]
pub struct LeanCodec<T, U>(PhantomData<fn() -> (T, U)>);

impl<T, U> Default for LeanCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

fn settings() -> BufferSettings {
    BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD)
}

impl<T, U> Codec for LeanCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(settings())
    }
}

#[cfg(test)]
mod tests {
    use tonic::codec::{Decoder, Encoder};

    use super::*;
    use crate::pb::{CallMethod, CallResult};

    #[test]
    fn both_directions_start_small() {
        // BufferSettings keeps its fields to itself; its Debug form shows them.
        let small = format!("buffer_size: {BUFFER_SIZE},");
        let mut codec = LeanCodec::<CallMethod, CallResult>::default();
        let settings = [
            format!("{:?}", codec.encoder().buffer_settings()),
            format!("{:?}", codec.decoder().buffer_settings()),
        ];
        for s in settings {
            assert!(s.contains(&small), "{s}");
        }
    }
}
