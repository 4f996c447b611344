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

/// Fixtures shared by tests of several modules and crates.
pub mod fixtures {
    use std::collections::BTreeMap;

    use crate::embedding::{AdmissionConfig, Initializer, TableConfig};
    use crate::event::{Features, JoinedSample, SampleKind, Snapshot};
    use crate::ids::TableName;
    use crate::sample::json::{RawField, RawValue};

    /// A sample-log record: sample `i` with dense `I1 = i`, `C1 = v{i % 7}` and the click label.
    pub fn joined_sample(i: u64, click: bool) -> Vec<u8> {
        let mut f = Features::default();
        f.dense.insert("I1".into(), i as f64);
        f.sparse.insert(
            "C1".into(),
            RawField::One(RawValue::Str(format!("v{}", i % 7))),
        );
        JoinedSample {
            request_id: format!("r{i}"),
            item: "a".into(),
            user: "u".into(),
            impression_time_ms: 1_700_000_000_000,
            kind: SampleKind::Negative,
            labels: BTreeMap::from([("click".to_owned(), f64::from(u8::from(click)))]),
            weight: 1.0,
            features: Snapshot::encode(&f),
        }
        .to_msgpack()
    }

    /// Two tables: `user` (dim 8, normal init) and `item` (dim 4, admitted after 2 sightings).
    pub fn user_item_tables() -> Vec<(TableName, TableConfig)> {
        vec![
            (
                TableName::new("user"),
                TableConfig {
                    init: Initializer::Normal {
                        mean: 0.0,
                        std: 0.1,
                    },
                    ..TableConfig::with_dim(8)
                },
            ),
            (
                TableName::new("item"),
                TableConfig {
                    admission: AdmissionConfig::Counter { min_count: 2 },
                    ..TableConfig::with_dim(4)
                },
            ),
        ]
    }
}
