//! Fault injection for the supervision tests: named points in the actors where a test can make
//! the next pass panic, as a bug would.
//!
//! Production code never arms a point, except where the `FRESHET_FAULTS` environment variable
//! asks a whole process to ([`Faults::parse`]), for fault-injection tests of real processes; an
//! unarmed [`Faults`] costs one relaxed atomic load per check. Points are named `<actor kind>.<where>` (for example `trainer.batch`), and the list of
//! points an actor checks is in its module docs.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Shared by every actor of a pipeline (cloning shares the same points).
#[derive(Clone, Debug, Default)]
pub struct Faults {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    any: AtomicBool,
    /// Point -> (passes to let through first, panics left to raise).
    armed: Mutex<HashMap<String, (u64, u64)>>,
    fired: Mutex<HashMap<String, u64>>,
}

impl Faults {
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes the `point` panic `times` times, after letting `after` passes through.
    pub fn arm(&self, point: &str, after: u64, times: u64) {
        let mut armed = self.inner.armed.lock().unwrap_or_else(|p| p.into_inner());
        armed.insert(point.to_owned(), (after, times));
        self.inner.any.store(true, Ordering::Release);
    }

    /// Points from a spec such as `trainer.batch` (panic at every pass), `trainer.batch@100`
    /// (after letting 100 passes through) or `trainer.batch@100x3` (then three times), several
    /// separated by commas.
    pub fn parse(spec: &str) -> Result<Self, FaultSpecError> {
        let f = Self::new();
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let bad = || FaultSpecError(part.to_owned());
            let (point, rest) = part.split_once('@').unwrap_or((part, "0"));
            let (after, times) = match rest.split_once('x') {
                Some((a, t)) => (a, Some(t)),
                None => (rest, None),
            };
            let valid_point = !point.is_empty()
                && point
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '_');
            if !valid_point {
                return Err(bad());
            }
            let after: u64 = after.parse().map_err(|_| bad())?;
            let times: u64 = match times {
                None => u64::MAX,
                Some(t) => t.parse().map_err(|_| bad())?,
            };
            f.arm(point, after, times);
        }
        Ok(f)
    }

    /// How often `point` has panicked.
    pub fn fired(&self, point: &str) -> u64 {
        let fired = self.inner.fired.lock().unwrap_or_else(|p| p.into_inner());
        fired.get(point).copied().unwrap_or(0)
    }

    /// Panics if `point` is armed and due.
    ///
    /// # Panics
    /// That is its purpose: only when a test armed the point.
    pub fn check(&self, point: &str) {
        if !self.inner.any.load(Ordering::Acquire) {
            return;
        }
        let fire = {
            let mut armed = self.inner.armed.lock().unwrap_or_else(|p| p.into_inner());
            match armed.get_mut(point) {
                Some((after, _)) if *after > 0 => {
                    *after -= 1;
                    false
                }
                Some((_, times)) if *times > 0 => {
                    *times -= 1;
                    true
                }
                _ => false,
            }
        };
        if fire {
            *self
                .inner
                .fired
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(point.to_owned())
                .or_default() += 1;
            panic!("injected fault at {point}");
        }
    }
}

/// A fault spec that is not `point[@after[xtimes]]`.
#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not a fault point spec: expected point[@after[xtimes]], as trainer.batch@100x3")]
pub struct FaultSpecError(String);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_arm_their_points_and_malformed_ones_are_refused() {
        let f = Faults::parse("a.b@2x1, c_d").unwrap();
        for _ in 0..2 {
            f.check("a.b");
        }
        assert!(std::panic::catch_unwind(|| f.check("a.b")).is_err());
        f.check("a.b");
        for _ in 0..3 {
            assert!(std::panic::catch_unwind(|| f.check("c_d")).is_err());
        }
        assert_eq!(f.fired("c_d"), 3);
        for bad in ["@1", "a b", "a@x", "a@1x", "a@-1", "a@1x2x3"] {
            let e = Faults::parse(bad).unwrap_err().to_string();
            assert!(e.contains("point[@after[xtimes]]"), "{bad}: {e}");
        }
        assert!(Faults::parse("").is_ok());
    }

    #[test]
    fn an_armed_point_fires_after_its_passes_then_disarms() {
        let f = Faults::new();
        f.check("x.y");
        f.arm("x.y", 2, 1);
        f.check("x.y");
        f.check("x.y");
        let r = std::panic::catch_unwind(|| f.check("x.y"));
        assert!(r.is_err());
        f.check("x.y");
        f.check("other");
        assert_eq!(f.fired("x.y"), 1);
    }
}
