//! `freshet`: the composition root. CLI, configuration and telemetry; the components live in
//! `freshet-actors`, the cluster in `freshet-cluster`.

mod bench;
mod ckpt;
mod cluster;
mod ctl;
mod dev;
mod fdlimit;
mod http;
mod lock;
mod resume;
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
    Train(Box<train::TrainArgs>),
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
    /// One node of a cluster: hosts shard owners for the trainers that join it.
    Node(cluster::NodeArgs),
    /// Print the effective configuration (all layers applied) as TOML-compatible JSON.
    Config,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", describe(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// `e` and its causes, `: `-separated, each cause once: an error whose message already ends
/// with its cause's (as `LogError::Io`'s "context: os error") does not repeat it.
pub(crate) fn describe(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !out.ends_with(&c) {
            out.push_str(": ");
            out.push_str(&c);
        }
    }
    out
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let mut overrides = Vec::new();
    if let Some(d) = &cli.data_dir {
        overrides.push(("node.data_dir", d.display().to_string()));
    }
    let settings = settings::load(cli.config.as_deref(), &overrides)?;
    init_tracing(&settings.node.log, settings.node.log_format)?;
    match cli.command {
        Command::Bench { what } => bench::run(what, &settings, cli.config.as_deref()),
        Command::Train(args) => train::run(*args, &settings),
        Command::Gen(args) => train::gen(args),
        Command::Simulate(args) => stream::simulate(args, &settings),
        Command::Ingest(args) => stream::ingest(args, &settings),
        Command::Join(args) => stream::join(args, &settings),
        Command::Ckpt(args) => ckpt::run(args, &settings),
        Command::Serve(args) => serve::run(args, &settings),
        Command::Dev(args) => dev::run(args, &settings, None),
        Command::Ctl(args) => ctl::run(args),
        Command::Node(args) => cluster::run(args, &settings),
        Command::Config => {
            println!("{}", serde_json::to_string_pretty(&settings.effective())?);
            Ok(())
        }
    }
}

/// Logs to stderr through `filter` (`FRESHET_LOG` when set, else `node.log`). Colour only on a
/// terminal: escape codes in a file or a log shipper are noise. A filter that does not parse is
/// refused rather than replaced: a typo would otherwise hide the logs that were asked for.
fn init_tracing(filter: &str, format: settings::LogFormat) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    let filter = match std::env::var("FRESHET_LOG") {
        Ok(f) => tracing_subscriber::EnvFilter::try_new(&f)
            .map_err(|e| anyhow::anyhow!("invalid value {f:?} for FRESHET_LOG: {e}"))?,
        Err(_) => tracing_subscriber::EnvFilter::try_new(filter).map_err(|e| {
            anyhow::anyhow!(
                "invalid value {filter:?} for `node.log`: {e} (expected a tracing filter such \
                 as `info` or `freshet=debug,info`)"
            )
        })?,
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        settings::LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        settings::LogFormat::Json => builder.json().with_ansi(false).try_init(),
    };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cause_already_in_its_error_s_message_is_told_once() {
        let os = std::io::Error::from_raw_os_error(30);
        let e = anyhow::Error::from(freshet_actors::stream::LogError::Io {
            context: "appending to events".into(),
            source: os,
        })
        .context("writing version 1");
        let text = describe(&e);
        assert_eq!(text.matches("os error 30").count(), 1, "{text}");
        assert!(
            text.starts_with("writing version 1: appending to events: "),
            "{text}"
        );
        // A cause not in the message is still told.
        let e = anyhow::Error::from(std::io::Error::from_raw_os_error(2)).context("opening x");
        assert!(describe(&e).contains("opening x: ") && describe(&e).contains("os error 2"));
    }
}
