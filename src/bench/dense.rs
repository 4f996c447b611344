//! `freshet bench dense`: the training step's FLOP/s against the same binary's sgemm peak on
//! the same threads.

use std::time::Instant;

use clap::Args;
use freshet_actors::dense::gemm::SgemmProbe;
use freshet_actors::rng::Xoshiro256;
use serde::Serialize;

use super::{best, median, progress};

#[derive(Debug, Args)]
pub(crate) struct DenseArgs {
    /// lr, wdl, deepfm, dcn or dlrm.
    #[arg(long, default_value = "wdl")]
    model: freshet_actors::dense::ModelKind,
    #[arg(long, default_value_t = 512)]
    batch: usize,
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Timed steps per round.
    #[arg(long, default_value_t = 50)]
    steps: usize,
    /// Rounds, each followed by a round of every sgemm shape; medians are reported.
    #[arg(long, default_value_t = 7)]
    rounds: usize,
    /// Embedding dim of each of the 26 fields (13 dense features follow).
    #[arg(long, default_value_t = 16)]
    dim: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct DenseReport {
    model: &'static str,
    batch: usize,
    threads: usize,
    input_dim: usize,
    params: usize,
    rounds: usize,
    /// Median round.
    step_ms: f64,
    samples_per_sec: f64,
    flops_per_sample: f64,
    step_gflops: f64,
    step_gflops_best: f64,
    /// The sgemm peak: the best shape's median round (the largest square and the model's own
    /// layer shapes are measured).
    sgemm_peak_gflops: f64,
    sgemm_best_gflops: f64,
    /// Per shape: m, n, k, median and best round in GFLOP/s.
    sgemm_shapes: Vec<(usize, usize, usize, f64, f64)>,
    /// Median step round over the peak's median round.
    vs_sgemm_peak: f64,
    /// Best step round over the best sgemm round.
    vs_sgemm_best: f64,
}

/// One sgemm shape, timed in rounds between the step's rounds.
struct GemmRounds {
    probe: SgemmProbe,
    calls: usize,
    rates: Vec<f64>,
}

pub(super) fn run(a: DenseArgs) -> anyhow::Result<()> {
    use freshet_actors::dense::{DenseNet, InputShape, ModelConfig, Threads};
    let th = Threads::new(a.threads)?;
    anyhow::ensure!(
        a.batch > 0 && a.steps > 0 && a.rounds > 0,
        "--batch, --steps and --rounds must be positive"
    );
    let shape = InputShape {
        fields: vec![if a.model.has_embeddings() { a.dim } else { 0 }; 26],
        dense: 13,
    };
    let mut net = DenseNet::new(ModelConfig::new(a.model), shape.clone())?;
    let mut rng = Xoshiro256::seed_from_u64(1);
    let (x, wide) = net.inputs_mut(a.batch);
    x.iter_mut().for_each(|v| *v = rng.next_f32() * 0.1 - 0.05);
    wide.fill(0.0);
    let labels: Vec<f32> = (0..a.batch).map(|i| (i % 4 == 0) as u8 as f32).collect();
    let weights = vec![1.0f32; a.batch];
    progress(&format!(
        "dense bench: {} with {} parameters, batch {}, {} threads, {} rounds of {} steps, each \
         followed by rounds of the sgemm shapes",
        a.model.name(),
        net.param_count(),
        a.batch,
        a.threads,
        a.rounds,
        a.steps
    ));
    let flops = net.flops_per_sample();
    let d = shape.input_dim();
    let mut shapes = vec![(2048, 2048, 2048), (a.batch, 1024, d), (a.batch, 512, 1024)];
    shapes.dedup();
    let mut probes: Vec<GemmRounds> = shapes
        .into_iter()
        .map(|(m, n, k)| GemmRounds {
            probe: SgemmProbe::new(m, n, k),
            calls: 1,
            rates: Vec::new(),
        })
        .collect();
    // Why interleaved: a shared machine's speed drifts by a third within minutes. A peak timed
    // after the step, or its best call against the step's median round, measures the drift as much
    // as the step. Here every step round is followed by one round of each shape, about as long, and
    // the same statistic is taken of both.
    let mut step_rates = Vec::with_capacity(a.rounds);
    th.install(|| {
        for _ in 0..5 {
            net.train_step(a.batch, &labels, &weights, &th);
        }
        let t = Instant::now();
        for _ in 0..a.steps {
            net.train_step(a.batch, &labels, &weights, &th);
        }
        let round_secs = t.elapsed().as_secs_f64();
        for p in &mut probes {
            let rate = p.probe.time(2, &th);
            p.calls = ((round_secs * rate / p.probe.flop()).ceil() as usize).max(2);
        }
        for r in 0..a.rounds {
            let t = Instant::now();
            for _ in 0..a.steps {
                net.train_step(a.batch, &labels, &weights, &th);
            }
            step_rates.push(a.steps as f64 / t.elapsed().as_secs_f64());
            for p in &mut probes {
                let rate = p.probe.time(p.calls, &th);
                p.rates.push(rate);
            }
            progress(&format!("  round {} of {}", r + 1, a.rounds));
        }
    });
    let gflops = |steps_per_sec: f64| steps_per_sec * a.batch as f64 * flops / 1e9;
    let step_rate = median(&step_rates);
    let measured: Vec<_> = probes
        .iter()
        .map(|p| {
            let (m, n, k) = (p.probe.m, p.probe.n, p.probe.k);
            (m, n, k, median(&p.rates) / 1e9, best(&p.rates) / 1e9)
        })
        .collect();
    let peak = measured.iter().map(|s| s.3).fold(0.0, f64::max);
    let peak_best = measured.iter().map(|s| s.4).fold(0.0, f64::max);
    let step_gflops = gflops(step_rate);
    let step_gflops_best = gflops(best(&step_rates));
    let r = DenseReport {
        model: a.model.name(),
        batch: a.batch,
        threads: a.threads,
        input_dim: d,
        params: net.param_count(),
        rounds: a.rounds,
        step_ms: 1e3 / step_rate,
        samples_per_sec: step_rate * a.batch as f64,
        flops_per_sample: flops,
        step_gflops,
        step_gflops_best,
        sgemm_peak_gflops: peak,
        sgemm_best_gflops: peak_best,
        sgemm_shapes: measured,
        vs_sgemm_peak: step_gflops / peak,
        vs_sgemm_best: step_gflops_best / peak_best,
    };
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "{}: {:.2} ms/step, {:.0} samples/s, {:.1} GFLOP/s = {:.2} of the sgemm peak {:.1} \
             GFLOP/s (medians of {} rounds; best rounds: {:.1} of {:.1} = {:.2})",
            r.model,
            r.step_ms,
            r.samples_per_sec,
            r.step_gflops,
            r.vs_sgemm_peak,
            r.sgemm_peak_gflops,
            r.rounds,
            r.step_gflops_best,
            r.sgemm_best_gflops,
            r.vs_sgemm_best
        );
    }
    Ok(())
}
