//! Kubernetes Events, rate-limited: what a device or a manifest went through, for
//! `kubectl describe` and `kubectl events`.
//!
//! The recorder already folds repeats of one event into a series (a count and a last-seen
//! time). On top of that, each object gets a small budget per reason, as a kubelet's event
//! correlator does: a burst, then one event per interval. A flapping device or a resource
//! failing on a thousand devices costs the API server a bounded number of writes, and what
//! was held back is counted in the next event that goes out.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use fleetlet_crds::{
    k8s_openapi::api::core::v1::ObjectReference,
    kube::runtime::events::{Event, EventType, Recorder},
};
use tracing::{debug, warn};

/// Events an object may get at once for one reason.
pub const BURST: u32 = 5;
/// Then one more per this interval.
pub const REFILL: Duration = Duration::from_secs(60);
/// Every object together: at most this many events at once, then one per [`GLOBAL_REFILL`].
pub const GLOBAL_BURST: u32 = 100;
pub const GLOBAL_REFILL: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: u32,
    last: Instant,
    /// Events held back since the last one that went out.
    held: u32,
}

impl Bucket {
    fn full(burst: u32, now: Instant) -> Self {
        Self {
            tokens: burst,
            last: now,
            held: 0,
        }
    }

    /// Takes a token if there is one (after refilling); otherwise counts one held back.
    fn take(&mut self, burst: u32, refill: Duration, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last);
        let earned = (elapsed.as_millis() / refill.as_millis().max(1)) as u32;
        if earned > 0 {
            self.tokens = self.tokens.saturating_add(earned).min(burst);
            self.last += refill * earned;
        }
        if self.tokens > 0 {
            self.tokens -= 1;
            true
        } else {
            self.held = self.held.saturating_add(1);
            false
        }
    }
}

/// Publishes Events within per-object and global budgets.
pub struct Events {
    recorder: Recorder,
    buckets: Mutex<(Bucket, HashMap<String, Bucket>)>,
}

impl Events {
    pub fn new(recorder: Recorder) -> Self {
        Self {
            recorder,
            buckets: Mutex::new((Bucket::full(GLOBAL_BURST, Instant::now()), HashMap::new())),
        }
    }

    /// Whether an event for `key` may go out now, and how many were held back before it.
    fn admit(&self, key: &str) -> Option<u32> {
        let now = Instant::now();
        let mut guard = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let (global, per) = &mut *guard;
        // Forget objects that have been quiet long enough to be back at a full budget.
        if per.len() > 10_000 {
            per.retain(|_, b| now.saturating_duration_since(b.last) < REFILL * BURST);
        }
        let b = per
            .entry(key.to_owned())
            .or_insert_with(|| Bucket::full(BURST, now));
        if !b.take(BURST, REFILL, now) {
            return None;
        }
        if !global.take(GLOBAL_BURST, GLOBAL_REFILL, now) {
            b.tokens += 1;
            b.held = b.held.saturating_add(1);
            return None;
        }
        Some(std::mem::take(&mut b.held))
    }

    /// Publishes a Warning (or Normal) event on `object`, unless its budget for `reason`
    /// is spent. Returns whether it went out.
    pub async fn publish(
        &self,
        object: &ObjectReference,
        warning: bool,
        reason: &str,
        note: &str,
        action: &str,
    ) -> bool {
        let key = format!(
            "{}/{}/{}/{}",
            object.kind.as_deref().unwrap_or_default(),
            object.namespace.as_deref().unwrap_or_default(),
            object.name.as_deref().unwrap_or_default(),
            reason
        );
        let Some(held) = self.admit(&key) else {
            debug!(%key, "event held back by its rate limit");
            return false;
        };
        let mut note = note.to_owned();
        if held > 0 {
            note.push_str(&format!(" ({held} similar events held back)"));
        }
        // The API server refuses notes over 1 kB.
        if note.len() > 1024 {
            let mut end = 1000;
            while !note.is_char_boundary(end) {
                end -= 1;
            }
            note.truncate(end);
            note.push_str(" …");
        }
        let event = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.into(),
            note: Some(note),
            action: action.into(),
            secondary: None,
        };
        match self.recorder.publish(&event, object).await {
            Ok(()) => true,
            Err(e) => {
                warn!(error = %e, reason, "publishing an event failed");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_a_burst_then_one_per_interval() {
        let t0 = Instant::now();
        let mut b = Bucket::full(3, t0);
        let refill = Duration::from_secs(10);
        assert!((0..3).all(|_| b.take(3, refill, t0)));
        assert!(!b.take(3, refill, t0));
        assert!(!b.take(3, refill, t0 + Duration::from_secs(9)));
        assert!(b.take(3, refill, t0 + Duration::from_secs(10)));
        assert!(!b.take(3, refill, t0 + Duration::from_secs(11)));
        assert_eq!(b.held, 3);
        // A long quiet spell refills to the burst, never beyond.
        let later = t0 + Duration::from_secs(1000);
        assert!((0..3).all(|_| b.take(3, refill, later)));
        assert!(!b.take(3, refill, later));
    }
}
