use std::collections::BTreeMap;
use std::fmt::Debug;

use ractor::concurrency::oneshot;

use super::*;
use freshet_actors::ckpt::writer::{CaptureError, StepBoundary, WriterRequest, WriterStats};
use freshet_actors::ckpt::{ModelStore, Payload, VersionMeta};
use freshet_actors::dense::{DenseNet, InputShape, ModelConfig, ModelKind};
use freshet_actors::embedding::{EmbeddingError, ShardSnapshot, TableConfig, TrainCtx};
use freshet_actors::envelope::TraceContext;
use freshet_actors::fault::Faults;
use freshet_actors::ids::TableName;
use freshet_actors::joiner::{JoinerMsg, JoinerStats};
use freshet_actors::online::validator::{ValidatorRequest, ValidatorStatus};
use freshet_actors::rng::Xoshiro256;
use freshet_actors::serving::replica::{ReplicaRequest, ReplicaStatus};
use freshet_actors::shard::{ShardArgs, ShardError, ShardHandle, ShardRequest};
use freshet_actors::supervisor::{ChildStatus, RestartError, Strategy, SupervisorMsg};
use freshet_actors::testkit::fixtures::user_item_tables;
use freshet_actors::training::{TrainerRequest, TrainerStatus};

/// Frames concatenated into one byte stream, as a socket carries them.
fn stream_of(framed: &[Vec<u8>]) -> Vec<u8> {
    framed.concat()
}

/// Reads every message out of a byte stream fed in pieces of `piece` bytes.
fn read_stream(stream: &[u8], piece: usize) -> Result<Vec<(u64, Vec<u8>)>, WireError> {
    let mut r = Reassembler::default();
    let mut buf = Vec::new();
    let mut out = Vec::new();
    for chunk in stream.chunks(piece) {
        buf.extend_from_slice(chunk);
        while let Some((frame, used)) = Frame::decode(&buf)? {
            buf.drain(..used);
            if let Some(m) = r.push(frame)? {
                out.push(m);
            }
        }
    }
    if !buf.is_empty() {
        return Err(WireError::Frame(format!(
            "stream ended inside a frame, {} bytes in",
            buf.len()
        )));
    }
    Ok(out)
}

fn floats(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = Xoshiro256::seed_from_u64(seed);
    (0..n).map(|_| rng.next_f32() - 0.5).collect()
}

#[test]
fn small_messages_take_one_frame_and_large_ones_are_chunked_under_16_mib() {
    let small = Envelope::new(ShardCall::Lookup {
        table: TableName::new("user"),
        keys: vec![1, 2, 3],
    });
    let framed = encode_message("call", 7, &small).unwrap();
    assert_eq!(framed.len(), 1);
    let got = read_stream(&stream_of(&framed), 5).unwrap();
    let back: Envelope<ShardCall> = decode("call", &got[0].1).unwrap();
    assert_eq!((got[0].0, back.body), (7, small.body));

    // 40 MB of floats: three frames, none over the limit, and the same floats back.
    let rows = floats(10_000_000, 1);
    let big = Envelope::new(ShardAnswer::Rows(rows.clone()));
    let framed = encode_message("answer", 8, &big).unwrap();
    assert_eq!(framed.len(), 3);
    for f in &framed {
        assert!(f.len() <= MAX_FRAME, "frame of {} bytes", f.len());
    }
    // Fed in odd pieces, so that headers and payloads split anywhere.
    let got = read_stream(&stream_of(&framed), (1 << 20) + 7).unwrap();
    assert_eq!(got.len(), 1);
    let back: Envelope<ShardAnswer> = decode("answer", &got[0].1).unwrap();
    assert_eq!(back.body, ShardAnswer::Rows(rows));
}

#[test]
fn float_and_key_blocks_travel_as_raw_bytes() {
    let keys: Vec<u64> = (0..100_000u64).map(|k| u64::MAX - k * 7919).collect();
    let grads = floats(800_000, 2);
    let call = ShardCall::ApplyGradients {
        table: TableName::new("item"),
        keys: keys.clone(),
        grads: grads.clone(),
        ctx: TrainCtx::at_step(3),
    };
    let bytes = encode("call", &call).unwrap();
    let raw = keys.len() * 8 + grads.len() * 4;
    // Element by element, msgpack would take 9 bytes per key and 5 per float.
    assert!(
        bytes.len() < raw + 200,
        "{} bytes encoded for {raw} bytes of blocks",
        bytes.len()
    );
    assert_eq!(decode::<ShardCall>("call", &bytes).unwrap(), call);
}

