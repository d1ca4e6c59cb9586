//! What a request may ask, checked before anything is read or queued: the deployment's
//! limits, job ids, and where webhooks may go.

use imagegen_crds::api::{self, GenerationRequest};

use crate::server::error::ApiError;

/// Checks a request against the limits before anything is read or queued.
pub fn check_limits(
    limits: &crate::server::config::Limits,
    styles: &imagegen_engine::styles::StyleBook,
    webhook_hosts: &[String],
    body: &GenerationRequest,
) -> Result<(), ApiError> {
    let p = &body.params;
    let chars = |s: &str| s.chars().count() as u32;
    if p.prompt.trim().is_empty() && p.mode != Some(imagegen_crds::Mode::RemoveObject) {
        return Err(ApiError::invalid("prompt", "the prompt is empty"));
    }
    if chars(&p.prompt) > limits.max_prompt_chars {
        return Err(ApiError::invalid(
            "prompt",
            format!("longer than {} characters", limits.max_prompt_chars),
        ));
    }
    if p.negative_prompt
        .as_deref()
        .is_some_and(|n| chars(n) > limits.max_prompt_chars)
    {
        return Err(ApiError::invalid(
            "negativePrompt",
            format!("longer than {} characters", limits.max_prompt_chars),
        ));
    }
    if body
        .mask_prompt
        .as_deref()
        .is_some_and(|n| chars(n) > limits.max_prompt_chars || n.trim().is_empty())
    {
        return Err(ApiError::invalid(
            "maskPrompt",
            format!("must have 1 to {} characters", limits.max_prompt_chars),
        ));
    }
    if let Some(steps) = p.steps {
        if steps == 0 || steps > limits.max_steps {
            return Err(ApiError::invalid(
                "steps",
                format!("{steps} is not between 1 and {}", limits.max_steps),
            ));
        }
    }
    if let Some(count) = p.count {
        if count == 0 || count > limits.max_count {
            return Err(ApiError::invalid(
                "count",
                format!("{count} is not between 1 and {}", limits.max_count),
            ));
        }
    }
    for (field, side) in [("width", p.width), ("height", p.height)] {
        if let Some(side) = side {
            if side == 0 || side > limits.max_side || side % 8 != 0 {
                return Err(ApiError::invalid(
                    field,
                    format!(
                        "{side} is not a multiple of 8 between 8 and {}",
                        limits.max_side
                    ),
                ));
            }
        }
    }
    if let (Some(w), Some(h)) = (p.width, p.height) {
        if u64::from(w) * u64::from(h) > limits.max_pixels {
            return Err(ApiError::invalid(
                "width",
                format!("{w}x{h} is more than {} pixels", limits.max_pixels),
            ));
        }
    }
    for (field, value, range) in [
        ("guidanceScale", p.guidance_scale, 0.0..=100.0),
        ("strength", p.strength, 0.0..=1.0),
        ("imageGuidanceScale", p.image_guidance_scale, 0.0..=100.0),
        ("controlScale", p.control_scale, 0.0..=10.0),
    ] {
        if let Some(v) = value {
            if !v.is_finite() || !range.contains(&v) {
                return Err(ApiError::invalid(
                    field,
                    format!("{v} is not between {} and {}", range.start(), range.end()),
                ));
            }
        }
    }
    if let Some(scheduler) = &p.scheduler {
        if !imagegen_crds::generation::SCHEDULERS.contains(&scheduler.as_str()) {
            return Err(ApiError::invalid(
                "scheduler",
                format!(
                    "unknown scheduler `{scheduler}`; valid: {}",
                    imagegen_crds::generation::SCHEDULERS.join(", ")
                ),
            ));
        }
    }
    if let Some(style) = &p.style {
        styles
            .get(style)
            .map_err(|e| ApiError::invalid("style", e.to_string()))?;
    }
    if let Some(id) = &body.job_id {
        check_job_id(id)?;
    }
    check_webhook_url(body.webhook_url.as_deref(), webhook_hosts)?;
    if body.deadline_seconds == Some(0) {
        return Err(ApiError::invalid("deadlineSeconds", "must be at least 1"));
    }
    if body.loras.len() > imagegen_crds::image_generation::MAX_LORAS as usize {
        return Err(ApiError::invalid(
            "loras",
            format!(
                "at most {} LoRAs",
                imagegen_crds::image_generation::MAX_LORAS
            ),
        ));
    }
    Ok(())
}

