//! End to end: the same prompt, seed and scheduler give the same image as diffusers'
//! `StableDiffusionPipeline` on the same weights: within 1/255 on at least 99.9% of values.

#[macro_use]
mod common;

use std::sync::atomic::AtomicBool;

use common::{assert_images_match, fixtures_dir};
use imagegen_engine::pipelines;
use imagegen_engine::{GenerationParams, StableDiffusion};
use tch::{Device, Kind};

#[derive(serde::Deserialize, Clone, Debug)]
pub struct Case {
    name: String,
    model: String,
    file: String,
    prompt: String,
    negative_prompt: Option<String>,
    width: u32,
    height: u32,
    steps: u32,
    guidance: f64,
    seed: u64,
    count: u32,
    scheduler: String,
    clip_skip: Option<u32>,
}

fn cases() -> Vec<Case> {
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures_dir().join("index.json")).unwrap())
            .unwrap();
    serde_json::from_value(index["pipelines"].clone()).unwrap()
}

/// Loads a fixture model. (Tensors are not `Sync`, so each test loads its own; the tiny
/// models load in milliseconds.)
fn model(name: &str) -> StableDiffusion {
    let dir = fixtures_dir().join(name);
    StableDiffusion::load_dir(&dir, name, Device::Cpu, Kind::Float).unwrap()
}

fn run_case(name: &str) {
    let case = cases()
        .into_iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no fixture case {name}"));
    let model = model(&case.model);
    let params = GenerationParams {
        prompt: case.prompt.clone(),
        negative_prompt: case.negative_prompt.clone(),
        width: Some(case.width),
        height: Some(case.height),
        steps: Some(case.steps),
        guidance_scale: Some(case.guidance),
        scheduler: Some(case.scheduler.clone()),
        seed: Some(case.seed),
        count: Some(case.count),
        clip_skip: case.clip_skip,
        ..Default::default()
    };
    let mut steps_seen = 0;
    let images = pipelines::text_to_image(
        &model,
        &params,
        &mut |p| steps_seen = p.step,
        &AtomicBool::new(false),
    )
    .unwrap();
    assert!(
        steps_seen >= case.steps as usize,
        "progress reported {steps_seen} steps"
    );
    assert_images_match(
        name,
        &images,
        &fixtures_dir().join(&case.file),
        (case.width, case.height),
        case.seed,
    );
}

parity_tests! {
    tiny_sd1_ddim => "tiny-sd1-ddim",
    tiny_sd1_pndm => "tiny-sd1-pndm",
    tiny_sd1_euler => "tiny-sd1-euler",
    tiny_sd1_euler_a => "tiny-sd1-euler-a",
    tiny_sd1_dpmpp_2m => "tiny-sd1-dpmpp-2m",
    tiny_sd1_dpmpp_2m_karras => "tiny-sd1-dpmpp-2m-karras",
    tiny_sd1_count2 => "tiny-sd1-count2",
    tiny_sd1_noguidance => "tiny-sd1-noguidance",
    tiny_sd1_tokenizer_json => "tiny-sd1-tokenizer-json",
    tiny_sd2_ddim => "tiny-sd2-ddim",
    tiny_sd2_pndm => "tiny-sd2-pndm",
    tiny_sd2_euler => "tiny-sd2-euler",
    tiny_sd2_euler_a => "tiny-sd2-euler-a",
    tiny_sd2_dpmpp_2m => "tiny-sd2-dpmpp-2m",
    tiny_sd2_dpmpp_2m_karras => "tiny-sd2-dpmpp-2m-karras",
    tiny_sd2_clipskip => "tiny-sd2-clipskip",
    sd15_shapes_ddim => "sd15-shapes-ddim",
}

/// A case added to the fixtures must get a test here.
#[test]
fn every_fixture_case_has_a_test() {
    common::assert_cases_covered("pipeline", cases().into_iter().map(|c| c.name), COVERED);
}

#[test]
fn cancel_stops_between_steps() {
    let model = model("tiny-sd1");
    let cancel = AtomicBool::new(false);
    let params = GenerationParams {
        prompt: "a cat".into(),
        width: Some(64),
        height: Some(64),
        steps: Some(10),
        seed: Some(1),
        ..Default::default()
    };
    let mut seen = 0;
    let result = pipelines::text_to_image(
        &model,
        &params,
        &mut |p| {
            seen = p.step;
            if p.step == 2 {
                cancel.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        },
        &cancel,
    );
    assert!(
        matches!(result, Err(imagegen_engine::Error::Cancelled)),
        "{:?}",
        result.map(|v| v.len())
    );
    assert_eq!(seen, 2);
}

#[test]
fn bad_requests_name_the_field() {
    let model = model("tiny-sd1");
    let base = GenerationParams {
        prompt: "a cat".into(),
        steps: Some(2),
        ..Default::default()
    };
    let cases: Vec<(&str, GenerationParams)> = vec![
        (
            "width",
            GenerationParams {
                width: Some(63),
                ..base.clone()
            },
        ),
        (
            "height",
            GenerationParams {
                height: Some(0),
                ..base.clone()
            },
        ),
        (
            "steps",
            GenerationParams {
                steps: Some(0),
                ..base.clone()
            },
        ),
        (
            "count",
            GenerationParams {
                count: Some(0),
                ..base.clone()
            },
        ),
        (
            "guidance",
            GenerationParams {
                guidance_scale: Some(f64::NAN),
                ..base.clone()
            },
        ),
        (
            "clip_skip",
            GenerationParams {
                clip_skip: Some(99),
                ..base.clone()
            },
        ),
    ];
    for (field, params) in cases {
        let err = pipelines::text_to_image(&model, &params, &mut |_| {}, &AtomicBool::new(false))
            .expect_err("must fail");
        assert!(err.to_string().contains(field), "{field}: {err}");
    }
    let err = pipelines::text_to_image(
        &model,
        &GenerationParams {
            scheduler: Some("heun".into()),
            ..base
        },
        &mut |_| {},
        &AtomicBool::new(false),
    )
    .expect_err("must fail");
    assert!(
        err.to_string().contains("dpmpp-2m-karras"),
        "lists the valid schedulers: {err}"
    );
}

/// The same seed gives the same image twice, and another seed another image.
#[test]
fn seeds_are_reproducible() {
    let model = model("tiny-sd1");
    let run = |seed| {
        let params = GenerationParams {
            prompt: "a cat".into(),
            width: Some(64),
            height: Some(64),
            steps: Some(3),
            scheduler: Some("euler-a".into()),
            seed: Some(seed),
            ..Default::default()
        };
        pipelines::text_to_image(&model, &params, &mut |_| {}, &AtomicBool::new(false))
            .unwrap()
            .remove(0)
            .image
    };
    assert_eq!(run(5), run(5));
    assert_ne!(run(5), run(6));
}
