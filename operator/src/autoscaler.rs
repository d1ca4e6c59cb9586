//! The queue autoscaler of a DiffusionModel: how many replicas its queue (pending and
//! running generations) needs, and when to change the count. Pure: the controller gives it
//! what it saw and writes what it decides through the model's scale subresource, the same
//! door `kubectl scale` and an HPA use.
//!
//! - **Needed**: `ceil(queue / queuePerReplica)` within `max(min, 1)..=max`; `min` (possibly
//!   zero) when the queue is empty.
//! - **Up at once**: when more are needed than run. From zero, this is a cold start: the
//!   status records when it began, and the model's events say when the first replica
//!   became ready.
//! - **Down after a quiet window**: only when fewer have been needed than run for
//!   `scaleDownAfterSeconds` without a break (`status.autoscaling.fewerNeededSince`), so a short lull between bursts does not
//!   drop replicas that the next burst needs (GPU pods start slowly).
//! - `External` leaves the count to others (an HPA, `kubectl scale`) and only reports.

use std::time::Duration;

use imagegen_crds::diffusion_model::{AutoscalingStatus, Replicas};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

/// Queued and running generations per replica, by default.
pub const DEFAULT_QUEUE_PER_REPLICA: u32 = 2;
/// Seconds of a smaller need before scaling down, by default.
pub const DEFAULT_SCALE_DOWN_AFTER_SECONDS: u32 = 300;

/// How one model scales.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub min: u32,
    pub max: u32,
    /// Whether the operator sets the count from the queue (`autoscaler: Queue`).
    pub queue_driven: bool,
    pub queue_per_replica: u32,
    pub scale_down_after: Duration,
}

impl Policy {
    /// The policy of a model's `spec.replicas` (1 to 1, queue-driven, when absent).
    pub fn of(replicas: Option<&Replicas>) -> Policy {
        use imagegen_crds::diffusion_model::Autoscaler;
        Policy {
            min: replicas.map_or(1, |r| r.min),
            max: replicas.map_or(1, |r| r.max),
            queue_driven: replicas.and_then(|r| r.autoscaler) != Some(Autoscaler::External),
            queue_per_replica: replicas
                .and_then(|r| r.queue_per_replica)
                .unwrap_or(DEFAULT_QUEUE_PER_REPLICA)
                .max(1),
            scale_down_after: Duration::from_secs(u64::from(
                replicas
                    .and_then(|r| r.scale_down_after_seconds)
                    .unwrap_or(DEFAULT_SCALE_DOWN_AFTER_SECONDS),
            )),
        }
    }

    /// Replicas a queue of `queue` generations needs.
    pub fn needed(&self, queue: u32) -> u32 {
        if queue == 0 {
            return self.min.min(self.max);
        }
        queue
            .div_ceil(self.queue_per_replica)
            .clamp(self.min.max(1).min(self.max), self.max)
    }

    /// The replicas the model is heading for: what its `queue` needs when the queue drives
    /// the count, and never fewer than the `count` set through the scale subresource.
    pub fn heading_for(&self, queue: u32, count: Option<u32>) -> u32 {
        let set = self.bounded(count.unwrap_or(0));
        if self.queue_driven {
            self.needed(queue).max(set)
        } else {
            set
        }
    }

    /// A count (`spec.replicas.count`, or the Deployment's) brought within `min..=max`.
    pub fn bounded(&self, count: u32) -> u32 {
        count.clamp(self.min.min(self.max), self.max)
    }
}

/// A change worth an event on the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    pub reason: &'static str,
    pub message: String,
}

/// What the autoscaler decided.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// The count to write through the scale subresource, when it changes.
    pub scale_to: Option<u32>,
    /// `up`, `down` or `from_zero` when `scale_to` is set: the metric label.
    pub direction: Option<&'static str>,
    pub status: AutoscalingStatus,
    pub notes: Vec<Note>,
}

