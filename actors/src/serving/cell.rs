//! Two copies of the model, swapped under readers (the left-right pattern).
//!
//! Readers clone an `Arc` of the active copy under a read lock held for a pointer copy, and
//! keep it for the whole request. An update is applied to the other copy, the *spare*, which
//! no reader holds, and then the two are swapped. The spare is one delta behind after a swap,
//! so the next update applies that delta first. A delta therefore costs in proportion to its
//! rows, not to the table, at the price of twice the weights' memory.
//!
//! Readers never wait for an update beyond that pointer copy. The writer waits for readers of
//! the previous version to let go of the spare; if one holds it too long (a stuck request),
//! the writer rebuilds the spare as a clone of the active copy instead of waiting forever.

use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{ModelDelta, ServingError, ServingModel};

/// How long the writer waits for the last readers of the spare before cloning instead.
const SPARE_WAIT: Duration = Duration::from_millis(500);

#[derive(Debug, Default)]
pub struct ModelCell {
    active: RwLock<Option<Arc<ServingModel>>>,
    writer: Mutex<Writer>,
}

#[derive(Debug, Default)]
struct Writer {
    spare: Option<Arc<ServingModel>>,
    /// Deltas the spare has not had yet (those of the last swap).
    lag: Vec<Arc<ModelDelta>>,
    stats: CellStats,
}

/// What the cell has done, for status and metrics.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CellStats {
    pub installs: u64,
    pub deltas_applied: u64,
    pub delta_failures: u64,
    /// Spares rebuilt by cloning, because readers held them too long or a delta failed.
    pub spare_clones: u64,
    pub last_apply_ms: f64,
}

impl ModelCell {
    pub fn new() -> Self {
        Self::default()
    }

    /// The version being served, for the whole of one request.
    pub fn current(&self) -> Option<Arc<ServingModel>> {
        match self.active.read() {
            Ok(a) => a.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    pub fn version(&self) -> Option<u64> {
        self.current().map(|m| m.version())
    }

    pub fn stats(&self) -> CellStats {
        self.lock_writer().stats.clone()
    }

    /// Serves `model` from now on (a first load, a rollback, a calibration).
    pub fn install(&self, model: ServingModel) {
        let mut w = self.lock_writer();
        self.swap_in(Arc::new(model));
        // The old copy is of another lineage: the spare is cloned on the next delta.
        w.spare = None;
        w.lag.clear();
        w.stats.installs += 1;
    }

    /// Applies a delta that follows the served version, then serves the result.
    pub fn apply(&self, delta: Arc<ModelDelta>) -> Result<u64, ServingError> {
        self.apply_chain(vec![delta])
    }

    /// Applies consecutive deltas, the first following the served version, then serves the
    /// last one's version: readers go from the served version to it in one swap, never seeing
    /// the versions between (passed over, or withdrawn on the way).
    pub fn apply_chain(&self, deltas: Vec<Arc<ModelDelta>>) -> Result<u64, ServingError> {
        let started = Instant::now();
        let mut w = self.lock_writer();
        let active = self.current().ok_or(ServingError::NotLoaded)?;
        let Some(first) = deltas.first() else {
            return Ok(active.version());
        };
        if first.manifest.parent != Some(active.version()) {
            return Err(ServingError::Chain {
                have: active.version(),
                got: first.manifest.version,
                parent: first.manifest.parent,
            });
        }
        let mut spare = match w.spare.take().and_then(|s| wait_unique(s, SPARE_WAIT)) {
            Some(s) => s,
            None => {
                w.stats.spare_clones += 1;
                w.lag.clear();
                (*active).clone()
            }
        };
        let lag = std::mem::take(&mut w.lag);
        // The last lagging delta led the active copy to where it is: its weights are the
        // active copy's, decoded already. (Each delta checks that it follows the one before.)
        let applied = lag
            .iter()
            .try_for_each(|d| {
                let known = (d.manifest.version == active.version()).then(|| active.weights_arc());
                spare.apply_with(d, known)
            })
            .and_then(|()| deltas.iter().try_for_each(|d| spare.apply(d)));
        if let Err(e) = applied {
            // The spare may be half-updated: drop it; the next delta clones a fresh one.
            w.stats.delta_failures += 1;
            return Err(e);
        }
        let version = spare.version();
        let old = self.swap_in(Arc::new(spare));
        w.spare = old;
        w.stats.deltas_applied += deltas.len() as u64;
        w.lag = deltas;
        w.stats.last_apply_ms = started.elapsed().as_secs_f64() * 1e3;
        Ok(version)
    }

    fn swap_in(&self, model: Arc<ServingModel>) -> Option<Arc<ServingModel>> {
        let mut a = match self.active.write() {
            Ok(a) => a,
            Err(p) => p.into_inner(),
        };
        a.replace(model)
    }

    fn lock_writer(&self) -> std::sync::MutexGuard<'_, Writer> {
        match self.writer.lock() {
            Ok(w) => w,
            Err(p) => p.into_inner(),
        }
    }
}

/// The model inside `arc` once no reader holds it, or `None` after `limit`.
fn wait_unique(mut arc: Arc<ServingModel>, limit: Duration) -> Option<ServingModel> {
    let deadline = Instant::now() + limit;
    let mut pause = Duration::from_micros(20);
    loop {
        match Arc::try_unwrap(arc) {
            Ok(m) => return Some(m),
            Err(back) => arc = back,
        }
        if Instant::now() >= deadline {
            return None;
        }
        // Readers hold a version for one request: back off briefly and look again.
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(5));
    }
}
