//! A network hop without the network: an actor that takes a message for another actor, sends
//! it through the full wire encoding (split, encode, frame, byte stream, reassemble, decode,
//! rebuild) and delivers it; answers come back the same way.
//!
//! A handle built on a Loopback's `ActorRef` behaves as a handle to a remote actor would, so
//! the tests prove that an actor works when its callers are on another node, and the encoding
//! cost of a message can be measured on its own.

use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{decode, encode, frames, Frame, Reassembler, Remote, WireError};
use freshet_actors::envelope::Envelope;

/// What a Loopback has carried: its observable state.
#[derive(Debug, Default)]
pub struct LoopbackStats {
    pub calls: AtomicU64,
    pub answers: AtomicU64,
    pub frames: AtomicU64,
    pub bytes: AtomicU64,
    /// Messages that could not cross (local-only, or a wire error); their callers see the
    /// reply port dropped.
    pub refused: AtomicU64,
}

impl LoopbackStats {
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// The actor; generic over the message type it carries.
#[derive(Debug)]
pub struct Loopback<M>(PhantomData<fn() -> M>);

#[derive(Debug)]
pub struct LoopbackArgs<M: Remote> {
    pub target: ActorRef<Envelope<M>>,
    pub stats: Arc<LoopbackStats>,
}

#[derive(Debug)]
pub struct LoopbackState<M: Remote> {
    target: ActorRef<Envelope<M>>,
    stats: Arc<LoopbackStats>,
    next_id: u64,
}

impl<M: Remote> Loopback<M> {
    /// Spawns a hop in front of `target`; send to the returned ref as if to `target`.
    pub async fn spawn(
        target: ActorRef<Envelope<M>>,
    ) -> Result<(ActorRef<Envelope<M>>, Arc<LoopbackStats>), ractor::SpawnErr> {
        let stats = Arc::new(LoopbackStats::default());
        let args = LoopbackArgs {
            target,
            stats: stats.clone(),
        };
        let (actor, _join) = Actor::spawn(None, Loopback(PhantomData), args).await?;
        Ok((actor, stats))
    }
}

/// Sends `value` through frames and a byte stream, as a socket would carry it, and reads it
/// back on the far side.
fn cross<T: Serialize + DeserializeOwned>(
    what: &'static str,
    id: u64,
    value: &T,
    stats: &LoopbackStats,
) -> Result<T, WireError> {
    let framed = frames(id, &encode(what, value)?);
    let mut stream = Vec::with_capacity(framed.iter().map(Vec::len).sum());
    for f in &framed {
        stream.extend_from_slice(f);
    }
    stats
        .frames
        .fetch_add(framed.len() as u64, Ordering::Relaxed);
    stats
        .bytes
        .fetch_add(stream.len() as u64, Ordering::Relaxed);
    let mut reassembler = Reassembler::default();
    let mut at = 0;
    while let Some((frame, used)) = Frame::decode(&stream[at..])? {
        at += used;
        if let Some((_, bytes)) = reassembler.push(frame)? {
            return decode(what, &bytes);
        }
    }
    Err(WireError::Frame(format!(
        "{what}: stream ended inside message {id}"
    )))
}

impl<M: Remote> Actor for Loopback<M> {
    type Msg = Envelope<M>;
    type State = LoopbackState<M>;
    type Arguments = LoopbackArgs<M>;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: LoopbackArgs<M>,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(LoopbackState {
            target: args.target,
            stats: args.stats,
            next_id: 0,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: Envelope<M>,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        st.next_id += 1;
        let id = st.next_id;
        let Envelope { trace, body } = msg;
        // A message that cannot cross is refused here, as a real connection would refuse it;
        // the hop itself keeps running.
        let crossed = body.into_call().and_then(|(call, responder)| {
            let sent = Envelope::with_trace(trace, call);
            let Envelope { trace, body } = cross("call", id, &sent, &st.stats)?;
            Ok((trace, body, responder))
        });
        let (trace, call, responder) = match crossed {
            Ok(c) => c,
            Err(e) => {
                st.stats.refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "loopback: message refused");
                return Ok(());
            }
        };
        st.stats.calls.fetch_add(1, Ordering::Relaxed);
        let (local, pending) = M::from_call(call);
        if let Err(e) = st.target.send_message(Envelope::with_trace(trace, local)) {
            // The far actor is gone: as over a connection, the caller sees no answer (its
            // reply port drops) and the hop keeps serving.
            st.stats.refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(error = %e, "loopback: the target actor is gone");
            return Ok(());
        }
        if let (Some(pending), Some(responder)) = (pending, responder) {
            let stats = st.stats.clone();
            // The answer comes back without holding up the next call, as on a connection.
            tokio::spawn(async move {
                let back = pending
                    .answer()
                    .await
                    .and_then(|a| cross("answer", id, &a, &stats))
                    .and_then(responder);
                match back {
                    Ok(()) => {
                        stats.answers.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        stats.refused.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(error = %e, "loopback: answer lost");
                    }
                }
            });
        }
        Ok(())
    }
}