#[test]
fn interleaved_chunks_of_two_messages_reassemble() {
    let a = encode("a", &ShardAnswer::Rows(floats(5_000_000, 3))).unwrap();
    let b = encode("b", &ShardAnswer::Rows(floats(4_500_000, 4))).unwrap();
    let (fa, fb) = (frames(1, &a), frames(2, &b));
    assert_eq!((fa.len(), fb.len()), (2, 2));
    let stream = stream_of(&[fa[0].clone(), fb[0].clone(), fa[1].clone(), fb[1].clone()]);
    let got = read_stream(&stream, 1 << 22).unwrap();
    assert_eq!(got, vec![(1, a), (2, b)]);
}

#[test]
fn trace_context_crosses_with_the_call() {
    let trace =
        TraceContext::from_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
            .unwrap();
    let sent = Envelope::with_trace(trace.clone(), ReplicaCall::Publish(9));
    let framed = encode_message("call", 1, &sent).unwrap();
    let got = read_stream(&stream_of(&framed), 3).unwrap();
    let back: Envelope<ReplicaCall> = decode("call", &got[0].1).unwrap();
    assert_eq!(back.trace, trace);
    assert_eq!(back.body, ReplicaCall::Publish(9));
}

fn frame_bytes(id: u64, index: u32, count: u32, total: u64, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(b"FRW1");
    f.extend_from_slice(&id.to_le_bytes());
    f.extend_from_slice(&index.to_le_bytes());
    f.extend_from_slice(&count.to_le_bytes());
    f.extend_from_slice(&total.to_le_bytes());
    f.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    f.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    f.extend_from_slice(payload);
    f
}

#[test]
fn packets_carry_the_same_frames_and_a_one_frame_message_is_read_where_it_arrived() {
    let call = Envelope::new(ShardCall::Lookup {
        table: TableName::new("user"),
        keys: (0..1000).collect(),
    });
    let bytes = encode("call", &call).unwrap();
    // One frame: the bytes the stream path would send, header filled in after encoding.
    let one = encode_frames("call", 9, &call, MAX_CHUNK).unwrap();
    assert_eq!(one, frames(9, &bytes));
    let mut r = Reassembler::default();
    let (id, m) = r.push_packet(one[0].clone()).unwrap().unwrap();
    assert_eq!((id, m.bytes()), (9, &bytes[..]));
    // Several: cut as the stream path cuts, and joined back.
    let many = encode_frames("call", 10, &call, 1000).unwrap();
    assert_eq!(many, frames_of(10, &bytes, 1000));
    assert!(many.len() > 3);
    let mut got = None;
    for p in many {
        got = r.push_packet(p).unwrap();
    }
    let (id, m) = got.unwrap();
    assert_eq!((id, m.bytes()), (10, &bytes[..]));
    // A packet holds exactly one whole, intact frame.
    let good = frame_bytes(1, 0, 1, 3, b"abc");
    let packet_err = |r: &mut Reassembler, p: Vec<u8>| match r.push_packet(p) {
        Err(e) => e.to_string(),
        Ok(m) => panic!("accepted: {m:?}"),
    };
    assert!(packet_err(&mut r, good[..good.len() - 1].to_vec()).contains("a cut frame"));
    assert!(packet_err(&mut r, good[..10].to_vec()).contains("a cut frame"));
    assert!(packet_err(&mut r, [good.clone(), good.clone()].concat()).contains("and more"));
    let mut flipped = good.clone();
    flipped[HEADER] ^= 1;
    assert!(packet_err(&mut r, flipped).contains("checksum mismatch"));
    assert!(packet_err(&mut r, b"garbage".to_vec()).contains("bad magic"));
    assert!(packet_err(&mut r, frame_bytes(2, 1, 2, 6, b"abc")).contains("starts at chunk 1"));
    assert_eq!(r.in_progress(), 0);
    // A message whose next packet is broken is dropped, not kept waiting for the rest.
    assert!(r
        .push_packet(frame_bytes(3, 0, 2, 6, b"abc"))
        .unwrap()
        .is_none());
    assert_eq!(r.in_progress(), 1);
    let mut broken = frame_bytes(3, 1, 2, 6, b"def");
    broken[HEADER] ^= 1;
    assert!(packet_err(&mut r, broken).contains("checksum mismatch"));
    assert_eq!(r.in_progress(), 0);
    let (id, m) = r.push_packet(good).unwrap().unwrap();
    assert_eq!((id, m.bytes()), (1, &b"abc"[..]));
}

