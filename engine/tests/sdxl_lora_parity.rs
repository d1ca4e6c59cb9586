//! SDXL LoRAs at inference against diffusers' `load_lora_weights` + `set_adapters`
//! (`tests/fixtures/extra_sdxl_lora.py`): a diffusers/peft file on the UNet and both text
//! encoders, two at once with weights (one with a conv LoRA and non-attention modules), and
//! a kohya file with the original UNet's block names and `lora_te1_`/`lora_te2_`; whole
//! generations within 1/255 on at least 99.9% of values.

#[macro_use]
mod common;

use std::rc::Rc;
use std::sync::atomic::AtomicBool;

use common::{assert_images_match, fixtures_dir};
use imagegen_engine::lora::{Component, Lora};
use imagegen_engine::pipelines;
use imagegen_engine::styles::StyleBook;
use imagegen_engine::{GenerationParams, Inputs, StableDiffusion};
use tch::{Device, Kind};

#[derive(serde::Deserialize, Clone, Debug)]
struct Case {
    name: String,
    model: String,
    file: String,
    loras: Vec<(String, f64)>,
    prompt: String,
    negative_prompt: Option<String>,
    width: u32,
    height: u32,
    steps: u32,
    guidance: f64,
    seed: u64,
    count: u32,
    scheduler: String,
}

fn index() -> serde_json::Value {
    common::fixture_index()["sdxl_lora"].clone()
}

fn cases() -> Vec<Case> {
    serde_json::from_value(index()["cases"].clone()).expect("sdxl_lora cases in index.json")
}

fn model(name: &str) -> StableDiffusion {
    StableDiffusion::load_dir(&fixtures_dir().join(name), name, Device::Cpu, Kind::Float).unwrap()
}

fn load(model: &StableDiffusion, path: &str) -> Lora {
    Lora::load(&fixtures_dir().join(path), model, false)
        .unwrap_or_else(|e| panic!("loading {path}: {e}"))
}

fn run_case(name: &str) {
    let case = cases()
        .into_iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no sdxl_lora fixture case {name}"));
    let model = model(&case.model);
    let loras = case
        .loras
        .iter()
        .map(|(path, weight)| (Rc::new(load(&model, path)), *weight))
        .collect();
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
        ..Default::default()
    };
    let inputs = Inputs {
        loras,
        ..Default::default()
    };
    let images = pipelines::generate(
        &model,
        &params,
        &inputs,
        &StyleBook::builtin(),
        &mut |_| {},
        &AtomicBool::new(false),
    )
    .unwrap_or_else(|e| panic!("{name}: {e}"))
    .images;
    assert_images_match(
        name,
        &images,
        &fixtures_dir().join(&case.file),
        (case.width, case.height),
        case.seed,
    );
}

parity_tests! {
    peft_on_unet_and_both_text_encoders => "sdxl-lora-a",
    two_at_once_with_a_conv_lora => "sdxl-lora-a-b",
    kohya_with_original_block_names => "sdxl-kohya-a",
}

#[test]
fn every_fixture_case_has_a_test() {
    common::assert_cases_covered("sdxl_lora", cases().into_iter().map(|c| c.name), COVERED);
}

/// Each format reaches the same modules: the kohya file's modules are the peft file's.
#[test]
fn both_formats_reach_every_component() {
    let model = model("tiny-sdxl");
    let file = |name: &str| index()["files"][name].as_str().unwrap().to_string();
    let targets = |lora: &Lora| {
        let mut t: Vec<(Component, String)> = lora
            .modules
            .iter()
            .map(|m| (m.component, m.target.clone()))
            .collect();
        t.sort();
        t
    };
    let peft = targets(&load(&model, &file("sdxl-lora-a")));
    let kohya = targets(&load(&model, &file("sdxl-kohya-a")));
    assert_eq!(peft, kohya);
    for component in [
        Component::Unet,
        Component::TextEncoder,
        Component::TextEncoder2,
    ] {
        assert!(
            peft.iter().any(|(c, _)| *c == component),
            "no {component:?} module"
        );
    }
}

/// A refiner has no `text_encoder`: a LoRA for it names those keys in its refusal.
#[test]
fn keys_for_a_missing_text_encoder_are_refused_by_name() {
    let refiner = model("tiny-sdxl-refiner");
    let path = index()["files"]["sdxl-lora-a"]
        .as_str()
        .unwrap()
        .to_string();
    let text_only: Vec<(String, tch::Tensor)> =
        tch::Tensor::read_safetensors(fixtures_dir().join(&path))
            .unwrap()
            .into_iter()
            .filter(|(key, _)| key.starts_with("text_encoder."))
            .collect();
    assert!(!text_only.is_empty());
    let dir = common::temp_dir("sdxl-lora", "text-only");
    let file = dir.join("text-only.safetensors");
    tch::Tensor::write_safetensors(&text_only, &file).unwrap();
    let err = Lora::load(&file, &refiner, false)
        .expect_err("text_encoder keys fit no module of the refiner")
        .to_string();
    assert!(err.contains("text_encoder."), "{err}");
    // The same keys load for the base, which has that encoder.
    assert!(Lora::load(&file, &model("tiny-sdxl"), false).is_ok());
    std::fs::remove_dir_all(&dir).ok();
}

/// The header alone (what the fuzzer drives): every key of the kohya SDXL file is a LoRA
/// tensor of a module spelled as diffusers spells it, and garbage is an error.
#[test]
fn a_kohya_sdxl_header_reads_as_diffusers_modules() {
    let path = index()["files"]["sdxl-kohya-a"]
        .as_str()
        .unwrap()
        .to_string();
    let bytes = std::fs::read(fixtures_dir().join(path)).unwrap();
    let header = imagegen_engine::lora::read_lora_header(&bytes, 2).unwrap();
    assert!(!header.keys.is_empty());
    for (key, layout) in &header.keys {
        let (component, module) = layout
            .as_ref()
            .unwrap_or_else(|| panic!("{key} is not read as a LoRA tensor"));
        if *component == Component::Unet {
            assert!(
                ["down_blocks_", "mid_block_", "up_blocks_"]
                    .iter()
                    .any(|p| module.starts_with(p)),
                "{key} -> {module}"
            );
        }
    }
    assert!(imagegen_engine::lora::read_lora_header(&bytes[..bytes.len() / 2], 2).is_err());
    assert!(
        imagegen_engine::lora::read_lora_header(b"\xff\xff\xff\xff\xff\xff\xff\x7f{", 2).is_err()
    );
}
