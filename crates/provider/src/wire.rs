//! Blob streams on the wire without a copy. tonic's codec encodes every message into a buffer
//! of its own, so each 256 KiB download chunk would be copied once more on its way out (the
//! largest single cost in a profile of a download). Here `AgentApi/Download` and
//! `Replication/FetchBlob` are answered below the codec: each chunk leaves as a small header —
//! the gRPC frame prefix, the chunk's other fields and the tag and length of its data — then
//! the data itself, the very bytes read from the file, shared rather than copied. Protobuf
//! fields may come in any order, so a reader sees an ordinary `Chunk`.
//!
//! What is served, and every rule about it, is still [`agent_api::serve_blob`] and
//! [`agent_api::download_slot`]; every other method goes to the generated service untouched,
//! after the same authentication layer.
use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use futures::StreamExt;
use http_body::Frame;
use http_body_util::BodyExt;
use prost::Message;
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint};
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::{BoxFuture, Service, http};
use tonic::server::NamedService;
use updraft_proto::v1::{BlobRequest, Chunk};

use crate::Shared;
use crate::agent_api::{self, ChunkStream, Tier};

/// The methods answered here.
pub const DOWNLOAD: &str = "/updraft.v1.AgentApi/Download";
pub const FETCH_BLOB: &str = "/updraft.v1.Replication/FetchBlob";
/// A blob request is a hash and an offset: anything much larger is not one.
const MAX_REQUEST_BYTES: usize = 4096;

/// The generated service `S` with its blob method answered without a copy.
pub struct BlobRoute<S, T> {
    inner: S,
    shared: Arc<Shared>,
    tier: Arc<T>,
}

impl<S, T> BlobRoute<S, T> {
    pub fn new(inner: S, shared: Arc<Shared>, tier: Arc<T>) -> Self {
        Self { inner, shared, tier }
    }
}

impl<S: Clone, T> Clone for BlobRoute<S, T> {
    fn clone(&self) -> Self {
        Self { inner: self.inner.clone(), shared: self.shared.clone(), tier: self.tier.clone() }
    }
}

impl<S: NamedService, T> NamedService for BlobRoute<S, T> {
    const NAME: &'static str = S::NAME;
}

impl<S, T> Service<http::Request<Body>> for BlobRoute<S, T>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
    T: Tier,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let path = req.uri().path();
        let to_agent = path == DOWNLOAD;
        if !to_agent && path != FETCH_BLOB {
            return Box::pin(self.inner.call(req));
        }
        let (shared, tier) = (self.shared.clone(), self.tier.clone());
        Box::pin(async move {
            Ok(match answer(&shared, &*tier, req, to_agent).await {
                Ok(r) => r,
                Err(status) => status.into_http(),
            })
        })
    }
}

/// Reads the one request message, then answers with the blob's chunks as frames.
async fn answer<T: Tier>(
    shared: &Shared,
    tier: &T,
    req: http::Request<Body>,
    to_agent: bool,
) -> Result<http::Response<Body>, Status> {
    let caller = req.extensions().get::<crate::auth::Caller>().cloned();
    let member_fetch = req.headers().contains_key(crate::content::MEMBER_FETCH);
    let body = http_body_util::Limited::new(req.into_body(), MAX_REQUEST_BYTES)
        .collect()
        .await
        .map_err(|e| Status::invalid_argument(format!("blob request: {e}")))?
        .to_bytes();
    let request = decode_request(&body)?;
    // Agents take a download slot (see `download_slot`: what they may fetch, how many at
    // once); sites are few and each serves many machines.
    let slot = if to_agent {
        Some(agent_api::download_slot(shared, caller.as_ref(), &request.content_hash).await?)
    } else {
        None
    };
    if member_fetch && !shared.blobs.has(&request.content_hash) {
        return Err(crate::error::ProviderError::BlobMissing(request.content_hash).into());
    }
    let chunks = agent_api::serve_blob(shared, tier, request, slot).await?;
    let mut response = http::Response::new(Body::new(http_body_util::StreamBody::new(frames(chunks))));
    response.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/grpc"));
    Ok(response)
}