fn frame_err(bytes: &[u8]) -> String {
    match Frame::decode(bytes) {
        Err(e) => e.to_string(),
        Ok(r) => panic!("accepted: {r:?}"),
    }
}

fn push_err(r: &mut Reassembler, bytes: &[u8]) -> String {
    let (frame, _) = Frame::decode(bytes).unwrap().unwrap();
    match r.push(frame) {
        Err(e) => e.to_string(),
        Ok(m) => panic!("accepted: {m:?}"),
    }
}

#[test]
fn malformed_frames_are_refused_with_a_reason() {
    let good = frame_bytes(1, 0, 1, 3, b"abc");
    // Incomplete is not an error: more bytes may come.
    assert!(Frame::decode(&good[..10]).unwrap().is_none());
    assert!(Frame::decode(&good[..good.len() - 1]).unwrap().is_none());
    assert!(frame_err(b"GET / HTTP/1.1\r\n").contains("bad magic"));
    assert!(frame_err(b"FX").contains("bad magic"));

    let mut huge = frame_bytes(1, 0, 1, 3, b"abc");
    huge[28..32].copy_from_slice(&(MAX_FRAME as u32).to_le_bytes());
    assert!(frame_err(&huge).contains("exceeds"));
    assert!(frame_err(&frame_bytes(1, 2, 2, 3, b"abc")).contains("chunk 2 of 2"));
    assert!(frame_err(&frame_bytes(1, 0, 0, 3, b"abc")).contains("chunk 0 of 0"));
    let mut flipped = good.clone();
    *flipped.last_mut().unwrap() ^= 1;
    assert!(frame_err(&flipped).contains("checksum mismatch"));

    let mut r = Reassembler::new(ReassemblyLimits {
        max_message: 100,
        max_partial: 1,
    });
    assert!(push_err(&mut r, &frame_bytes(1, 0, 1, 4, b"abc")).contains("carries 3 bytes"));
    assert!(push_err(&mut r, &frame_bytes(2, 1, 2, 6, b"abc")).contains("starts at chunk 1"));
    assert!(push_err(&mut r, &frame_bytes(3, 0, 1, 101, b"abc")).contains("exceeds the limit"));
    // Out of sequence: chunk 0 twice.
    assert!(r
        .push(
            Frame::decode(&frame_bytes(4, 0, 2, 6, b"abc"))
                .unwrap()
                .unwrap()
                .0
        )
        .unwrap()
        .is_none());
    assert!(push_err(&mut r, &frame_bytes(4, 0, 2, 6, b"abc")).contains("out of sequence"));
    assert_eq!(r.in_progress(), 0, "a broken message is dropped");
    // Chunks that add up to more than the announced length.
    r.push(
        Frame::decode(&frame_bytes(5, 0, 2, 4, b"abc"))
            .unwrap()
            .unwrap()
            .0,
    )
    .unwrap();
    assert!(push_err(&mut r, &frame_bytes(5, 1, 2, 4, b"abc")).contains("exceed its 4 bytes"));
    // Chunks that add up to less.
    r.push(
        Frame::decode(&frame_bytes(6, 0, 2, 9, b"abc"))
            .unwrap()
            .unwrap()
            .0,
    )
    .unwrap();
    assert!(push_err(&mut r, &frame_bytes(6, 1, 2, 9, b"abc")).contains("6 bytes in its chunks"));
    // Too many messages in progress at once.
    r.push(
        Frame::decode(&frame_bytes(7, 0, 2, 6, b"abc"))
            .unwrap()
            .unwrap()
            .0,
    )
    .unwrap();
    assert!(push_err(&mut r, &frame_bytes(8, 0, 2, 6, b"abc")).contains("in progress"));
    // After all that, a good message still goes through.
    let (f, _) = Frame::decode(&good).unwrap().unwrap();
    assert_eq!(r.push(f).unwrap(), Some((1, b"abc".to_vec())));

    // A well-framed payload that is not the expected message.
    let e = decode::<Envelope<ShardCall>>("call", b"\xc1garbage").unwrap_err();
    assert!(matches!(e, WireError::Decode { what: "call", .. }), "{e}");
    let wrong = encode("call", &Envelope::new(ReplicaCall::Status)).unwrap();
    assert!(decode::<Envelope<ShardCall>>("call", &wrong).is_err());
    // A float block with a torn last float.
    let mut torn = encode("answer", &ShardAnswer::Rows(vec![1.0, 2.0])).unwrap();
    let n = torn.len();
    torn[n - 9] = 7; // the bin8 length byte: 8 -> 7
    torn.pop();
    assert!(decode::<ShardAnswer>("answer", &torn).is_err());
}

