//! Which codec packs a checkpoint delta's row metadata: none, lz4 or zstd (levels 1 and 3).
//!
//! The float blocks are written raw whatever the codec (near-random bits; see
//! `actors/src/embedding/columns.rs`), so the codec only decides the metadata: 36 bytes per
//! row before packing. The workload is the one `freshet bench checkpoint` writes: a table of
//! 1M rows of dim 16, 100k of them changed by one training step, taken as a delta.
//!
//! Reports, per codec: metadata bytes per row, the whole delta's size against the changed
//! rows' bytes, and the encode and decode time of the 100k rows' metadata. The delta write
//! budget is 200 ms, so a codec must cost a small part of it.
//!
//! `cargo bench --bench ckpt_codec --features codec-compare`

use std::time::Instant;

use freshet_actors::embedding::bench::key_of_rank;
use freshet_actors::embedding::columns::{decode_meta, encode_meta, Codec};
use freshet_actors::embedding::{RowBlock, Table, TrainCtx};
use freshet_actors::rng::Xoshiro256;
use freshet_actors::training::default_table_config;
use freshet_actors::TableName;

fn best_ms(rounds: usize, mut f: impl FnMut()) -> f64 {
    (0..rounds)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() -> anyhow::Result<()> {
    let (rows, changed, dim) = (1_000_000u64, 100_000usize, 16usize);
    let cfg = default_table_config(dim);
    let mut t = Table::new(TableName::new("emb"), cfg.clone(), None)?;
    let mut out = Vec::new();
    let keys: Vec<u64> = (0..rows).map(|r| key_of_rank(r, 7)).collect();
    for c in keys.chunks(4096) {
        t.lookup_for_training(c, &TrainCtx::at_step(1), &mut out)?;
    }
    let since = t.version();
    let mut rng = Xoshiro256::seed_from_u64(3);
    let mut pick = keys.clone();
    rng.shuffle(&mut pick);
    let pick = &pick[..changed];
    let ctx = TrainCtx::at_step(2);
    t.lookup_for_training(pick, &ctx, &mut out)?;
    let grads: Vec<f32> = (0..changed * dim).map(|_| rng.next_f32() - 0.5).collect();
    t.apply_gradients(pick, &grads, &ctx)?;
    let delta = t.delta_since(since)?;
    let block: &RowBlock = &delta.upserts;
    let row_bytes = 8 + 4 * (dim + cfg.optimizer.state_floats(dim));
    let floats = block.data.len() * 4;

    println!(
        "{changed} changed rows of a {rows}-row table, dim {dim}, {} ({row_bytes} bytes per row)",
        cfg.optimizer.name()
    );
    println!(
        "{:<8} {:>14} {:>22} {:>12} {:>12}",
        "codec", "meta B/row", "delta rows vs rows", "encode ms", "decode ms"
    );
    for (name, codec) in [
        ("none", Codec::Raw),
        ("lz4", Codec::Lz4),
        ("zstd-1", Codec::Zstd(1)),
        ("zstd-3", Codec::Zstd(3)),
    ] {
        let bytes = encode_meta(block, codec);
        let enc = best_ms(5, || {
            std::hint::black_box(encode_meta(block, codec));
        });
        let mut back = RowBlock::default();
        let dec = best_ms(5, || {
            decode_meta(&bytes, &mut back).expect("decodes");
        });
        println!(
            "{name:<8} {:>14.2} {:>22.3} {enc:>12.2} {dec:>12.2}",
            bytes.len() as f64 / changed as f64,
            (bytes.len() + floats) as f64 / (changed * row_bytes) as f64,
        );
    }
    Ok(())
}
