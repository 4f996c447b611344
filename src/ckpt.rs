//! `freshet ckpt`: list, inspect, verify and export the versions of a model store.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use freshet_actors::ckpt::ModelStore;

use crate::settings::Settings;

#[derive(Debug, Args)]
pub(crate) struct CkptArgs {
    /// The model store (default: <data_dir>/models).
    #[arg(long, global = true, value_name = "DIR")]
    store: Option<PathBuf>,
    #[command(subcommand)]
    command: CkptCommand,
}

#[derive(Debug, Subcommand)]
pub(crate) enum CkptCommand {
    /// List the versions, oldest first, then the versions set aside in quarantine/.
    Ls {
        /// One JSON object per version instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one version's manifest and the chain it restores from.
    Inspect { version: u64 },
    /// Check every file of every version (or of one) against its checksum, and whether each
    /// version's chain restores. Exits non-zero if any does not.
    Verify { version: Option<u64> },
    /// Write version V for serving: weights only, no optimizer state or admission counters.
    Export {
        version: u64,
        /// Required: the export is the serving format, the only one there is.
        #[arg(long, required = true)]
        serving: bool,
        /// A new directory to write it to.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

pub(crate) fn run(args: CkptArgs, settings: &Settings) -> anyhow::Result<()> {
    let root = args
        .store
        .unwrap_or_else(|| settings.node.data_dir.join("models"));
    let store = ModelStore::open_existing(&root)
        .with_context(|| format!("opening the model store {}", root.display()))?;
    let pins = store.pins()?;
    match args.command {
        CkptCommand::Ls { json } => {
            let versions = store.versions()?;
            if !json {
                println!(
                    "{:>8}  {:<5}  {:>6}  {:>10}  {:>12}  {:>12}  {:<10}  pinned by",
                    "version", "kind", "parent", "step", "rows", "bytes", "validation"
                );
            }
            for v in versions {
                let m = match store.manifest(v) {
                    Ok(m) => m,
                    Err(e) => {
                        println!("{v:>8}  unreadable: {e}");
                        continue;
                    }
                };
                let pinned: Vec<&str> = pins
                    .iter()
                    .filter(|(_, &p)| p == v)
                    .map(|(h, _)| h.as_str())
                    .collect();
                let validation = match &m.validation {
                    None => "-",
                    Some(x) if x.passed => "passed",
                    Some(_) => "failed",
                };
                if json {
                    println!(
                        "{}",
                        serde_json::json!({
                            "version": v, "kind": m.kind, "parent": m.parent, "base": m.base,
                            "step": m.step, "rows_trained": m.rows_trained,
                            "created_unix_ms": m.created_unix_ms, "bytes": m.bytes(),
                            "shards": m.shards, "validation": m.validation,
                            "sample_offsets": m.sample_offsets, "pinned_by": pinned,
                        })
                    );
                } else {
                    println!(
                        "{v:>8}  {:<5}  {:>6}  {:>10}  {:>12}  {:>12}  {validation:<10}  {}",
                        format!("{:?}", m.kind).to_lowercase(),
                        m.parent.map_or("-".into(), |p| p.to_string()),
                        m.step,
                        m.rows_trained,
                        m.bytes(),
                        pinned.join(",")
                    );
                }
            }
            // Versions set aside are listed after the store's own, each with its reason.
            for q in store.quarantined()? {
                if json {
                    println!(
                        "{}",
                        serde_json::json!({
                            "version": q.version, "quarantined": true, "dir": q.dir,
                            "reason": q.reason, "at_unix_ms": q.at_unix_ms,
                        })
                    );
                } else {
                    println!(
                        "{:>8}  quarantined in {}: {}",
                        q.version,
                        q.dir.display(),
                        q.reason
                    );
                }
            }
        }
        CkptCommand::Inspect { version } => {
            let m = store.manifest(version)?;
            let chain: Vec<u64> = match store.chain(version) {
                Ok(c) => c.iter().map(|m| m.version).collect(),
                Err(e) => bail!("version {version}: {e}"),
            };
            let mut out = serde_json::to_value(&m)?;
            out["restores_from"] = serde_json::json!(chain);
            out["bytes"] = serde_json::json!(m.bytes());
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
        CkptCommand::Verify { version } => {
            let versions = match version {
                Some(v) => vec![v],
                None => store.versions()?,
            };
            if versions.is_empty() {
                bail!("{} holds no versions", root.display());
            }
            // Each version's own files are read once; chains reuse the verdicts.
            let mut good = std::collections::BTreeMap::new();
            for &v in &versions {
                let ok = match store.verify(v) {
                    Ok(bytes) => {
                        println!("version {v}: ok ({bytes} bytes)");
                        true
                    }
                    Err(e) => {
                        println!("version {v}: BAD: {e}");
                        false
                    }
                };
                good.insert(v, ok);
            }
            // A version whose own files are fine still fails if its chain does.
            let mut broken = 0;
            for &v in &versions {
                if !good[&v] {
                    broken += 1;
                    continue;
                }
                let chain = match store.chain(v) {
                    Ok(c) => c,
                    Err(e) => {
                        println!("version {v}: BAD chain: {e}");
                        broken += 1;
                        continue;
                    }
                };
                for m in chain.iter().filter(|m| m.version != v) {
                    let ok = *good
                        .entry(m.version)
                        .or_insert_with(|| store.verify(m.version).is_ok());
                    if !ok {
                        println!(
                            "version {v}: BAD: it restores through bad version {}",
                            m.version
                        );
                        broken += 1;
                        break;
                    }
                }
            }
            if broken > 0 {
                bail!("{broken} of {} versions cannot be restored", versions.len());
            }
            println!("all {} versions verified", versions.len());
        }
        CkptCommand::Export { version, out, .. } => {
            let m = store
                .export_serving(version, &out)
                .with_context(|| format!("exporting version {version}"))?;
            println!(
                "{}",
                serde_json::json!({"version": version, "out": out, "bytes": m.bytes(), "shards": m.shards})
            );
        }
    }
    Ok(())
}