/// Decides from the model's `queue`, the replica count it runs now (`current`, within
/// bounds), its ready replicas, and the status of the decision before.
pub fn decide(
    policy: &Policy,
    queue: u32,
    current: u32,
    ready: u32,
    old: Option<&AutoscalingStatus>,
    now: &Time,
) -> Decision {
    let needed = policy.needed(queue);
    let mut notes = Vec::new();
    let mut status = AutoscalingStatus {
        queue,
        desired_replicas: needed,
        // Only transitions are written, so that an idle model's status stays unchanged.
        fewer_needed_since: (needed < current).then(|| {
            old.and_then(|o| o.fewer_needed_since.clone())
                .unwrap_or_else(|| now.clone())
        }),
        cold_start_time: old.and_then(|o| o.cold_start_time.clone()),
        last_cold_start_seconds: old.and_then(|o| o.last_cold_start_seconds),
    };
    if let Some(began) = status.cold_start_time.clone() {
        if ready > 0 {
            let took = crate::time_between(&began, now);
            status.last_cold_start_seconds = Some(took.as_secs().try_into().unwrap_or(u32::MAX));
            status.cold_start_time = None;
            notes.push(Note {
                reason: "ColdStartFinished",
                message: format!(
                    "the first replica is ready {:.1}s after scaling from zero",
                    took.as_secs_f64()
                ),
            });
        } else if current == 0 && queue == 0 {
            // Scaled back to zero before it started (by hand): no cold start to finish.
            status.cold_start_time = None;
        }
    }
    let mut decision = Decision {
        scale_to: None,
        direction: None,
        status,
        notes,
    };
    if !policy.queue_driven {
        return decision;
    }
    let quiet_for = decision
        .status
        .fewer_needed_since
        .as_ref()
        .map_or(Duration::ZERO, |t| crate::time_between(t, now));
    if needed > current {
        decision.scale_to = Some(needed);
        if current == 0 {
            decision.direction = Some("from_zero");
            decision.status.cold_start_time = Some(now.clone());
            decision.notes.push(Note {
                reason: "ScaledFromZero",
                message: format!(
                    "cold start: {queue} generation(s) waiting, starting {needed} replica(s)"
                ),
            });
        } else {
            decision.direction = Some("up");
            decision.notes.push(Note {
                reason: "ScaledUp",
                message: format!("{queue} generation(s) queued: {current} to {needed} replicas"),
            });
        }
    } else if needed < current && quiet_for >= policy.scale_down_after {
        decision.scale_to = Some(needed);
        decision.direction = Some("down");
        decision.status.fewer_needed_since = None;
        decision.notes.push(Note {
            reason: "ScaledDown",
            message: format!(
                "{queue} generation(s) queued for {}s: {current} to {needed} replicas",
                quiet_for.as_secs()
            ),
        });
    }
    decision
}

