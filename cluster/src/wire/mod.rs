//! The wire encoding of the messages that may cross nodes.
//!
//! A message between actors on one node is a Rust value with reply ports in it. Between nodes
//! it is bytes. This module is the mapping, kept apart from any socket (the actors know nothing
//! of sockets; the cluster crate moves the bytes):
//!
//! - [`Remote`]: a message type with a wire form. `into_call` splits a local message into its
//!   [`Remote::Call`] (the message without reply ports, serialisable) and a [`Responder`] that
//!   puts the remote answer into the caller's reply port. `from_call` does the reverse on the
//!   receiving node: it builds the local message with a fresh reply port and returns the
//!   [`Pending`] answer to send back. Self-messages (`Poll`, `Pull`) and messages that carry a
//!   local channel are *local-only* and refused with [`WireError::LocalOnly`].
//! - Frames: a call or answer, inside its [`Envelope`] (so trace context travels), is encoded
//!   with `rmp-serde` and cut into frames of at most [`MAX_FRAME`] bytes, header included,
//!   because `ractor_cluster` (and any sane peer) refuses larger frames. A shard snapshot of a
//!   few GiB therefore travels as many frames; [`Reassembler`] puts them back together, with
//!   frames of several messages interleaved on one connection.
//! - Float and key blocks travel as raw little-endian bytes ([`f32_bytes`], [`u64_bytes`]), not
//!   element by element: msgpack spends up to 9 bytes on one u64 and 5 on one f32, and a
//!   lookup answer is millions of floats.
//!
//! Every implementation of [`Remote`] is in [`messages`], so one file lists everything that
//! may cross nodes. Each is round-tripped by a test in `wire/tests.rs`, through frames and,
//! for the shard, through a real ShardOwner behind a [`Loopback`] hop.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;

use ractor::RpcReplyPort;
use serde::de::DeserializeOwned;
use serde::Serialize;
use thiserror::Error;

use freshet_actors::envelope::Envelope;

mod loopback;
pub mod messages;

pub use freshet_actors::embedding::snapshot::f32_bytes;
pub use loopback::{Loopback, LoopbackStats};
pub use messages::*;

/// The largest frame, header included: `ractor_cluster`'s default frame limit.
pub const MAX_FRAME: usize = 16 * 1024 * 1024;

/// Bytes of a frame's header.
pub const HEADER: usize = 36;

/// The largest payload of one frame.
pub const MAX_CHUNK: usize = MAX_FRAME - HEADER;

/// "FRW" and the frame format version. A peer speaking another version is refused at the
/// first frame rather than misread.
const MAGIC: [u8; 4] = *b"FRW1";

/// What encoding, framing or answering can fail with. Callers act on the case: a malformed
/// frame closes the connection it came on, a local-only message is a caller bug, a vanished
/// caller is normal (it timed out).
#[derive(Debug, Error)]
pub enum WireError {
    #[error("{0} is local-only: it never crosses nodes")]
    LocalOnly(&'static str),
    #[error("encoding {what}: {source}")]
    Encode {
        what: &'static str,
        #[source]
        source: rmp_serde::encode::Error,
    },
    #[error("decoding {what}: {source}")]
    Decode {
        what: &'static str,
        #[source]
        source: rmp_serde::decode::Error,
    },
    #[error("malformed frame: {0}")]
    Frame(String),
    #[error("message of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: u64, limit: u64 },
    #[error("the answer to `{call}` is of another kind")]
    UnexpectedAnswer { call: &'static str },
    /// The receiving actor dropped the reply port without answering (it stopped or failed).
    #[error("the actor stopped before answering")]
    NoAnswer,
    /// The local caller is gone (it timed out or stopped) before the answer came back.
    #[error("the caller is gone")]
    CallerGone,
}

/// Puts a remote answer into the local caller's reply port.
pub type Responder<A> = Box<dyn FnOnce(A) -> Result<(), WireError> + Send>;

/// A message split for the wire: the call, and where its answer goes (none for a cast).
pub type Split<C, A> = (C, Option<Responder<A>>);

/// The answer a local actor will give to a call that came from another node.
pub struct Pending<A>(Pin<Box<dyn Future<Output = Result<A, WireError>> + Send>>);

impl<A> fmt::Debug for Pending<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Pending")
    }
}

