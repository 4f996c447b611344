use std::collections::BTreeMap;
use std::sync::Arc;

use super::*;
use crate::stream::EmbeddedLog;
use crate::stream::LogConfig;
use crate::testkit::fixtures::joined_sample as sample;

fn log(dir: &std::path::Path, per_partition: &[u64]) -> Arc<dyn StreamLog> {
    let cfg = LogConfig {
        partitions: per_partition.len() as u32,
        ..LogConfig::default()
    };
    let log = EmbeddedLog::open(dir, SAMPLES_TOPIC, cfg).unwrap();
    for (p, &n) in per_partition.iter().enumerate() {
        let recs: Vec<Vec<u8>> = (0..n)
            .map(|i| {
                // Offset 3 of every partition is not a sample.
                if i == 3 {
                    b"garbage".to_vec()
                } else {
                    sample(i, i % 2 == 0)
                }
            })
            .collect();
        let refs: Vec<&[u8]> = recs.iter().map(Vec::as_slice).collect();
        log.append(p as u32, &refs).unwrap();
    }
    Arc::new(log)
}

#[test]
fn live_pulls_account_for_every_offset_and_share_partitions() {
    let dir = tempfile::tempdir().unwrap();
    let log = log(dir.path(), &[10, 6]);
    let schema = Schema::default();
    let mut feed = SampleFeed::new(&schema, 2, BTreeMap::new(), None);
    let mut block = SampleBlock::for_schema(&schema);
    let (mut rows, mut rejected) = (0, 0);
    let mut pulls = 0;
    loop {
        let got = feed.pull(&*log, 4, &mut block).unwrap();
        assert_eq!(block.len(), got.rows);
        assert!(got.rows + got.rejected.len() <= 4);
        if got.rows + got.rejected.len() == 0 {
            break;
        }
        for d in &got.rejected {
            assert_eq!(d.offset, 3);
            assert_eq!(d.topic, SAMPLES_TOPIC);
            assert_eq!(d.payload, b"garbage");
        }
        rows += got.rows;
        rejected += got.rejected.len();
        pulls += 1;
    }
    assert_eq!(feed.offsets(), &BTreeMap::from([(0, 10), (1, 6)]));
    assert_eq!((rows, rejected), (14, 2));
    assert!(pulls >= 4);
    assert_eq!(feed.lag(&*log).unwrap(), 0);
}

#[test]
fn a_replay_reads_exactly_its_range_minus_the_skip_then_goes_live() {
    let dir = tempfile::tempdir().unwrap();
    let log = log(dir.path(), &[20, 5]);
    let schema = Schema::default();
    let plan = ReplayPlan {
        partition: 0,
        from: 2,
        to: 15,
        skip: Some((5, 9)),
    };
    plan.check(&*log).unwrap();
    assert_eq!(plan.len(), 9);
    let live = BTreeMap::from([(0, 20), (1, 5)]);
    let mut feed = SampleFeed::new(&schema, 2, live.clone(), Some(plan.clone()));
    let mut block = SampleBlock::for_schema(&schema);
    let mut seen = Vec::new();
    let done = loop {
        let got = feed.pull(&*log, 2, &mut block).unwrap();
        assert!(got.from_replay);
        for r in block.rows() {
            seen.push(r.dense()[0] as u64);
        }
        seen.extend(got.rejected.iter().map(|d| d.offset));
        if let Some(d) = got.replay_done {
            break d;
        }
    };
    seen.sort_unstable();
    assert_eq!(seen, vec![2, 3, 4, 9, 10, 11, 12, 13, 14]);
    assert_eq!(done.rows, 8, "offset 3 is refused, not trained");
    assert_eq!(done.skip, Some((5, 9)));
    // Live offsets did not move, and live consumption resumes where it was.
    assert_eq!(feed.offsets(), &live);
    assert!(!feed.replaying());
    let got = feed.pull(&*log, 2, &mut block).unwrap();
    assert!(!got.from_replay);
    assert_eq!(got.rows, 0);
}

#[test]
fn a_replay_skipping_its_tail_ends_at_the_skip() {
    let dir = tempfile::tempdir().unwrap();
    let log = log(dir.path(), &[10]);
    let schema = Schema::default();
    let plan = ReplayPlan {
        partition: 0,
        from: 4,
        to: 10,
        skip: Some((6, 10)),
    };
    let mut feed = SampleFeed::new(&schema, 1, BTreeMap::new(), Some(plan));
    let mut block = SampleBlock::for_schema(&schema);
    let got = feed.pull(&*log, 100, &mut block).unwrap();
    assert_eq!(got.replay_done.unwrap().rows, 2);
}

#[test]
fn replay_plans_outside_the_log_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let log = log(dir.path(), &[10, 10]);
    let plan = |partition, from, to, skip| ReplayPlan {
        partition,
        from,
        to,
        skip,
    };
    let bad = [
        (plan(2, 0, 1, None), "does not exist"),
        (plan(0, 5, 5, None), "empty range"),
        (plan(0, 0, 11, None), "outside the retained"),
        (plan(0, 2, 8, Some((1, 3))), "skip [1, 3)"),
        (plan(0, 2, 8, Some((4, 4))), "skip [4, 4)"),
    ];
    for (plan, want) in bad {
        let e = plan.check(&*log).unwrap_err().to_string();
        assert!(e.contains(want), "{plan:?}: {e}");
    }
}

#[test]
fn a_feed_started_at_another_feeds_offsets_cuts_the_same_batches_from_there() {
    let dir = tempfile::tempdir().unwrap();
    let log = log(dir.path(), &[23, 17, 9]);
    let schema = Schema::default();
    let mut block = SampleBlock::for_schema(&schema);
    // Per pull, the offsets after it: with contiguous reads, what the pull took.
    let cuts = |feed: &mut SampleFeed, block: &mut SampleBlock| {
        let mut seen = Vec::new();
        loop {
            let got = feed.pull(&*log, 5, block).unwrap();
            if got.rows + got.rejected.len() == 0 {
                return seen;
            }
            seen.push(feed.offsets().clone());
        }
    };
    let whole = cuts(
        &mut SampleFeed::new(&schema, 3, BTreeMap::new(), None),
        &mut block,
    );
    assert_eq!(
        whole.last(),
        Some(&BTreeMap::from([(0, 23), (1, 17), (2, 9)]))
    );
    // The partitions take turns: after three full pulls each has been read.
    assert!(whole[2].values().all(|&o| o > 0), "{:?}", &whole[..3]);
    for k in 0..whole.len() {
        let mut resumed = SampleFeed::new(&schema, 3, whole[k].clone(), None);
        assert_eq!(
            cuts(&mut resumed, &mut block),
            whole[k + 1..],
            "resumed after pull {k}"
        );
    }
}