#[test]
fn random_corruption_never_panics_and_never_passes_silently() {
    let seed = freshet_actors::testkit::seed("wire_random_corruption");
    let mut rng = Xoshiro256::seed_from_u64(seed);
    let call = Envelope::new(ShardCall::ApplyGradients {
        table: TableName::new("user"),
        keys: (0..64).collect(),
        grads: floats(512, seed),
        ctx: TrainCtx::at_step(1),
    });
    let clean = stream_of(&encode_message("call", 1, &call).unwrap());
    for _ in 0..2000 {
        let mut bytes = clean.clone();
        for _ in 0..1 + rng.below(4) {
            let i = rng.below(bytes.len() as u64) as usize;
            bytes[i] ^= 1 << rng.below(8);
        }
        // Either the damage is caught (magic, lengths, checksum) or, if it only hit bytes
        // no check covers, what comes out decodes to the sent message. Never a panic.
        if let Ok(msgs) = read_stream(&bytes, 1 + rng.below(200) as usize) {
            for (_, m) in msgs {
                if let Ok(back) = decode::<Envelope<ShardCall>>("call", &m) {
                    assert_eq!(
                        back.body, call.body,
                        "seed {seed}: corrupt message accepted"
                    );
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Every remote-capable message, both ways.

/// A message rebuilt on the far side, its pending answer there, and the caller's responder.
type Rebuilt<M> = (
    M,
    Option<Pending<<M as Remote>::Answer>>,
    Option<Responder<<M as Remote>::Answer>>,
);

/// Splits `msg`, sends the call through frames, and rebuilds it on the far side. Checks that
/// the call arrives as sent.
fn cross_call<M: Remote>(msg: M) -> Rebuilt<M> {
    let (call, responder) = msg.into_call().expect("remote-capable");
    let sent = format!("{call:?}");
    let framed = encode_message("call", 1, &Envelope::new(call)).unwrap();
    let got = read_stream(&stream_of(&framed), 64 << 10).unwrap();
    let back: Envelope<M::Call> = decode("call", &got[0].1).unwrap();
    assert_eq!(
        format!("{:?}", back.body),
        sent,
        "the call changed on the way"
    );
    let (rebuilt, pending) = M::from_call(back.body);
    (rebuilt, pending, responder)
}

/// Sends the far side's answer back through frames into the caller's port.
async fn cross_answer<A: Serialize + DeserializeOwned + Debug>(
    pending: Option<Pending<A>>,
    responder: Option<Responder<A>>,
) {
    let answer = pending
        .expect("a call with a reply")
        .answer()
        .await
        .unwrap();
    let sent = format!("{answer:?}");
    let framed = frames(2, &encode("answer", &answer).unwrap());
    let got = read_stream(&stream_of(&framed), 64 << 10).unwrap();
    let back: A = decode("answer", &got[0].1).unwrap();
    assert_eq!(format!("{back:?}"), sent, "the answer changed on the way");
    responder.expect("a responder")(back).unwrap();
}

/// A call with a reply, end to end: the far side answers `value`; the caller must get it.
/// (Compared by `Debug`, which prints every float exactly, because errors have no `==`.)
async fn round_trip<M, T>(
    make: impl FnOnce(RpcReplyPort<T>) -> M,
    answer: impl FnOnce(M, T),
    value: T,
) where
    M: Remote,
    T: Debug + Send + 'static,
{
    let expected = format!("{value:?}");
    let (tx, rx) = oneshot();
    let (rebuilt, pending, responder) = cross_call(make(tx.into()));
    answer(rebuilt, value);
    cross_answer(pending, responder).await;
    assert_eq!(format!("{:?}", rx.await.unwrap()), expected);
}

/// A shard that trained `keys` of `user` once.
fn trained_shard(keys: &[u64]) -> freshet_actors::embedding::EmbeddingShard {
    let mut shard =
        freshet_actors::embedding::EmbeddingShard::new(0, 1, &user_item_tables(), None).unwrap();
    let user = shard.table_mut(&TableName::new("user")).unwrap();
    let ctx = TrainCtx::at_step(1);
    let mut rows = Vec::new();
    user.lookup_for_training(keys, &ctx, &mut rows).unwrap();
    user.apply_gradients(keys, &floats(keys.len() * 8, 5), &ctx)
        .unwrap();
    shard
}

fn snapshot_for_tests() -> ShardSnapshot {
    trained_shard(&(0..50).collect::<Vec<_>>())
        .snapshot()
        .unwrap()
}

fn version_meta() -> VersionMeta {
    VersionMeta {
        step: 12,
        rows_trained: 1200,
        samples_rejected: 3,
        replays: Vec::new(),
        calibrated_from: None,
        sample_offsets: BTreeMap::from([(0, 700), (1, 503)]),
        joiner_offsets: BTreeMap::from([("impressions".into(), BTreeMap::from([(0, 99)]))]),
        model: ModelConfig::new(ModelKind::Lr),
        schema: freshet_actors::sample::Schema::criteo(4),
        tables: user_item_tables()
            .into_iter()
            .map(|(n, c)| (n.to_string(), c))
            .collect(),
        placement: None,
    }
}

fn dense_state() -> freshet_actors::dense::DenseState {
    DenseNet::new(
        ModelConfig::new(ModelKind::Lr),
        InputShape {
            fields: vec![0, 1],
            dense: 2,
        },
    )
    .unwrap()
    .state()
}

#[tokio::test]
async fn every_shard_request_round_trips() {
    let user = TableName::new("user");
    let snap = snapshot_for_tests();
    macro_rules! answer_with {
        ($variant:ident) => {
            |m: ShardRequest, v| match m {
                ShardRequest::$variant { reply, .. } => reply.send(v).unwrap(),
                other => panic!("rebuilt as {other:?}"),
            }
        };
    }
    let t = user.clone();
    round_trip(
        |reply| ShardRequest::Lookup {
            table: t,
            keys: vec![1, u64::MAX],
            reply,
        },
        answer_with!(Lookup),
        Ok::<_, EmbeddingError>(floats(16, 6)),
    )
    .await;
    let t = user.clone();
    round_trip(
        |reply| ShardRequest::LookupForTraining {
            table: t,
            keys: vec![5],
            ctx: TrainCtx::at_step(4),
            reply,
        },
        answer_with!(LookupForTraining),
        Ok(floats(8, 7)),
    )
    .await;
    let t = user.clone();
    round_trip(
        |reply| ShardRequest::ApplyGradients {
            table: t,
            keys: vec![5, 6],
            grads: floats(16, 8),
            ctx: TrainCtx::at_step(4),
            reply,
        },
        answer_with!(ApplyGradients),
        Ok(freshet_actors::embedding::ApplyReport {
            applied: 2,
            merged_duplicates: 1,
            rejected_non_finite: 0,
            without_row: 3,
        }),
    )
    .await;
    let changes = trained_shard(&[1, 2, 3])
        .table_mut(&user)
        .unwrap()
        .changes_since(0)
        .unwrap();
    let t = user.clone();
    round_trip(
        |reply| ShardRequest::ChangesSince {
            table: t,
            since: 0,
            reply,
        },
        answer_with!(ChangesSince),
        Ok(changes),
    )
    .await;
    round_trip(
        |reply| ShardRequest::Snapshot { reply },
        answer_with!(Snapshot),
        Ok(snap.clone()),
    )
    .await;
    let delta = trained_shard(&[4, 5]).delta_since(&[]).unwrap();
    round_trip(
        |reply| ShardRequest::DeltaSince {
            since: vec![(user.clone(), 0)],
            reply,
        },
        answer_with!(DeltaSince),
        Ok(delta),
    )
    .await;
    round_trip(
        |reply| ShardRequest::ForgetChanges {
            through: vec![(user.clone(), 9)],
            reply,
        },
        answer_with!(ForgetChanges),
        Ok(()),
    )
    .await;
    let s = snap.clone();
    round_trip(
        |reply| ShardRequest::Restore {
            snapshot: Box::new(s),
            reply,
        },
        answer_with!(Restore),
        Ok(()),
    )
    .await;
    round_trip(
        |reply| ShardRequest::Reset { reply },
        answer_with!(Reset),
        Ok(()),
    )
    .await;
    let stats = freshet_actors::shard::ShardStats {
        shard: 2,
        counters: freshet_actors::shard::ShardCounters {
            lookups: 4,
            ..Default::default()
        },
        tables: Vec::new(),
    };
    round_trip(
        |reply| ShardRequest::Stats { reply },
        answer_with!(Stats),
        stats,
    )
    .await;
}

/// The errors a caller acts on keep their case across the wire; the others their message.
#[tokio::test]
async fn shard_errors_cross_typed() {
    type Check = fn(&EmbeddingError) -> bool;
    let cases: Vec<(EmbeddingError, Check)> = vec![
        (
            EmbeddingError::UnknownTable(TableName::new("x")),
            |e| matches!(e, EmbeddingError::UnknownTable(t) if t.as_str() == "x"),
        ),
        (
            EmbeddingError::ChangesCompacted {
                table: TableName::new("user"),
                since: 3,
                floor: 9,
            },
            |e| {
                matches!(
                    e,
                    EmbeddingError::ChangesCompacted {
                        since: 3,
                        floor: 9,
                        ..
                    }
                )
            },
        ),
        (
            EmbeddingError::GradientShape {
                table: TableName::new("user"),
                keys: 2,
                dim: 8,
                got: 3,
            },
            |e| {
                matches!(
                    e,
                    EmbeddingError::GradientShape {
                        keys: 2,
                        dim: 8,
                        got: 3,
                        ..
                    }
                )
            },
        ),
        (
            EmbeddingError::WrongShard {
                got: 1,
                got_count: 2,
                want: 0,
                want_count: 2,
            },
            |e| matches!(e, EmbeddingError::WrongShard { got: 1, .. }),
        ),
        (
            EmbeddingError::Tier {
                table: TableName::new("user"),
                source: std::io::Error::other("disk full"),
            },
            |e| matches!(e, EmbeddingError::Remote(m) if m.contains("disk full")),
        ),
    ];
    for (err, check) in cases {
        let (tx, rx) = oneshot();
        let (rebuilt, pending, responder) = cross_call(ShardRequest::Snapshot { reply: tx.into() });
        match rebuilt {
            ShardRequest::Snapshot { reply } => reply.send(Err(err)).unwrap(),
            other => panic!("rebuilt as {other:?}"),
        }
        cross_answer(pending, responder).await;
        let got = rx.await.unwrap().unwrap_err();
        assert!(check(&got), "arrived as {got:?}");
    }
}

#[tokio::test]
async fn every_other_remote_message_round_trips() {
    // CheckpointWriter.
    let at = StepBoundary {
        meta: version_meta(),
        dense: dense_state(),
        full: true,
    };
    round_trip(
        |reply| WriterRequest::Capture {
            at: Box::new(at),
            reply,
        },
        |m, v| match m {
            WriterRequest::Capture { at, reply } => {
                assert_eq!(at.meta, version_meta());
                assert_eq!(at.dense, dense_state());
                reply.send(v).unwrap()
            }
            other => panic!("rebuilt as {other:?}"),
        },
        Err::<(), _>(CaptureError::Refused {
            shard: 2,
            reason: "disk full".to_string(),
        }),
    )
    .await;
    round_trip(
        |reply| WriterRequest::Flush { reply },
        |m, v| match m {
            WriterRequest::Flush { reply } => reply.send(v).unwrap(),
            other => panic!("rebuilt as {other:?}"),
        },
        WriterStats {
            captures: 5,
            ..Default::default()
        },
    )
    .await;
    round_trip(
        |reply| WriterRequest::Reset { reply },
        |m, v| match m {
            WriterRequest::Reset { reply } => reply.send(v).unwrap(),
            other => panic!("rebuilt as {other:?}"),
        },
        (),
    )
    .await;

    // ServingReplica.
    let (rebuilt, pending, responder) = cross_call(ReplicaRequest::Publish(41));
    assert!(matches!(rebuilt, ReplicaRequest::Publish(41)));
    assert!(pending.is_none() && responder.is_none());
    round_trip(
        ReplicaRequest::Status,
        |m, v| match m {
            ReplicaRequest::Status(reply) => reply.send(v).unwrap(),
            other => panic!("rebuilt as {other:?}"),
        },
        ReplicaStatus {
            name: "replica-0".into(),
            version: Some(41),
            rows: 9,
            ..Default::default()
        },
    )
    .await;

    // Validator.
    let dir = tempfile::tempdir().unwrap();
    let store = ModelStore::open(dir.path()).unwrap();
    let manifest = store
        .write(
            version_meta(),
            &dense_state(),
            &Payload::Full(vec![snapshot_for_tests()]),
        )
        .unwrap();
    let (rebuilt, pending, _) = cross_call(ValidatorRequest::Candidate(Box::new(manifest.clone())));
    match rebuilt {
        ValidatorRequest::Candidate(m) => assert_eq!(*m, manifest),
        other => panic!("rebuilt as {other:?}"),
    }
    assert!(pending.is_none());
    round_trip(
        ValidatorRequest::Status,
        |m, v| match m {
            ValidatorRequest::Status(reply) => reply.send(v).unwrap(),
            other => panic!("rebuilt as {other:?}"),
        },
        ValidatorStatus {
            evaluated: 3,
            failed: 1,
            last_passed: Some(2),
            ..Default::default()
        },
    )
    .await;

    // Trainer.
    round_trip(
        TrainerRequest::Status,
        |m, v| match m {
            TrainerRequest::Status(reply) => reply.send(v).unwrap(),
            other => panic!("rebuilt as {other:?}"),
        },
        TrainerStatus {
            step: 77,
            offsets: BTreeMap::from([(0, 10), (1, 12)]),
            ..Default::default()
        },
    )
    .await;
    round_trip(
        TrainerRequest::Finish,
        |m, v| match m {
            TrainerRequest::Finish(reply) => reply.send(v).unwrap(),
            other => panic!("rebuilt as {other:?}"),
        },
        Ok(Some(12)),
    )
    .await;

    // SampleJoiner.
    round_trip(
        JoinerMsg::Stats,
        |m, v| match m {
            JoinerMsg::Stats(reply) => reply.send(v).unwrap(),
            other => panic!("rebuilt as {other:?}"),
        },
        joiner_stats(),
    )
    .await;
    round_trip(
        JoinerMsg::Checkpoint,
        |m, v| match m {
            JoinerMsg::Checkpoint(reply) => reply.send(v).unwrap(),
            other => panic!("rebuilt as {other:?}"),
        },
        Ok(()),
    )
    .await;

    // Supervisor.
    round_trip(
        |reply| SupervisorMsg::RestartFrom {
            name: "trainer".into(),
            reply,
        },
        |m, v| match m {
            SupervisorMsg::RestartFrom { name, reply } => {
                assert_eq!(name, "trainer");
                reply.send(v).unwrap()
            }
            other => panic!("rebuilt as {other:?}"),
        },
        Err(RestartError::UnknownChild {
            name: "trainer".to_string(),
        }),
    )
    .await;
    round_trip(
        SupervisorMsg::Status,
        |m, v| match m {
            SupervisorMsg::Status(reply) => reply.send(v).unwrap(),
            other => panic!("rebuilt as {other:?}"),
        },
        vec![ChildStatus {
            name: "shard-0".into(),
            strategy: Strategy::RestForOne,
            running: true,
            restarts: 2,
            last_failure: Some("panicked".into()),
            node: Some("shard-a".into()),
        }],
    )
    .await;
    round_trip(
        SupervisorMsg::Shutdown,
        |m, v| match m {
            SupervisorMsg::Shutdown(reply) => reply.send(v).unwrap(),
            other => panic!("rebuilt as {other:?}"),
        },
        (),
    )
    .await;
}

fn joiner_stats() -> JoinerStats {
    JoinerStats {
        partition: 1,
        window: Default::default(),
        task: Default::default(),
        input_next: 500,
        samples_next: 123,
        dead_letters_next: 2,
        state_entries: 40,
        watermark_ms: Some(1_700_000_000_000),
    }
}

#[test]
fn local_only_messages_are_refused() {
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let tmp = tempfile::tempdir().unwrap();
    let (reply, _answer) = oneshot();
    let restore_from = ShardRequest::RestoreFrom {
        store: ModelStore::open(tmp.path()).unwrap(),
        version: 1,
        reply: reply.into(),
    };
    for e in [
        restore_from.into_call().err(),
        WriterRequest::Subscribe { tx }.into_call().err(),
        ValidatorRequest::Poll.into_call().err(),
        TrainerRequest::Pull.into_call().err(),
        JoinerMsg::Poll.into_call().err(),
        JoinerMsg::Woken.into_call().err(),
        SupervisorMsg::Restart.into_call().err(),
    ] {
        assert!(matches!(e, Some(WireError::LocalOnly(_))), "{e:?}");
    }
}

/// An answer of the wrong kind is refused and the caller's port is left to drop.
#[tokio::test]
async fn a_mismatched_answer_is_refused() {
    let (tx, rx) = oneshot();
    let (_, responder) = ShardRequest::Snapshot { reply: tx.into() }
        .into_call()
        .unwrap();
    let e = responder.unwrap()(ShardAnswer::Done).unwrap_err();
    assert!(
        matches!(e, WireError::UnexpectedAnswer { call: "snapshot" }),
        "{e}"
    );
    assert!(rx.await.is_err());
}

// ---------------------------------------------------------------------------------------------
// A real ShardOwner behind a wire hop behaves as one called directly.

async fn shard(args_tables: Vec<(TableName, TableConfig)>) -> ShardHandle {
    let (h, _) = ShardHandle::spawn(ShardArgs {
        shard: 0,
        shard_count: 1,
        tables: args_tables,
        spill_dir: None,
        restore: None,
        faults: Faults::default(),
    })
    .await
    .unwrap();
    h
}

#[tokio::test]
async fn a_shard_behind_a_wire_hop_trains_exactly_as_one_called_directly() {
    let seed = freshet_actors::testkit::seed("shard_behind_wire_hop");
    let mut rng = Xoshiro256::seed_from_u64(seed);
    let direct = shard(user_item_tables()).await;
    let far = shard(user_item_tables()).await;
    let (hop, stats) = Loopback::spawn(far.actor().clone()).await.unwrap();
    let remote = ShardHandle::new(0, hop);
    for step in 0..20u64 {
        let ctx = TrainCtx::at_step(step);
        for (table, dim) in [(TableName::new("user"), 8), (TableName::new("item"), 4)] {
            let keys: Vec<u64> = (0..64).map(|_| rng.below(300)).collect();
            let a = direct
                .lookup_for_training(&table, keys.clone(), ctx)
                .await
                .unwrap();
            let b = remote
                .lookup_for_training(&table, keys.clone(), ctx)
                .await
                .unwrap();
            assert_eq!(a, b, "seed {seed}: step {step} rows differ");
            let grads = floats(keys.len() * dim, rng.next_u64());
            let ra = direct
                .apply_gradients(&table, keys.clone(), grads.clone(), ctx)
                .await
                .unwrap();
            let rb = remote
                .apply_gradients(&table, keys, grads, ctx)
                .await
                .unwrap();
            assert_eq!(ra, rb);
        }
    }
    let user = TableName::new("user");
    let probe: Vec<u64> = (0..300).collect();
    assert_eq!(
        direct.lookup(&user, probe.clone()).await.unwrap(),
        remote.lookup(&user, probe.clone()).await.unwrap()
    );
    assert_eq!(
        direct.changes_since(&user, 0).await.unwrap(),
        remote.changes_since(&user, 0).await.unwrap()
    );
    assert_eq!(
        direct.delta_since(Vec::new()).await.unwrap(),
        remote.delta_since(Vec::new()).await.unwrap()
    );
    let snap = remote.snapshot().await.unwrap();
    assert_eq!(direct.snapshot().await.unwrap(), snap);

    // Restore through the hop into an empty shard: the same rows.
    let empty = shard(user_item_tables()).await;
    let (hop2, _) = Loopback::spawn(empty.actor().clone()).await.unwrap();
    let remote2 = ShardHandle::new(0, hop2);
    remote2.restore(snap.clone()).await.unwrap();
    assert_eq!(
        remote2.lookup(&user, probe.clone()).await.unwrap(),
        direct.lookup(&user, probe).await.unwrap()
    );
    // Errors arrive typed, and the hop and the shard keep serving.
    let err = remote
        .lookup(&TableName::new("nope"), vec![1])
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            ShardError::Embedding {
                source: EmbeddingError::UnknownTable(_),
                ..
            }
        ),
        "{err}"
    );
    remote.reset().await.unwrap();
    assert_eq!(remote.stats().await.unwrap().tables[0].1.rows, 0);
    assert!(LoopbackStats::get(&stats.calls) >= 86);
    assert_eq!(
        LoopbackStats::get(&stats.calls),
        LoopbackStats::get(&stats.answers)
    );
    assert_eq!(LoopbackStats::get(&stats.refused), 0);

    // The far shard gone: callers see it unavailable, and the hop keeps running.
    far.actor().stop_and_wait(None, None).await.unwrap();
    for _ in 0..2 {
        let err = remote.lookup(&user, vec![1]).await.unwrap_err();
        assert!(matches!(err, ShardError::Unavailable { .. }), "{err}");
    }
    assert_eq!(LoopbackStats::get(&stats.refused), 2);
}
