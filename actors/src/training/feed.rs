//! The trainer's side of the sample log: which offsets it has consumed, and a replay to run
//! before live consumption. Synchronous; the trainer actor calls it between steps.
//!
//! Every record read is either a training row or a refusal (undecodable, not in the schema),
//! never neither: that is what lets a manifest account for every consumed offset
//! (`rows_trained + samples_rejected` grows by exactly the offsets consumed).

use std::collections::BTreeMap;

use thiserror::Error;

use crate::ckpt::ReplayRecord;
use crate::event::{DeadLetter, JoinedSample, SAMPLES_TOPIC};
use crate::sample::json::SampleDecoder;
use crate::sample::{SampleBlock, Schema};
use crate::stream::{LogError, Offset, Record, StreamLog};

/// Re-consume `[from, to)` of one sample-log partition, without `[skip.0, skip.1)`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReplayPlan {
    pub partition: u32,
    pub from: Offset,
    pub to: Offset,
    pub skip: Option<(Offset, Offset)>,
}

/// Why a replay plan cannot run. All but [`ReplayError::Log`] are the caller's to fix.
#[derive(Debug, Error)]
pub enum ReplayError {
    #[error("partition {partition} does not exist ({partitions} partitions)")]
    NoPartition { partition: u32, partitions: u32 },
    #[error("empty range [{from}, {to})")]
    Empty { from: Offset, to: Offset },
    #[error("skip [{}, {}) is not a non-empty part of [{from}, {to})", skip.0, skip.1)]
    BadSkip {
        skip: (Offset, Offset),
        from: Offset,
        to: Offset,
    },
    #[error(
        "[{from}, {to}) is outside the retained samples [{low}, {high}) of partition {partition}"
    )]
    NotRetained {
        partition: u32,
        from: Offset,
        to: Offset,
        low: Offset,
        high: Offset,
    },
    /// The log could not say what it retains.
    #[error(transparent)]
    Log(#[from] LogError),
}

impl ReplayPlan {
    /// Checks the ranges against the log: the partition exists and the whole range is
    /// retained and already written.
    pub fn check(&self, log: &dyn StreamLog) -> Result<(), ReplayError> {
        let partitions = log.partitions();
        if self.partition >= partitions {
            return Err(ReplayError::NoPartition {
                partition: self.partition,
                partitions,
            });
        }
        let (from, to) = (self.from, self.to);
        if from >= to {
            return Err(ReplayError::Empty { from, to });
        }
        if let Some((a, b)) = self.skip {
            if a >= b || a < from || b > to {
                return Err(ReplayError::BadSkip {
                    skip: (a, b),
                    from,
                    to,
                });
            }
        }
        let low = log.low_watermark(self.partition)?;
        let high = log.high_watermark(self.partition)?;
        if from < low || to > high {
            return Err(ReplayError::NotRetained {
                partition: self.partition,
                from,
                to,
                low,
                high,
            });
        }
        Ok(())
    }

    /// Samples the replay reads.
    pub fn len(&self) -> u64 {
        (self.to - self.from) - self.skip.map_or(0, |(a, b)| b - a)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Debug)]
struct Replay {
    plan: ReplayPlan,
    next: Offset,
    rows: u64,
}

impl Replay {
    /// Moves past the skipped range when the cursor is inside it.
    fn skip_ahead(&mut self) {
        if let Some((a, b)) = self.plan.skip {
            if self.next >= a && self.next < b {
                self.next = b;
            }
        }
    }
}

/// What one pull produced.
#[derive(Debug, Default)]
pub struct Pulled {
    /// Rows appended to the block.
    pub rows: usize,
    /// Records refused, to be dead-lettered.
    pub rejected: Vec<DeadLetter>,
    /// The replay that finished with this pull.
    pub replay_done: Option<ReplayRecord>,
    /// The rows came from a replay, not from live consumption.
    pub from_replay: bool,
}

#[derive(Debug)]
pub struct SampleFeed {
    decoder: SampleDecoder,
    partitions: u32,
    offsets: BTreeMap<u32, Offset>,
    replay: Option<Replay>,
}

impl SampleFeed {
    /// A feed at `offsets` (a partition missing from it starts at 0).
    pub fn new(
        schema: &Schema,
        partitions: u32,
        mut offsets: BTreeMap<u32, Offset>,
        replay: Option<ReplayPlan>,
    ) -> Self {
        for p in 0..partitions {
            offsets.entry(p).or_insert(0);
        }
        Self {
            decoder: SampleDecoder::new(schema),
            partitions,
            offsets,
            replay: replay.map(|plan| Replay {
                next: plan.from,
                plan,
                rows: 0,
            }),
        }
    }