impl<A> Pending<A> {
    pub async fn answer(self) -> Result<A, WireError> {
        self.0.await
    }
}

/// A message type whose messages may cross nodes.
pub trait Remote: Sized + Send + 'static {
    /// The message as it travels: every reply port left out.
    type Call: Serialize + DeserializeOwned + fmt::Debug + Send + 'static;
    /// Every answer any call can get, in one type.
    type Answer: Serialize + DeserializeOwned + fmt::Debug + Send + 'static;

    /// Splits a message into what travels and, for a call with a reply, where its answer goes.
    fn into_call(self) -> Result<Split<Self::Call, Self::Answer>, WireError>;

    /// Builds the local message for a call that arrived, and the answer it will get.
    fn from_call(call: Self::Call) -> (Self, Option<Pending<Self::Answer>>);
}

/// A reply port for a call built on the receiving node, and the answer it will give.
pub fn remote_port<T, A>(wrap: fn(T) -> A) -> (RpcReplyPort<T>, Pending<A>)
where
    T: Send + 'static,
    A: Send + 'static,
{
    let (tx, rx) = ractor::concurrency::oneshot();
    let pending = Pending(Box::pin(async move {
        rx.await.map(wrap).map_err(|_| WireError::NoAnswer)
    }));
    (tx.into(), pending)
}

/// The responder that unpacks an answer of kind `call` into the caller's port.
pub fn responder<T, A>(
    port: RpcReplyPort<T>,
    call: &'static str,
    unwrap: fn(A) -> Option<T>,
) -> Responder<A>
where
    T: Send + 'static,
    A: Send + 'static,
{
    Box::new(move |answer| {
        let value = unwrap(answer).ok_or(WireError::UnexpectedAnswer { call })?;
        port.send(value).map_err(|_| WireError::CallerGone)
    })
}

/// Encodes a value (a call or an answer in its envelope) as one msgpack payload.
pub fn encode<T: Serialize>(what: &'static str, value: &T) -> Result<Vec<u8>, WireError> {
    rmp_serde::to_vec_named(value).map_err(|source| WireError::Encode { what, source })
}

/// Decodes a payload written by [`encode`].
pub fn decode<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T, WireError> {
    rmp_serde::from_slice(bytes).map_err(|source| WireError::Decode { what, source })
}

/// An envelope's call, encoded and cut into frames.
pub fn encode_message<C: Serialize>(
    what: &'static str,
    id: u64,
    message: &Envelope<C>,
) -> Result<Vec<Vec<u8>>, WireError> {
    Ok(frames(id, &encode(what, message)?))
}

/// One frame: a chunk of one message.
///
/// Header, little-endian: magic `FRW1` (4), message id (8), chunk index (4), chunk count (4),
/// message length (8), payload length (4), CRC-32C of the payload (4) = [`HEADER`] bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub id: u64,
    pub index: u32,
    pub count: u32,
    /// Length of the whole message, the same in every chunk.
    pub total: u64,
    pub payload: Vec<u8>,
}

/// Cuts a message into frames of at most [`MAX_FRAME`] bytes.
pub fn frames(id: u64, message: &[u8]) -> Vec<Vec<u8>> {
    frames_of(id, message, MAX_CHUNK)
}

/// Cuts a message into frames whose payloads hold at most `chunk` bytes (at most
/// [`MAX_CHUNK`]).
pub fn frames_of(id: u64, message: &[u8], chunk: usize) -> Vec<Vec<u8>> {
    let chunk = chunk.clamp(1, MAX_CHUNK);
    let chunks: Vec<&[u8]> = if message.is_empty() {
        vec![&[]]
    } else {
        message.chunks(chunk).collect()
    };
    let count = chunks.len() as u32;
    chunks
        .into_iter()
        .enumerate()
        .map(|(i, chunk)| {
            let mut f = vec![0; HEADER];
            let head = FrameHead {
                id,
                index: i as u32,
                count,
                total: message.len() as u64,
            };
            head.write(&mut f, chunk);
            f.extend_from_slice(chunk);
            f
        })
        .collect()
}