/// When to look again at a model whose queue needs fewer replicas than run: when its quiet
/// window ends (a watch event may come sooner).
pub fn recheck_after(policy: &Policy, decision: &Decision, now: &Time) -> Option<Duration> {
    let status = &decision.status;
    if !policy.queue_driven || decision.scale_to.is_some() {
        return None;
    }
    let since = status.fewer_needed_since.as_ref()?;
    Some(
        policy
            .scale_down_after
            .saturating_sub(crate::time_between(since, now))
            .max(Duration::from_secs(1)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn at(second: i64) -> Time {
        Time(Timestamp::from_second(1_800_000_000 + second).unwrap())
    }

    fn policy(min: u32, max: u32) -> Policy {
        Policy {
            min,
            max,
            queue_driven: true,
            queue_per_replica: 2,
            scale_down_after: Duration::from_secs(60),
        }
    }

    #[test]
    fn the_queue_needs_a_replica_per_two_generations_within_bounds() {
        let p = policy(0, 3);
        let needed: Vec<u32> = [0, 1, 2, 3, 5, 60].map(|q| p.needed(q)).to_vec();
        assert_eq!(needed, [0, 1, 1, 2, 3, 3]);
        assert_eq!(policy(2, 4).needed(0), 2);
        assert_eq!(policy(2, 4).needed(1), 2);
        assert_eq!((p.bounded(9), policy(1, 2).bounded(0)), (3, 1));
        let defaults = Policy::of(None);
        assert_eq!(
            (defaults.min, defaults.max, defaults.queue_driven),
            (1, 1, true)
        );
    }

    #[test]
    fn the_first_generation_starts_a_model_at_zero_and_the_cold_start_is_timed() {
        let p = policy(0, 3);
        let d = decide(&p, 1, 0, 0, None, &at(0));
        assert_eq!((d.scale_to, d.direction), (Some(1), Some("from_zero")));
        assert_eq!(d.status.cold_start_time, Some(at(0)));
        assert_eq!(d.notes[0].reason, "ScaledFromZero");
        // Starting: nothing more to do while the queue stays.
        let d = decide(&p, 1, 1, 0, Some(&d.status), &at(5));
        assert_eq!((d.scale_to, d.notes.len()), (None, 0));
        // The first replica is ready after 12 s.
        let d = decide(&p, 1, 1, 1, Some(&d.status), &at(12));
        assert_eq!(d.status.cold_start_time, None);
        assert_eq!(d.status.last_cold_start_seconds, Some(12));
        assert_eq!(d.notes[0].reason, "ColdStartFinished");
        assert!(d.notes[0].message.contains("12.0s"), "{:?}", d.notes);
    }

    #[test]
    fn scales_up_at_once_and_down_after_a_quiet_window() {
        let p = policy(0, 3);
        let d = decide(&p, 6, 1, 1, None, &at(0));
        assert_eq!((d.scale_to, d.direction), (Some(3), Some("up")));
        assert_eq!(d.status.fewer_needed_since, None);
        // The queue drains at 10 s: three replicas stay for the window.
        let d = decide(&p, 0, 3, 3, Some(&d.status), &at(10));
        assert_eq!(
            (d.scale_to, d.status.fewer_needed_since.clone()),
            (None, Some(at(10)))
        );
        let d = decide(&p, 0, 3, 3, Some(&d.status), &at(20));
        assert_eq!(d.status.fewer_needed_since, Some(at(10)));
        assert_eq!(
            recheck_after(&p, &d, &at(20)),
            Some(Duration::from_secs(50))
        );
        // A burst within the window keeps them and starts the window over.
        let d = decide(&p, 5, 3, 3, Some(&d.status), &at(40));
        assert_eq!(
            (d.scale_to, d.status.fewer_needed_since.clone()),
            (None, None)
        );
        let d = decide(&p, 0, 3, 3, Some(&d.status), &at(41));
        let d = decide(&p, 0, 3, 3, Some(&d.status), &at(100));
        assert_eq!(d.scale_to, None);
        let d = decide(&p, 0, 3, 3, Some(&d.status), &at(101));
        assert_eq!((d.scale_to, d.direction), (Some(0), Some("down")));
        assert_eq!(d.notes[0].reason, "ScaledDown");
    }

    #[test]
    fn a_model_heads_for_what_its_queue_needs_or_its_set_count() {
        let p = policy(0, 3);
        assert_eq!(p.heading_for(5, None), 3);
        assert_eq!(p.heading_for(1, Some(2)), 2);
        assert_eq!(p.heading_for(0, Some(9)), 3);
        let external = Policy {
            queue_driven: false,
            ..p
        };
        assert_eq!(external.heading_for(5, Some(1)), 1);
        assert_eq!(external.heading_for(5, None), 0);
    }

    #[test]
    fn external_scaling_is_reported_not_acted_on() {
        let mut p = policy(0, 3);
        p.queue_driven = false;
        let d = decide(&p, 6, 0, 0, None, &at(0));
        assert_eq!((d.scale_to, d.status.desired_replicas), (None, 3));
        assert_eq!(recheck_after(&p, &d, &at(0)), None);
    }
}
