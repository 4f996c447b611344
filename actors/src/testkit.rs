//! Seeds for randomised tests.
//!
//! A randomised test asks for its seed here. The seed is printed, so a failure shows it, and
//! `FRESHET_SEED=<seed> cargo test <name>` replays exactly that failure.

/// The seed for the randomised test `name`: `FRESHET_SEED` if set, otherwise a fresh one.
pub fn seed(name: &str) -> u64 {
    let seed = match std::env::var("FRESHET_SEED") {
        Ok(s) => s
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("FRESHET_SEED={s:?} is not a u64")),
        Err(_) => {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            crate::routing::mix64(nanos ^ u64::from(std::process::id()))
        }
    };
    eprintln!("{name}: seed {seed} (replay with FRESHET_SEED={seed})");
    seed
}
