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
    use std::marker::PhantomData;

    use tonic::codec::BufferSettings;
    use tonic_prost::{ProstDecoder, ProstEncoder};

    /// Initial buffer per call and direction.
    pub const BUFFER_BYTES: usize = 1024;
    /// Streamed messages are sent once this much is buffered (tonic's default).
    pub const YIELD_BYTES: usize = 32 * 1024;

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
            ProstEncoder::new(BufferSettings::new(BUFFER_BYTES, YIELD_BYTES))
        }

        fn decoder(&mut self) -> Self::Decoder {
            ProstDecoder::new(BufferSettings::new(BUFFER_BYTES, YIELD_BYTES))
        }
    }
}
