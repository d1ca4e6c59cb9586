//! Requests batched into one UNet batch give the images they get alone.

mod common;

use std::sync::atomic::AtomicBool;

use common::fixtures_dir;
use imagegen_engine::pipelines;
use imagegen_engine::styles::StyleBook;
use imagegen_engine::{GenerationParams, Inputs, StableDiffusion};

fn params(json: serde_json::Value) -> GenerationParams {
    serde_json::from_value(json).unwrap()
}

#[test]
fn batched_requests_match_their_single_runs() {
    let model = StableDiffusion::load_dir(
        &fixtures_dir().join("tiny-sd1"),
        "tiny-sd1",
        tch::Device::Cpu,
        tch::Kind::Float,
    )
    .unwrap();
    let styles = StyleBook::builtin();
    let style = styles.list()[0].id.clone();
    let cancel = AtomicBool::new(false);
    for scheduler in ["euler-a", "ddim"] {
        let common =
            serde_json::json!({"width": 64, "height": 48, "steps": 5, "scheduler": scheduler});
        let mut requests = Vec::new();
        for (prompt, extra) in [
            ("a cat", serde_json::json!({"seed": 1})),
            (
                "a dog",
                serde_json::json!({"seed": 9, "count": 2, "negativePrompt": "blurry"}),
            ),
            ("a fox", serde_json::json!({"seed": 4, "style": style})),
        ] {
            let mut body = common.clone();
            body["prompt"] = prompt.into();
            for (k, v) in extra.as_object().unwrap() {
                body[k] = v.clone();
            }
            requests.push(params(body));
        }
        let mut steps = Vec::new();
        let batched = pipelines::generate_batch(
            &model,
            &requests,
            &[],
            &styles,
            &mut |p| steps.push(p.step),
            &cancel,
        )
        .unwrap();
        assert_eq!(steps.len(), 5, "one loop for the whole batch");
        assert_eq!(batched.len(), 3);
        for (request, outcome) in requests.iter().zip(&batched) {
            let alone = pipelines::generate(
                &model,
                request,
                &Inputs::default(),
                &styles,
                &mut |_| {},
                &cancel,
            )
            .unwrap();
            assert_eq!(outcome.images.len(), alone.images.len());
            for (b, a) in outcome.images.iter().zip(&alone.images) {
                assert_eq!(b.metadata, a.metadata);
                assert_eq!(b.index, a.index);
                let (close, worst) = common::compare_u8(b.image.as_raw(), a.image.as_raw());
                assert!(
                    close >= 0.999 && worst <= 3,
                    "{scheduler} {}: {close} within 1/255, worst {worst}",
                    request.prompt
                );
            }
        }
    }
    // Incompatible requests are refused.
    let a = params(serde_json::json!({"prompt": "a", "width": 64, "height": 64, "steps": 2}));
    let b = params(serde_json::json!({"prompt": "b", "width": 64, "height": 64, "steps": 3}));
    let error =
        pipelines::generate_batch(&model, &[a, b], &[], &styles, &mut |_| {}, &cancel).unwrap_err();
    assert!(error.to_string().contains("batch"), "{error}");
}