/// A client's job id: `[a-z0-9-]{1,64}`.
pub fn check_job_id(id: &str) -> Result<(), ApiError> {
    if !api::is_job_id(id) {
        return Err(ApiError::invalid("jobId", "must match [a-z0-9-]{1,64}"));
    }
    Ok(())
}

/// A webhook, when given, must go to a host on the deployment's allow-list.
pub fn check_webhook_url(url: Option<&str>, webhook_hosts: &[String]) -> Result<(), ApiError> {
    match url {
        Some(url) if !crate::server::webhook::allowed(url, webhook_hosts) => {
            Err(ApiError::invalid(
                "webhookUrl",
                "the webhook's host is not on the deployment's allow-list",
            ))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn limits() -> crate::server::config::Limits {
        Default::default()
    }

    #[test]
    fn limits_name_the_field() {
        let styles = imagegen_engine::styles::StyleBook::builtin();
        let check = |json: serde_json::Value| {
            let body: GenerationRequest = serde_json::from_value(json).unwrap();
            check_limits(&limits(), &styles, &[], &body)
                .err()
                .map(|e| e.detail.field)
        };
        assert_eq!(check(serde_json::json!({"prompt": "a"})), None);
        assert_eq!(
            check(serde_json::json!({"prompt": "a", "width": 12})),
            Some(Some("width".into()))
        );
        assert_eq!(
            check(serde_json::json!({"prompt": "a", "strength": 2.0})),
            Some(Some("strength".into()))
        );
    }

    fn json_value() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<u32>().prop_map(serde_json::Value::from),
            (-1e9f64..1e9).prop_map(serde_json::Value::from),
            ".{0,40}".prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(3, 32, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
                proptest::collection::btree_map(
                    prop_oneof![
                        Just("prompt".to_string()),
                        Just("steps".to_string()),
                        Just("width".to_string()),
                        Just("count".to_string()),
                        Just("loras".to_string()),
                        Just("image".to_string()),
                        Just("base64".to_string()),
                        Just("name".to_string()),
                        Just("weight".to_string()),
                        Just("jobId".to_string()),
                        Just("outpaint".to_string()),
                        "[a-zA-Z]{1,8}",
                    ],
                    inner,
                    0..6
                )
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        /// Arbitrary bytes and arbitrary JSON: parsing and checking never panic.
        #[test]
        fn request_json_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512),
                                     value in json_value(),
                                     prompt in ".{0,50}",
                                     steps in any::<u32>(),
                                     width in any::<u32>(),
                                     count in any::<u32>(),
                                     guidance in -1e6f64..1e6) {
            let styles = imagegen_engine::styles::StyleBook::builtin();
            let _ = serde_json::from_slice::<GenerationRequest>(&bytes);
            if let Ok(body) = serde_json::from_value::<GenerationRequest>(value) {
                let _ = check_limits(&limits(), &styles, &[], &body);
            }
            let structured = serde_json::json!({
                "prompt": prompt, "steps": steps, "width": width, "height": width,
                "count": count, "guidanceScale": guidance,
            });
            let body: GenerationRequest = serde_json::from_value(structured).unwrap();
            let verdict = check_limits(&limits(), &styles, &[], &body);
            // What passes is within the engine's limits.
            if verdict.is_ok() {
                prop_assert!((1..=imagegen_crds::generation::MAX_STEPS).contains(&steps));
                prop_assert!((1..=imagegen_crds::generation::MAX_COUNT).contains(&count));
                prop_assert!(width % 8 == 0 && width <= imagegen_crds::generation::MAX_SIDE);
            }
        }
    }
}
