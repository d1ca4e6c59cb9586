//! What the operator remembers between reconciliations to send each job to one pod: a lock
//! per model, so that a burst of generations is placed one at a time, each seeing the
//! queues the ones before it filled; and since when each pod holding jobs has not been
//! ready. Both live in memory: after a restart the locks start free and the not-ready
//! clocks start again, which only delays a resubmission.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::future::join_all;
use imagegen_crds::api::RuntimeLoad;

use crate::api::image_generation::RuntimePod;
use crate::runtime_client::{RuntimeApi, Target};
use crate::runtime_pods::{base_url, PodEndpoint};

/// A not-ready clock older than this belongs to a pod long gone: forgotten.
const FORGET_AFTER: Duration = Duration::from_secs(24 * 3600);

type PodKey = (String, String, String);
type ModelLock = Arc<tokio::sync::Mutex<()>>;

/// The operator's memory for dispatching jobs to pods.
#[derive(Default)]
pub struct DispatchState {
    locks: Mutex<HashMap<(String, String), ModelLock>>,
    unready: Mutex<HashMap<PodKey, Instant>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The maps stay consistent whatever panicked while holding them.
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl DispatchState {
    /// The lock that submissions to the model `name` in `namespace` take in turn.
    pub fn model_lock(&self, namespace: &str, name: &str) -> ModelLock {
        lock(&self.locks)
            .entry((namespace.to_string(), name.to_string()))
            .or_default()
            .clone()
    }

    /// How long `pod` (of `namespace`) has been not ready, as seen by the calls so far:
    /// `None` when it is ready now.
    pub fn unready_for(&self, namespace: &str, pod: &RuntimePod, ready: bool) -> Option<Duration> {
        let key = (namespace.to_string(), pod.name.clone(), pod.address.clone());
        let mut unready = lock(&self.unready);
        if ready {
            unready.remove(&key);
            return None;
        }
        let now = Instant::now();
        unready.retain(|_, since| now.duration_since(*since) < FORGET_AFTER);
        Some(now.duration_since(*unready.entry(key).or_insert(now)))
    }
}

/// What the ready `pods` say of their load, by pod name, asked all at once; a pod that does
/// not answer is left out.
pub async fn loads(
    runtime: &dyn RuntimeApi,
    token: &str,
    pods: &[PodEndpoint],
) -> HashMap<String, RuntimeLoad> {
    let asks = pods.iter().filter(|p| p.ready).map(|p| async move {
        let target = Target {
            base_url: base_url(&p.pod),
            token: token.to_string(),
        };
        (p.pod.name.clone(), runtime.load(&target).await)
    });
    join_all(asks)
        .await
        .into_iter()
        .filter_map(|(name, load)| match load {
            Ok(load) => Some((name, load)),
            Err(e) => {
                tracing::debug!(pod = %name, error = %e, "no load from the pod");
                None
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_not_ready_clock_runs_until_the_pod_is_ready_again() {
        let state = DispatchState::default();
        let pod = RuntimePod {
            name: "sd15-a".into(),
            address: "10.0.0.1:8080".into(),
        };
        assert_eq!(state.unready_for("team-a", &pod, true), None);
        let first = state.unready_for("team-a", &pod, false).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let later = state.unready_for("team-a", &pod, false).unwrap();
        assert!(
            later >= first + Duration::from_millis(20),
            "{first:?} {later:?}"
        );
        assert_eq!(state.unready_for("team-a", &pod, true), None);
        // Ready again: the clock starts over.
        assert!(state.unready_for("team-a", &pod, false).unwrap() < later);
    }

    #[test]
    fn one_lock_per_model() {
        let state = DispatchState::default();
        let a = state.model_lock("team-a", "sd15");
        assert!(Arc::ptr_eq(&a, &state.model_lock("team-a", "sd15")));
        assert!(!Arc::ptr_eq(&a, &state.model_lock("team-b", "sd15")));
    }
}