/// `value` encoded and cut into frames of at most `chunk` payload bytes, one per packet.
///
/// A message that fits one chunk (every lookup and push of a training step) is encoded
/// straight after room for its header, which is filled in afterwards: its bytes are written
/// once, into the buffer that is sent. Only a larger one is cut, and copied once doing so.
pub fn encode_frames<T: Serialize>(
    what: &'static str,
    id: u64,
    value: &T,
    chunk: usize,
) -> Result<Vec<Vec<u8>>, WireError> {
    let mut buf = vec![0; HEADER];
    rmp_serde::encode::write_named(&mut buf, value)
        .map_err(|source| WireError::Encode { what, source })?;
    let len = buf.len() - HEADER;
    if len > chunk.clamp(1, MAX_CHUNK) {
        return Ok(frames_of(id, &buf[HEADER..], chunk));
    }
    let (head, payload) = buf.split_at_mut(HEADER);
    let h = FrameHead {
        id,
        index: 0,
        count: 1,
        total: len as u64,
    };
    h.write(head, payload);
    Ok(vec![buf])
}

fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

/// A frame's header fields, the payload's length and CRC aside.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHead {
    pub id: u64,
    pub index: u32,
    pub count: u32,
    /// Length of the whole message, the same in every chunk.
    pub total: u64,
}

impl FrameHead {
    /// Writes the header of a frame carrying `payload` into `out[..HEADER]`.
    fn write(&self, out: &mut [u8], payload: &[u8]) {
        out[..4].copy_from_slice(&MAGIC);
        out[4..12].copy_from_slice(&self.id.to_le_bytes());
        out[12..16].copy_from_slice(&self.index.to_le_bytes());
        out[16..20].copy_from_slice(&self.count.to_le_bytes());
        out[20..28].copy_from_slice(&self.total.to_le_bytes());
        out[28..32].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        out[32..36].copy_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    }

    /// Checks the frame at the start of `buf` in place: `Ok(None)` while it is incomplete,
    /// else its header and the bytes it takes (its payload is `buf[HEADER..end]`).
    fn check(buf: &[u8]) -> Result<Option<(FrameHead, usize)>, WireError> {
        if buf.len() < HEADER {
            // A wrong magic is reported as soon as its bytes are in.
            let n = buf.len().min(4);
            if buf[..n] != MAGIC[..n] {
                return Err(WireError::Frame(
                    "bad magic: not a Freshet wire stream".into(),
                ));
            }
            return Ok(None);
        }
        if buf[..4] != MAGIC {
            return Err(WireError::Frame(format!(
                "bad magic {:?}: not a Freshet wire stream (or another version)",
                &buf[..4]
            )));
        }
        let id = le_u64(&buf[4..12]);
        let index = le_u32(&buf[12..16]);
        let count = le_u32(&buf[16..20]);
        let total = le_u64(&buf[20..28]);
        let len = le_u32(&buf[28..32]) as usize;
        if len > MAX_CHUNK {
            return Err(WireError::Frame(format!(
                "frame payload of {len} bytes exceeds {MAX_CHUNK}"
            )));
        }
        if count == 0 || index >= count {
            return Err(WireError::Frame(format!(
                "chunk {index} of {count} in message {id}"
            )));
        }
        let end = HEADER + len;
        if buf.len() < end {
            return Ok(None);
        }
        let crc = le_u32(&buf[32..36]);
        if crc32c::crc32c(&buf[HEADER..end]) != crc {
            return Err(WireError::Frame(format!(
                "checksum mismatch in chunk {index} of message {id}"
            )));
        }
        let head = FrameHead {
            id,
            index,
            count,
            total,
        };
        Ok(Some((head, end)))
    }
}

