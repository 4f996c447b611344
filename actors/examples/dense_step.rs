//! Trains the dense step on one fixed batch for a while and prints the mean step time of each
//! tenth of the run, then percentiles. A step that slows down as the batch gets fitted is the
//! sign of denormal arithmetic (see `dense::gemm::FlushDenormals`).
//!
//! ```sh
//! cargo run --release -p freshet-actors --example dense_step -- [MODEL] [SECONDS]
//! ```

use std::time::Instant;

use freshet_actors::dense::{DenseNet, InputShape, ModelConfig, ModelKind, Threads};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let model: ModelKind = args
        .next()
        .unwrap_or_else(|| "wdl".into())
        .parse()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let secs: f64 = args.next().map_or(Ok(10.0), |s| s.parse())?;
    let th = Threads::new(2)?;
    let batch = 512;
    let shape = InputShape {
        fields: vec![16; 26],
        dense: 13,
    };
    let mut net = DenseNet::new(ModelConfig::new(model), shape)?;
    let (x, wide) = net.inputs_mut(batch);
    for (i, v) in x.iter_mut().enumerate() {
        *v = ((i * 7919 % 1000) as f32) * 1e-4 - 0.05;
    }
    wide.fill(0.0);
    let labels: Vec<f32> = (0..batch).map(|i| (i % 4 == 0) as u8 as f32).collect();
    let weights = vec![1.0f32; batch];
    let mut ms = Vec::new();
    th.install(|| {
        let start = Instant::now();
        while start.elapsed().as_secs_f64() < secs {
            let t = Instant::now();
            net.train_step(batch, &labels, &weights, &th);
            ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
    });
    anyhow::ensure!(!ms.is_empty(), "no step finished in {secs} s");
    let tenth = (ms.len() / 10).max(1);
    for (i, c) in ms.chunks(tenth).enumerate() {
        let mean = c.iter().sum::<f64>() / c.len() as f64;
        println!("tenth {i}: {} steps, mean {mean:.2} ms", c.len());
    }
    ms.sort_by(f64::total_cmp);
    let q = |f: f64| ms[((ms.len() - 1) as f64 * f) as usize];
    println!(
        "{model:?}, {} steps: p10 {:.2} ms, p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms",
        ms.len(),
        q(0.1),
        q(0.5),
        q(0.9),
        q(0.99)
    );
    Ok(())
}
