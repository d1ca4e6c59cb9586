//! metav1 conditions as the API conventions want them: one per type, and a
//! `lastTransitionTime` that moves only when the status does.

use imagegen_crds::common::condition_types::{COMPLETE, FAILED};
use imagegen_crds::{DiffusionModel, ImageGeneration, LoraTraining, Phase};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// A condition of `type_` with `status` `"True"` or `"False"`, describing `generation`. Its
/// `lastTransitionTime` is a placeholder until [`set_condition`] stores it.
pub fn condition(
    type_: &str,
    status: bool,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
) -> Condition {
    Condition {
        type_: type_.into(),
        status: if status { "True" } else { "False" }.into(),
        reason: reason.into(),
        message: message.into(),
        last_transition_time: Time(Default::default()),
        observed_generation: generation,
    }
}

/// Stores `new` in `conditions`, replacing the condition of the same type. The
/// `lastTransitionTime` is the old one when the status did not change, and `now` otherwise
/// (or when the type is new). Reason, message and observed generation always come from `new`.
pub fn set_condition(conditions: &mut Vec<Condition>, mut new: Condition, now: Time) {
    match conditions.iter_mut().find(|c| c.type_ == new.type_) {
        Some(old) => {
            new.last_transition_time = if old.status == new.status {
                old.last_transition_time.clone()
            } else {
                now
            };
            *old = new;
        }
        None => {
            new.last_transition_time = now;
            conditions.push(new);
        }
    }
}

/// The condition of `type_`, if any.
/// The kinds whose status carries metav1 conditions: read without serializing the object.
pub trait HasConditions {
    /// The status's conditions (none before the first status write).
    fn conditions(&self) -> &[Condition];
}

impl HasConditions for DiffusionModel {
    fn conditions(&self) -> &[Condition] {
        self.status.as_ref().map_or(&[], |s| &s.conditions)
    }
}

impl HasConditions for LoraTraining {
    fn conditions(&self) -> &[Condition] {
        self.status.as_ref().map_or(&[], |s| &s.conditions)
    }
}

impl HasConditions for ImageGeneration {
    fn conditions(&self) -> &[Condition] {
        self.status.as_ref().map_or(&[], |s| &s.conditions)
    }
}

pub fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Whether the condition of `type_` is True, or `None` when there is none.
pub fn is_true(conditions: &[Condition], type_: &str) -> Option<bool> {
    find(conditions, type_).map(|c| c.status == "True")
}

/// Stores the Complete and Failed conditions of a resource in `phase`, both with `reason`:
/// Complete is True once it finished, Failed once it failed. `message` goes with Complete,
/// and with Failed only when it is True.
pub fn set_outcome(
    conditions: &mut Vec<Condition>,
    phase: Phase,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: Time,
) {
    let failed = phase == Phase::Failed;
    set_condition(
        conditions,
        condition(COMPLETE, phase.is_finished(), reason, message, generation),
        now.clone(),
    );
    set_condition(
        conditions,
        condition(
            FAILED,
            failed,
            reason,
            if failed { message } else { "" },
            generation,
        ),
        now,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn at(second: i64) -> Time {
        Time(Timestamp::from_second(second).unwrap())
    }

    #[test]
    fn new_type_is_added_at_now() {
        let mut conditions = Vec::new();
        set_condition(
            &mut conditions,
            condition("Ready", true, "Up", "", Some(1)),
            at(10),
        );
        assert_eq!(conditions.len(), 1);
        assert_eq!(conditions[0].last_transition_time, at(10));
        assert_eq!(conditions[0].status, "True");
    }

    #[test]
    fn unchanged_status_keeps_transition_time() {
        let mut conditions = Vec::new();
        set_condition(
            &mut conditions,
            condition("Ready", true, "A", "", Some(1)),
            at(10),
        );
        set_condition(
            &mut conditions,
            condition("Ready", true, "B", "m", Some(2)),
            at(20),
        );
        assert_eq!(conditions.len(), 1);
        let c = &conditions[0];
        assert_eq!(c.last_transition_time, at(10));
        assert_eq!((c.reason.as_str(), c.message.as_str()), ("B", "m"));
        assert_eq!(c.observed_generation, Some(2));
    }

    #[test]
    fn changed_status_moves_transition_time() {
        let mut conditions = Vec::new();
        set_condition(
            &mut conditions,
            condition("Ready", true, "A", "", None),
            at(10),
        );
        set_condition(
            &mut conditions,
            condition("Other", true, "A", "", None),
            at(15),
        );
        set_condition(
            &mut conditions,
            condition("Ready", false, "B", "", None),
            at(20),
        );
        assert_eq!(conditions.len(), 2);
        let ready = find(&conditions, "Ready").unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.last_transition_time.clone()),
            ("False", at(20))
        );
        assert_eq!(
            find(&conditions, "Other").unwrap().last_transition_time,
            at(15)
        );
    }

    #[test]
    fn outcome_sets_complete_and_failed_per_phase() {
        let state = |conditions: &[Condition], type_| {
            let c = find(conditions, type_).unwrap();
            (c.status.clone(), c.reason.clone(), c.message.clone())
        };
        let s = |status: &str, reason: &str, message: &str| {
            (status.to_string(), reason.to_string(), message.to_string())
        };
        for (phase, complete, failed) in [
            (Phase::Pending, s("False", "R", "m"), s("False", "R", "")),
            (Phase::Running, s("False", "R", "m"), s("False", "R", "")),
            (Phase::Succeeded, s("True", "R", "m"), s("False", "R", "")),
            (Phase::Failed, s("True", "R", "m"), s("True", "R", "m")),
        ] {
            let mut conditions = Vec::new();
            set_outcome(&mut conditions, phase, "R", "m", Some(3), at(10));
            assert_eq!(state(&conditions, COMPLETE), complete, "{phase:?}");
            assert_eq!(state(&conditions, FAILED), failed, "{phase:?}");
            assert_eq!(is_true(&conditions, FAILED), Some(phase == Phase::Failed));
            assert!(conditions.iter().all(|c| c.observed_generation == Some(3)));
        }
        assert_eq!(is_true(&[], COMPLETE), None);
    }
}
