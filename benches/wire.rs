//! Criterion bench of the wire encoding beside a memcpy baseline from the same run, counted in
//! bytes of float block so criterion's throughputs compare directly:
//! - `lookup_answer`: a shard's answer of 1M floats (4 MB) encoded, cut into frames, read back
//!   from the byte stream, reassembled and decoded: what every remote lookup pays;
//! - `snapshot_answer`: 24M floats (96 MB, six frames) the same way: chunking;
//! - `.../packets`: the same answers the way nodes send them, one frame per packet
//!   (`encode_frames`, `Reassembler::push_packet`): a message of one frame is encoded into the
//!   buffer that is sent and read where it arrived, so the ratio to the stream path is what
//!   those two copies cost;
//! - `memcpy_baseline`: copying the same bytes twice (into the stream and out of it), the least
//!   any encoding that leaves the sender's buffer can cost.
//!
//! `cargo bench --bench wire`.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use freshet_actors::envelope::Envelope;
use freshet_cluster::node::protocol::PACKET_CHUNK;
use freshet_cluster::wire::{
    decode, encode_frames, encode_message, Frame, Reassembler, ShardAnswer,
};

fn floats(n: usize) -> Vec<f32> {
    (0..n).map(|i| (i % 1000) as f32 * 0.001 - 0.5).collect()
}

fn cross(answer: &Envelope<ShardAnswer>) -> Envelope<ShardAnswer> {
    let stream = encode_message("answer", 1, answer)
        .expect("encodes")
        .concat();
    let mut r = Reassembler::default();
    let mut at = 0;
    while let Some((frame, used)) = Frame::decode(&stream[at..]).expect("well formed") {
        at += used;
        if let Some((_, bytes)) = r.push(frame).expect("in sequence") {
            return decode("answer", &bytes).expect("decodes");
        }
    }
    panic!("the stream ended inside the message")
}

/// The packet path: what crosses between two nodes' endpoints (ractor's own framing aside).
fn cross_packets(answer: &Envelope<ShardAnswer>) -> Envelope<ShardAnswer> {
    let packets = encode_frames("answer", 1, answer, PACKET_CHUNK).expect("encodes");
    let mut r = Reassembler::default();
    for p in packets {
        if let Some((_, m)) = r.push_packet(p).expect("in sequence") {
            return decode("answer", m.bytes()).expect("decodes");
        }
    }
    panic!("the packets ended inside the message")
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("wire_bytes");
    g.sample_size(10);
    for (name, n) in [("lookup_answer", 1 << 20), ("snapshot_answer", 24 << 20)] {
        let answer = Envelope::new(ShardAnswer::Rows(floats(n)));
        g.throughput(Throughput::Bytes(4 * n as u64));
        g.bench_function(name, |b| b.iter(|| cross(&answer)));
        g.bench_function(format!("{name}/packets"), |b| {
            b.iter(|| cross_packets(&answer))
        });
        let block = floats(n);
        g.bench_function(format!("{name}/memcpy_baseline"), |b| {
            b.iter(|| {
                let bytes: Vec<u8> = bytemuck::cast_slice(&block).to_vec();
                let mut back = vec![0f32; bytes.len() / 4];
                bytemuck::cast_slice_mut::<f32, u8>(&mut back).copy_from_slice(&bytes);
                back
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