impl Frame {
    /// The message id in a frame's header, when its magic is right and the id's bytes are
    /// in, whatever else is wrong with it: a node answers a malformed frame to that id.
    pub fn peek_id(buf: &[u8]) -> Option<u64> {
        (buf.len() >= 12 && buf[..4] == MAGIC).then(|| le_u64(&buf[4..12]))
    }

    /// Reads the frame at the start of `buf`: `Ok(None)` while it is incomplete, else the
    /// frame and the bytes it took. Anything malformed is an error: the stream cannot be
    /// resynchronised after it, so the connection must be closed.
    pub fn decode(buf: &[u8]) -> Result<Option<(Frame, usize)>, WireError> {
        let Some((h, end)) = FrameHead::check(buf)? else {
            return Ok(None);
        };
        let frame = Frame {
            id: h.id,
            index: h.index,
            count: h.count,
            total: h.total,
            payload: buf[HEADER..end].to_vec(),
        };
        Ok(Some((frame, end)))
    }
}

/// A whole message as the [`Reassembler`] gives it: a message of one frame stays in the
/// buffer it arrived in, its bytes after the header.
#[derive(Debug)]
pub struct Message {
    buf: Vec<u8>,
    start: usize,
}

impl Message {
    pub fn bytes(&self) -> &[u8] {
        &self.buf[self.start..]
    }
}

/// Limits of a [`Reassembler`]: a peer cannot make a node buffer without bound.
#[derive(Clone, Copy, Debug)]
pub struct ReassemblyLimits {
    /// The largest message accepted.
    pub max_message: u64,
    /// Messages in progress at once.
    pub max_partial: usize,
}

impl Default for ReassemblyLimits {
    fn default() -> Self {
        Self {
            // A shard snapshot of a large table; beyond it, use a checkpoint file.
            max_message: 8 << 30,
            max_partial: 64,
        }
    }
}

#[derive(Debug)]
struct Partial {
    count: u32,
    next: u32,
    total: u64,
    bytes: Vec<u8>,
}

/// Puts chunked messages back together. Frames of one message arrive in order (one
/// connection is ordered); frames of different messages may interleave, so a small lookup is
/// not stuck behind a snapshot.
#[derive(Debug, Default)]
pub struct Reassembler {
    limits: ReassemblyLimits,
    partial: HashMap<u64, Partial>,
}

impl Reassembler {
    pub fn new(limits: ReassemblyLimits) -> Self {
        Self {
            limits,
            partial: HashMap::new(),
        }
    }

    /// Messages with some but not all of their frames in.
    pub fn in_progress(&self) -> usize {
        self.partial.len()
    }

    /// Takes one frame; returns the message id and bytes when its last frame is in.
    pub fn push(&mut self, frame: Frame) -> Result<Option<(u64, Vec<u8>)>, WireError> {
        let head = FrameHead {
            id: frame.id,
            index: frame.index,
            count: frame.count,
            total: frame.total,
        };
        let whole = self.take(head, frame.payload, 0)?;
        Ok(whole.map(|(id, m)| (id, m.buf)))
    }

    /// Takes a buffer that holds exactly one frame (a packet's), checked where it lies;
    /// returns the message when its last frame is in. A message of one frame is not copied.
    pub fn push_packet(&mut self, packet: Vec<u8>) -> Result<Option<(u64, Message)>, WireError> {
        let checked = FrameHead::check(&packet).inspect_err(|_| {
            // A message with a broken packet never completes: drop what came of it.
            if let Some(id) = Frame::peek_id(&packet) {
                self.partial.remove(&id);
            }
        })?;
        let head = match checked {
            Some((h, end)) if end == packet.len() => h,
            Some((h, end)) => {
                self.partial.remove(&h.id);
                return Err(WireError::Frame(format!(
                    "a packet of {} bytes holds a frame of {end} and more",
                    packet.len()
                )));
            }
            None => {
                if let Some(id) = Frame::peek_id(&packet) {
                    self.partial.remove(&id);
                }
                return Err(WireError::Frame(format!(
                    "a packet of {} bytes holds a cut frame",
                    packet.len()
                )));
            }
        };
        self.take(head, packet, HEADER)
    }