/// One uncompressed gRPC message: the 5-byte prefix, then a `BlobRequest`.
fn decode_request(body: &[u8]) -> Result<BlobRequest, Status> {
    let bad = |why: &str| Status::invalid_argument(format!("blob request: {why}"));
    let (prefix, message) = body.split_at_checked(5).ok_or_else(|| bad("shorter than a gRPC frame"))?;
    if prefix[0] != 0 {
        return Err(bad("compressed messages are not accepted"));
    }
    let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
    if len != message.len() {
        return Err(bad("not exactly one message"));
    }
    BlobRequest::decode(message).map_err(|e| bad(&e.to_string()))
}

/// The chunks as HTTP/2 frames: two data frames each, then trailers with the outcome.
fn frames(chunks: ChunkStream) -> impl futures::Stream<Item = Result<Frame<Bytes>, Status>> + Send {
    futures::stream::unfold(Some(chunks), |state| async move {
        let mut chunks = state?;
        match chunks.next().await {
            Some(Ok(chunk)) => {
                let [head, data] = encode_chunk(chunk);
                Some((vec![Frame::data(head), Frame::data(data)], Some(chunks)))
            }
            Some(Err(status)) => Some((vec![Frame::trailers(trailers(&status))], None)),
            None => Some((vec![Frame::trailers(trailers(&Status::ok("")))], None)),
        }
    })
    .flat_map(|frames| futures::stream::iter(frames.into_iter().map(Ok)))
}

fn trailers(status: &Status) -> http::HeaderMap {
    let mut h = http::HeaderMap::new();
    if status.add_header(&mut h).is_err() {
        h.clear();
        h.insert("grpc-status", http::HeaderValue::from_static("13"));
    }
    h
}

/// A chunk as a gRPC message in two pieces: everything but the data (copied, a few bytes),
/// and the data (shared).
fn encode_chunk(chunk: Chunk) -> [Bytes; 2] {
    let Chunk { offset, data, total_size } = chunk;
    let rest = Chunk { offset, data: Bytes::new(), total_size };
    let data_head = 1 + encoded_len_varint(data.len() as u64);
    let len = rest.encoded_len() + data_head + data.len();
    let mut head = BytesMut::with_capacity(5 + rest.encoded_len() + data_head);
    head.put_u8(0);
    head.put_u32(len as u32);
    rest.encode(&mut head).expect("the buffer was sized for it");
    encode_key(2, WireType::LengthDelimited, &mut head);
    encode_varint(data.len() as u64, &mut head);
    [head.freeze(), data]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunk_in_two_pieces_decodes_as_the_chunk() {
        for (offset, size, total) in [(0u64, 0usize, 0u64), (7, 1, 8), (1 << 40, 256 * 1024, u64::MAX), (300, 127, 128)]
        {
            let chunk = Chunk { offset, data: Bytes::from(vec![0xA5; size]), total_size: total };
            let [head, data] = encode_chunk(chunk.clone());
            let mut wire = head.to_vec();
            wire.extend_from_slice(&data);
            assert_eq!(wire[0], 0, "uncompressed");
            let len = u32::from_be_bytes(wire[1..5].try_into().unwrap()) as usize;
            assert_eq!(len, wire.len() - 5, "the prefix gives the message length");
            assert_eq!(Chunk::decode(&wire[5..]).unwrap(), chunk);
        }
    }

    #[test]
    fn a_blob_request_is_one_uncompressed_message() {
        let msg = BlobRequest { content_hash: "sha256:00".into(), offset: 5 };
        let mut body = vec![0u8];
        body.extend_from_slice(&(msg.encoded_len() as u32).to_be_bytes());
        body.extend_from_slice(&msg.encode_to_vec());
        assert_eq!(decode_request(&body).unwrap(), msg);
        let mut compressed = body.clone();
        compressed[0] = 1;
        assert!(decode_request(&compressed).unwrap_err().message().contains("compressed"));
        assert!(decode_request(&body[..body.len() - 1]).unwrap_err().message().contains("exactly one"));
        assert!(decode_request(&body[..3]).unwrap_err().message().contains("shorter"));
        let mut two = body.clone();
        two.extend_from_slice(&body);
        assert!(decode_request(&two).is_err());
    }
}
