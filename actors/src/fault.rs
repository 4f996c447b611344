//! Fault injection for the supervision tests: named points in the actors where a test can make
//! the next pass panic, as a bug would.
//!
//! Production code never arms a point; an unarmed [`Faults`] costs one relaxed atomic load per
//! check. Points are named `<actor kind>.<where>` (for example `trainer.batch`), and the list of
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

#[cfg(test)]
mod tests {
    use super::*;

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