    /// One frame, its payload at `buf[start..]`.
    fn take(
        &mut self,
        head: FrameHead,
        buf: Vec<u8>,
        start: usize,
    ) -> Result<Option<(u64, Message)>, WireError> {
        let FrameHead {
            id,
            index,
            count,
            total,
        } = head;
        let payload = &buf[start..];
        if total > self.limits.max_message {
            self.partial.remove(&id);
            return Err(WireError::TooLarge {
                size: total,
                limit: self.limits.max_message,
            });
        }
        if count == 1 {
            if index != 0 || payload.len() as u64 != total {
                return Err(WireError::Frame(format!(
                    "single-frame message {id} of {total} bytes carries {} bytes",
                    payload.len()
                )));
            }
            if self.partial.contains_key(&id) {
                self.partial.remove(&id);
                return Err(WireError::Frame(format!(
                    "message {id} restarted while in progress"
                )));
            }
            return Ok(Some((id, Message { buf, start })));
        }
        let part = match self.partial.get_mut(&id) {
            Some(p) => p,
            None => {
                if index != 0 {
                    return Err(WireError::Frame(format!(
                        "message {id} starts at chunk {index}"
                    )));
                }
                if self.partial.len() >= self.limits.max_partial {
                    return Err(WireError::Frame(format!(
                        "more than {} messages in progress",
                        self.limits.max_partial
                    )));
                }
                // Capacity grows with the data that arrives, not with the claimed total.
                self.partial.entry(id).or_insert(Partial {
                    count,
                    next: 0,
                    total,
                    bytes: Vec::with_capacity(payload.len()),
                })
            }
        };
        if index != part.next || count != part.count || total != part.total {
            self.partial.remove(&id);
            return Err(WireError::Frame(format!(
                "message {id}: chunk {index}/{count} of {total} bytes out of sequence"
            )));
        }
        if part.bytes.len() as u64 + payload.len() as u64 > part.total {
            self.partial.remove(&id);
            return Err(WireError::Frame(format!(
                "message {id}: chunks exceed its {total} bytes"
            )));
        }
        part.bytes.extend_from_slice(payload);
        part.next += 1;
        if part.next < part.count {
            return Ok(None);
        }
        let done = self
            .partial
            .remove(&id)
            .map(|p| p.bytes)
            .unwrap_or_default();
        if done.len() as u64 != total {
            return Err(WireError::Frame(format!(
                "message {id}: {} bytes in its chunks, {total} announced",
                done.len()
            )));
        }
        Ok(Some((
            id,
            Message {
                buf: done,
                start: 0,
            },
        )))
    }
}

/// Serde for `Vec<u64>` as one byte string of little-endian u64 (keys, tombstones).
pub mod u64_bytes {
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u64], s: S) -> Result<S::Ok, S::Error> {
        if cfg!(target_endian = "little") {
            s.serialize_bytes(bytemuck::cast_slice(v))
        } else {
            let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            s.serialize_bytes(&bytes)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u64>, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Vec<u64>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a byte string of little-endian u64")
            }
            fn visit_bytes<E: serde::de::Error>(self, b: &[u8]) -> Result<Vec<u64>, E> {
                if !b.len().is_multiple_of(8) {
                    return Err(E::custom(format!(
                        "u64 block of {} bytes is not a multiple of 8",
                        b.len()
                    )));
                }
                Ok(b.chunks_exact(8)
                    .map(|c| {
                        let mut a = [0u8; 8];
                        a.copy_from_slice(c);
                        u64::from_le_bytes(a)
                    })
                    .collect())
            }
        }
        d.deserialize_bytes(V)
    }
}

#[cfg(test)]
mod tests;
