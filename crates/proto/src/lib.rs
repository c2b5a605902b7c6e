//! The generated updraft.v1 API: messages, clients and servers for every service.
#![allow(clippy::all, clippy::pedantic)]

pub mod v1 {
    tonic::include_proto!("updraft.v1");
}

pub use v1::*;

/// The encoded descriptors of every updraft.v1 file, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/updraft.fds.bin"));

/// The codec of every generated client and server: prost, with buffers that start small.
/// tonic's default starts every call's encode and decode buffers at 8 KiB each, which a
/// provider holding a push stream per machine pays per connected machine; messages here are
/// mostly far smaller (a check answer is about half a kilobyte), and a buffer grows when one
/// is not.
pub mod codec {
    use std::any::TypeId;
    use std::marker::PhantomData;

    use tonic::codec::BufferSettings;
    use tonic_prost::{ProstDecoder, ProstEncoder};

    /// Initial buffer per call and direction.
    pub const BUFFER_BYTES: usize = 1024;
    /// Initial encode buffer of a push stream, which stays open as long as its agent is
    /// connected: what is left of the buffer after each event is kept with the stream, and an
    /// event ([`crate::v1::PushEvent`]) is a few dozen bytes.
    pub const PUSH_BUFFER_BYTES: usize = 128;
    /// Streamed messages are sent once this much is buffered (tonic's default).
    pub const YIELD_BYTES: usize = 32 * 1024;

    /// The initial encode buffer for messages of type `T`.
    pub fn encode_buffer<T: 'static>() -> usize {
        if TypeId::of::<T>() == TypeId::of::<crate::v1::PushEvent>() { PUSH_BUFFER_BYTES } else { BUFFER_BYTES }
    }

    pub struct Codec<T, U>(PhantomData<(T, U)>);

    impl<T, U> Default for Codec<T, U> {
        fn default() -> Self {
            Self(PhantomData)
        }
    }

    impl<T, U> tonic::codec::Codec for Codec<T, U>
    where
        T: prost::Message + Send + 'static,
        U: prost::Message + Default + Send + 'static,
    {
        type Encode = T;
        type Decode = U;
        type Encoder = ProstEncoder<T>;
        type Decoder = ProstDecoder<U>;

        fn encoder(&mut self) -> Self::Encoder {
            ProstEncoder::new(BufferSettings::new(encode_buffer::<T>(), YIELD_BYTES))
        }

        fn decoder(&mut self) -> Self::Decoder {
            ProstDecoder::new(BufferSettings::new(BUFFER_BYTES, YIELD_BYTES))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::codec::{BUFFER_BYTES, PUSH_BUFFER_BYTES, encode_buffer};
    use super::v1::{CheckResponse, Chunk, PushEvent};

    /// A push stream's encoder starts small (its leftover buffer lives as long as the agent is
    /// connected); every other call's starts at the common size.
    #[test]
    fn push_events_are_encoded_into_a_small_buffer() {
        assert_eq!(encode_buffer::<PushEvent>(), PUSH_BUFFER_BYTES);
        assert_eq!((encode_buffer::<CheckResponse>(), encode_buffer::<Chunk>()), (BUFFER_BYTES, BUFFER_BYTES));
        assert!(PUSH_BUFFER_BYTES < BUFFER_BYTES);
    }
}
