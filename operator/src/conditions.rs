//! metav1 conditions as the API conventions want them: one per type, and a
//! `lastTransitionTime` that moves only when the status does.

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
pub fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
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
}
