//! `freshet`: the composition root. CLI, configuration and telemetry; the components live in
//! `freshet-actors`, the cluster in `freshet-cluster`.

mod bench;
mod ckpt;
mod cluster;
mod ctl;
mod dev;
mod failover;
mod fdlimit;
mod follow;
mod http;
mod lock;
mod progress;
mod resume;
mod serve;
mod settings;
mod stop;
mod stream;
mod telemetry;
mod train;

use std::path::PathBuf;

use anyhow::Context as _;
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
    let identity = identity(&cli.command, &settings);
    let telemetry = init_tracing(&settings, identity.as_ref())?;
    let result = dispatch(cli, &settings);
    if let Some(t) = telemetry {
        t.shutdown(std::time::Duration::from_secs(2));
    }
    result
}

/// Who a long-running command exports spans as; `None` for the commands that export none
/// (they run seconds, or measure without tracing).
fn identity(command: &Command, settings: &settings::Settings) -> Option<telemetry::Identity> {
    let host = || {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".into())
    };
    let named = |flag: Option<&String>| {
        flag.cloned()
            .or_else(|| settings.cluster.name.clone())
            .unwrap_or_else(host)
    };
    let (instance, roles) = match command {
        Command::Dev(_) => (named(None), "trainer,serving,joiner,shards".to_owned()),
        Command::Node(args) => (
            named(args.cluster.name.as_ref()),
            args.roles
                .clone()
                .unwrap_or_else(|| settings.cluster.roles.clone()),
        ),
        Command::Serve(_) => (named(None), "serving".to_owned()),
        _ => return None,
    };
    Some(telemetry::Identity { instance, roles })
}

fn dispatch(cli: Cli, settings: &settings::Settings) -> anyhow::Result<()> {
    match cli.command {
        Command::Bench { what } => bench::run(what, settings, cli.config.as_deref()),
        Command::Train(args) => train::run(*args, settings),
        Command::Gen(args) => train::gen(args),
        Command::Simulate(args) => stream::simulate(args, settings),
        Command::Ingest(args) => stream::ingest(args, settings),
        Command::Join(args) => stream::join(args, settings),
        Command::Ckpt(args) => ckpt::run(args, settings),
        Command::Serve(args) => serve::run(args, settings),
        Command::Dev(args) => dev::run(args, settings, None),
        Command::Ctl(args) => ctl::run(args),
        Command::Node(args) => cluster::run(args, settings),
        Command::Config => {
            println!("{}", serde_json::to_string_pretty(&settings.effective())?);
            Ok(())
        }
    }
}

/// Logs to stderr through `filter` (`FRESHET_LOG` when set, else `node.log`), and exports the
/// flows' spans when `[telemetry]` or the environment names a receiver and `identity` is
/// given. Colour only on a terminal: escape codes in a file or a log shipper are noise. A
/// filter that does not parse is refused rather than replaced: a typo would otherwise hide the
/// logs that were asked for.
fn init_tracing(
    settings: &settings::Settings,
    identity: Option<&telemetry::Identity>,
) -> anyhow::Result<Option<telemetry::Telemetry>> {
    use std::io::IsTerminal;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::Layer as _;
    let (filter, format) = (settings.node.log.as_str(), settings.node.log_format);
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
    // Flow spans are for the exporter; in the log they would only prefix lines.
    let filter = filter.add_directive(
        format!("{}=off", freshet_actors::telemetry::TARGET)
            .parse()
            .context("the flow target's directive")?,
    );
    type Boxed = Box<dyn tracing_subscriber::Layer<tracing_subscriber::Registry> + Send + Sync>;
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt: Boxed = match format {
        settings::LogFormat::Text => fmt
            .with_ansi(std::io::stderr().is_terminal())
            .with_filter(filter)
            .boxed(),
        settings::LogFormat::Json => fmt.json().with_ansi(false).with_filter(filter).boxed(),
    };
    let export = match identity {
        Some(id) => telemetry::ExportConfig::resolve(&settings.telemetry, |k| {
            std::env::var(k).ok().filter(|v| !v.trim().is_empty())
        })?
        .map(|cfg| telemetry::start(&cfg, id).map(|(p, t)| (cfg, p, t)))
        .transpose()?,
        None => None,
    };
    let (otel, provider): (Option<Boxed>, _) = match export {
        Some((cfg, provider, tracer)) => {
            let layer = tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_threads(false)
                .with_location(false)
                .with_target(false)
                .with_tracked_inactivity(false)
                .with_filter(
                    tracing_subscriber::filter::Targets::new()
                        .with_target(freshet_actors::telemetry::TARGET, tracing::Level::TRACE),
                )
                .boxed();
            (Some(layer), Some((provider, cfg.traces_url)))
        }
        None => (None, None),
    };
    // One list, so both layers sit directly on the registry: a boxed layer is a layer of
    // `Registry` only.
    let layers: Vec<Boxed> = std::iter::once(fmt).chain(otel).collect();
    let installed = tracing_subscriber::registry().with(layers).try_init();
    Ok(match (provider, installed) {
        (Some((p, url)), Ok(())) => {
            // Said once the log can show it.
            tracing::info!(%url, "exporting traces");
            Some(telemetry::running(p))
        }
        _ => None,
    })
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
