//! `freshet`: the composition root. CLI, configuration and telemetry; the components live in
//! `freshet-actors`, the cluster in `freshet-cluster`.

mod bench;
mod ckpt;
mod ctl;
mod dev;
mod http;
mod lock;
mod serve;
mod settings;
mod stream;
mod train;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "freshet",
    version,
    about = "Online deep learning for recommendation models"
)]
struct Cli {
    /// Configuration file (default: ./freshet.toml when present).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Data directory (overrides node.data_dir).
    #[arg(long, global = true, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Measure a hot path against its baseline, in one run.
    Bench {
        #[command(subcommand)]
        what: bench::BenchCommand,
    },
    /// Train a model offline on files (the daily base model), then evaluate it.
    Train(train::TrainArgs),
    /// Write synthetic Criteo-layout data with known click probabilities.
    Gen(train::GenArgs),
    /// Play a live application (impressions, delayed clicks, faults) into the event log.
    Simulate(stream::SimulateArgs),
    /// Append JSON-lines events (impressions, actions) to the event log.
    Ingest(stream::IngestArgs),
    /// Join events into labelled samples, exactly once, one joiner per event-log partition.
    Join(stream::JoinArgsCli),
    /// The model store: list, inspect, verify and export checkpoint versions.
    Ckpt(ckpt::CkptArgs),
    /// Run the whole pipeline on one node: simulator (by default), joiners, shards, trainer,
    /// validator, checkpoints and serving, behind the HTTP API.
    Dev(dev::DevArgs),
    /// Talk to a running node's admin API: status, versions, rollback, replay, calibrate.
    Ctl(ctl::CtlArgs),
    /// Serve predictions over HTTP from a model store, following its new versions.
    Serve(serve::ServeArgs),
    /// Print the effective configuration (all layers applied) as TOML-compatible JSON.
    Config,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let mut overrides = Vec::new();
    if let Some(d) = &cli.data_dir {
        overrides.push(("node.data_dir", d.display().to_string()));
    }
    let settings = settings::load(cli.config.as_deref(), &overrides)?;
    init_tracing(&settings.node.log);
    match cli.command {
        Command::Bench { what } => bench::run(what, &settings),
        Command::Train(args) => train::run(args, &settings),
        Command::Gen(args) => train::gen(args),
        Command::Simulate(args) => stream::simulate(args, &settings),
        Command::Ingest(args) => stream::ingest(args, &settings),
        Command::Join(args) => stream::join(args, &settings),
        Command::Ckpt(args) => ckpt::run(args, &settings),
        Command::Serve(args) => serve::run(args, &settings),
        Command::Dev(args) => dev::run(args, &settings),
        Command::Ctl(args) => ctl::run(args),
        Command::Config => {
            println!("{}", serde_json::to_string_pretty(&settings.effective())?);
            Ok(())
        }
    }
}

fn init_tracing(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FRESHET_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(filter))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
