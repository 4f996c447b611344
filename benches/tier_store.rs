//! The on-disk tier's store against `redb` and `fjall`, on the tier's own workload (see
//! `freshet_actors::embedding::tier_compare`). Not a criterion bench: one run of each store,
//! one after another, printed as a table and one JSON line.
//!
//! ```sh
//! cargo bench --bench tier_store --features tier-compare              # 2M rows, 2000 steps
//! TIER_ROWS=7000000 cargo bench --bench tier_store --features tier-compare
//! ```
//! Rows go to `TIER_DIR` (default: a temporary directory).

use freshet_actors::embedding::tier_compare::{run, CompareConfig};

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> anyhow::Result<()> {
    let d = CompareConfig::default();
    let cfg = CompareConfig {
        rows: env_or("TIER_ROWS", d.rows),
        per_step: env_or("TIER_PER_STEP", d.per_step),
        steps: env_or("TIER_STEPS", d.steps),
        ..d
    };
    let tmp = tempfile::tempdir()?;
    let dir = std::env::var_os("TIER_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| tmp.path().to_path_buf());
    let figures = run(&cfg, &dir)?;
    let own = figures[0].step_rows_per_sec;
    println!(
        "| store | load rows/s | promote rows/s | demote rows/s | step rows/s | vs own | disk MB |"
    );
    println!("|---|---|---|---|---|---|---|");
    for f in &figures {
        println!(
            "| {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2} | {:.0} |",
            f.store,
            f.load_rows_per_sec,
            f.promote_rows_per_sec,
            f.demote_rows_per_sec,
            f.step_rows_per_sec,
            f.step_rows_per_sec / own,
            f.disk_bytes as f64 / 1e6
        );
    }
    println!(
        "{}",
        serde_json::json!({ "config": cfg, "stores": figures })
    );
    Ok(())
}