    /// Per partition, the next live offset: everything before it has been consumed.
    pub fn offsets(&self) -> &BTreeMap<u32, Offset> {
        &self.offsets
    }

    pub fn replaying(&self) -> bool {
        self.replay.is_some()
    }

    /// Live samples not yet consumed.
    pub fn lag(&self, log: &dyn StreamLog) -> Result<u64, LogError> {
        let mut lag = 0;
        for (&p, &o) in &self.offsets {
            lag += log.high_watermark(p)?.saturating_sub(o);
        }
        Ok(lag)
    }

    /// Reads up to `max` records into `block` (cleared first): from the replay while one
    /// runs, else from the live offsets, round-robin over partitions.
    ///
    /// Which records a pull takes depends only on the offsets it starts from and what the
    /// log holds, never on this feed's history: the partition it starts at is
    /// [`Self::first_partition`]. A trainer restored to a version's offsets then cuts the
    /// same batches from a log that holds the same records, so a run restarted from a
    /// version trains exactly what a run without the restart trained.
    pub fn pull(
        &mut self,
        log: &dyn StreamLog,
        max: usize,
        block: &mut SampleBlock,
    ) -> Result<Pulled, LogError> {
        block.clear();
        let mut out = Pulled::default();
        if let Some(r) = &mut self.replay {
            out.from_replay = true;
            let p = r.plan.partition;
            r.skip_ahead();
            let end = match r.plan.skip {
                Some((a, _)) if r.next < a => a,
                _ => r.plan.to,
            };
            let want = ((end.saturating_sub(r.next)) as usize).min(max);
            let recs = if want > 0 {
                log.read(p, r.next, want)?
            } else {
                Vec::new()
            };
            for rec in &recs {
                r.next = rec.offset + 1;
                match decode(&self.decoder, rec, p, block) {
                    Ok(()) => {
                        out.rows += 1;
                        r.rows += 1;
                    }
                    Err(dl) => out.rejected.push(dl),
                }
            }
            r.skip_ahead();
            if r.next >= r.plan.to {
                out.replay_done = Some(ReplayRecord {
                    partition: p,
                    from: r.plan.from,
                    to: r.plan.to,
                    skip: r.plan.skip,
                    rows: r.rows,
                });
                self.replay = None;
            } else if recs.is_empty() {
                // The plan was checked against the log; records vanishing under it means
                // retention removed them.
                return Err(LogError::OffsetOutOfRange {
                    topic: log.topic().to_owned(),
                    partition: p,
                    requested: r.next,
                    low: log.low_watermark(p)?,
                    high: log.high_watermark(p)?,
                });
            }
            return Ok(out);
        }
        let first = self.first_partition(max);
        for i in 0..self.partitions {
            let left = max.saturating_sub(out.rows + out.rejected.len());
            if left == 0 {
                break;
            }
            let p = (first + i) % self.partitions;
            let from = self.offsets[&p];
            let recs = log.read(p, from, left)?;
            for rec in &recs {
                match decode(&self.decoder, rec, p, block) {
                    Ok(()) => out.rows += 1,
                    Err(dl) => out.rejected.push(dl),
                }
            }
            if let Some(last) = recs.last() {
                self.offsets.insert(p, last.offset + 1);
            }
        }
        Ok(out)
    }

    /// The partition a live pull of `max` records starts at: the number of full pulls the
    /// offsets amount to, modulo the partitions. It moves on by one with each full pull, so
    /// that no partition starves, and is a function of the offsets alone.
    fn first_partition(&self, max: usize) -> u32 {
        let consumed: u64 = self.offsets.values().sum();
        let pulls = consumed / (max.max(1) as u64);
        (pulls % u64::from(self.partitions.max(1))) as u32
    }
}

/// Decodes one sample-log record into `block`, or says why it is refused (as the dead letter
/// the online trainer writes). `freshet train --from-log` reads the log through this too, so
/// offline and online training accept and refuse exactly the same records.
pub fn decode(
    decoder: &SampleDecoder,
    rec: &Record,
    partition: u32,
    block: &mut SampleBlock,
) -> Result<(), DeadLetter> {
    let refuse = |reason: &str, detail: String| DeadLetter {
        topic: SAMPLES_TOPIC.to_owned(),
        partition,
        offset: rec.offset,
        reason: reason.to_owned(),
        detail,
        payload: rec.payload.clone(),
    };
    let s =
        JoinedSample::from_msgpack(&rec.payload).map_err(|e| refuse(e.kind(), e.to_string()))?;
    let raw = s
        .to_raw_sample()
        .map_err(|e| refuse(e.kind(), e.to_string()))?;
    decoder
        .push(&raw, block)
        .map_err(|e| refuse(e.kind(), e.to_string()))
}

#[cfg(test)]
mod tests;
