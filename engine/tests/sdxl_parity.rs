//! SDXL against diffusers on tiny random SDXL-shaped models (`tests/fixtures/extra_sdxl.py`):
//! the two text encoders (penultimate hidden states, clip skip, the projected pooled output
//! at the end token), the UNet's `text_time` added conditioning, and whole generations with
//! `StableDiffusionXLPipeline`, `StableDiffusionXLImg2ImgPipeline` (the base, and the
//! refiner's aesthetic-score conditioning), `StableDiffusionXLInpaintPipeline` (mask
//! blending and a 9-channel UNet) and the base-to-refiner hand-off in latents: within 1/255
//! on at least 99.9% of values.

#[macro_use]
mod common;

use std::sync::atomic::AtomicBool;

use common::{assert_close, assert_images_match, fixtures_dir, gray, load_reference, rgb};
use image::RgbImage;
use imagegen_engine::models::unet::{AddedConditioning, Conditioning};
use imagegen_engine::{pipelines, Family, GenerationParams, InpaintRoute, StableDiffusion};
use tch::{Device, Kind, Tensor};

#[derive(serde::Deserialize, Clone, Debug)]
struct Case {
    name: String,
    kind: String,
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
    strength: Option<f64>,
    image: Option<String>,
    mask: Option<String>,
    refiner: Option<String>,
    high_noise_fraction: Option<f64>,
}

fn sdxl_index() -> serde_json::Value {
    common::fixture_index()["sdxl"].clone()
}

fn cases() -> Vec<Case> {
    serde_json::from_value(sdxl_index()["cases"].clone()).expect("sdxl cases in index.json")
}

fn model(name: &str) -> StableDiffusion {
    StableDiffusion::load_dir(&fixtures_dir().join(name), name, Device::Cpu, Kind::Float)
        .unwrap_or_else(|e| panic!("loading {name}: {e}"))
}

fn params(case: &Case) -> GenerationParams {
    GenerationParams {
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
        strength: case.strength,
        high_noise_fraction: case.high_noise_fraction,
        ..Default::default()
    }
}

fn run_case(name: &str) {
    let case = cases()
        .into_iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no sdxl fixture case {name}"));
    let model = model(&case.model);
    assert_eq!(model.family(), Family::Sdxl);
    let params = params(&case);
    let cancel = AtomicBool::new(false);
    let mut steps_seen = 0;
    let mut progress = |p: pipelines::Progress| steps_seen = p.step;
    let file = |key: &Option<String>| fixtures_dir().join(key.as_ref().expect("case input"));
    let images = match case.kind.as_str() {
        "text" => pipelines::text_to_image(&model, &params, &mut progress, &cancel),
        "img2img" => {
            let init = rgb(&file(&case.image));
            pipelines::sdedit(&model, &params, &init, &mut progress, &cancel)
        }
        "inpaint" => {
            let route = pipelines::inpaint_route(&model).unwrap();
            let expected = if case.model.ends_with("inpaint") {
                InpaintRoute::Dedicated
            } else {
                InpaintRoute::Blend
            };
            assert_eq!(route, expected);
            let (image, mask) = (rgb(&file(&case.image)), gray(&file(&case.mask)));
            pipelines::inpaint(&model, &params, &image, &mask, &mut progress, &cancel)
        }
        "base+refiner" => {
            let refiner = self::model(case.refiner.as_ref().expect("a refiner"));
            pipelines::text_to_image_refined(&model, &refiner, &params, &mut progress, &cancel)
        }
        other => panic!("unknown case kind {other}"),
    }
    .unwrap_or_else(|e| panic!("{name}: {e}"));
    assert!(steps_seen >= 1, "progress was never reported");
    assert_images_match(
        name,
        &images,
        &fixtures_dir().join(&case.file),
        (case.width, case.height),
        case.seed,
    );
}

parity_tests! {
    euler => "sdxl-euler",
    euler_a => "sdxl-euler-a",
    ddim => "sdxl-ddim",
    dpmpp_2m_karras => "sdxl-dpmpp-2m-karras",
    no_negative_is_zeros => "sdxl-no-negative",
    empty_negative_is_encoded => "sdxl-empty-negative",
    count2 => "sdxl-count2",
    no_guidance => "sdxl-noguidance",
    clip_skip1 => "sdxl-clip-skip1",
    wide => "sdxl-wide",
    img2img => "sdxl-img2img",
    refiner_img2img => "sdxl-refiner-img2img",
    inpaint_blend => "sdxl-inpaint-blend",
    inpaint_blend_strength => "sdxl-inpaint-blend-s0.75",
    inpaint_dedicated => "sdxl-inpaint-9ch",
    base_then_refiner => "sdxl-base-refiner",
    base_then_refiner_ddim_count2 => "sdxl-base-refiner-ddim",
    real_shapes => "sdxl-shapes-euler",
}

/// A case added to the fixtures must get a test here.
#[test]
fn every_fixture_case_has_a_test() {
    common::assert_cases_covered("sdxl", cases().into_iter().map(|c| c.name), COVERED);
}

fn components() -> std::collections::HashMap<String, Tensor> {
    let file = sdxl_index()["components"]
        .as_str()
        .expect("components in index.json")
        .to_string();
    load_reference(&fixtures_dir().join(file))
}

/// Each encoder's penultimate (and with clip skip 1, the one before) hidden states as they
/// are, and the projected pooled output: at the highest id for the base's second encoder
/// (`eos_token_id` 2, as SDXL's config has it), at the first end token for the refiner's.
#[test]
fn text_encoders_match_transformers() {
    let refs = components();
    let base = model("tiny-sdxl");
    let refiner = model("tiny-sdxl-refiner");
    let encoders = [
        ("te1", base.text_encoder_named("text_encoder")),
        ("te2", base.text_encoder_named("text_encoder_2")),
        ("refiner_te2", refiner.text_encoder_named("text_encoder_2")),
    ];
    assert!(refiner.text_encoder_named("text_encoder").is_none());
    for (name, encoder) in encoders {
        let encoder = encoder.unwrap_or_else(|| panic!("{name} loaded"));
        let texts = ["a photo of a cat", ""];
        let ids = encoder.token_ids(&texts, Device::Cpu).unwrap();
        assert!(
            ids.equal(&refs[&format!("{name}_input_ids")]),
            "{name}: token ids"
        );
        for (skip, key) in [(0, "penultimate"), (1, "skip1")] {
            let out = tch::no_grad(|| encoder.model.encode_hidden(&ids, skip));
            assert_close(
                &format!("{name} {key}"),
                &out.hidden,
                &refs[&format!("{name}_{key}")],
                1e-5,
            );
            match refs.get(&format!("{name}_pooled")) {
                Some(pooled) => assert_close(
                    &format!("{name} pooled"),
                    out.pooled.as_ref().expect("a projection"),
                    pooled,
                    1e-5,
                ),
                None => assert!(out.pooled.is_none(), "{name} has no projection"),
            }
        }
    }
}

#[test]
fn unet_added_conditioning_matches_diffusers() {
    let refs = components();
    let base = model("tiny-sdxl");
    let cond = Conditioning {
        context: refs["unet_context"].shallow_clone(),
        added: Some(AddedConditioning {
            text_embeds: refs["unet_text_embeds"].shallow_clone(),
            time_ids: refs["unet_time_ids"].shallow_clone(),
        }),
    };
    let out = tch::no_grad(|| base.unet.model.forward(&refs["unet_sample"], 421.0, &cond));
    assert_close("unet with time ids", &out, &refs["unet_out"], 1e-4);
    // The time ids do change the output: a UNet that dropped them could not pass above.
    let other = Conditioning {
        added: cond.added.as_ref().map(|a| AddedConditioning {
            text_embeds: a.text_embeds.shallow_clone(),
            time_ids: a.time_ids.zeros_like(),
        }),
        context: cond.context.shallow_clone(),
    };
    let changed = tch::no_grad(|| base.unet.model.forward(&refs["unet_sample"], 421.0, &other));
    assert!(common::max_abs_diff(&changed, &out) > 1e-3);
}

#[test]
fn the_pipeline_settings_come_from_model_index() {
    let base = model("tiny-sdxl");
    assert!(base.index.force_zeros_for_empty_prompt);
    assert!(!base.index.requires_aesthetics_score);
    assert_eq!(base.text_encoders.len(), 2);
    assert_eq!(base.native_size(), 64);
    let refiner = model("tiny-sdxl-refiner");
    assert!(!refiner.index.force_zeros_for_empty_prompt);
    assert!(refiner.index.requires_aesthetics_score);
    assert_eq!(refiner.text_encoders.len(), 1);
}

/// A refiner folder whose model_index.json drops `requires_aesthetics_score` no longer fits
/// its UNet's added embedding: refused at load with the numbers, not a shape error later.
#[test]
fn time_ids_that_do_not_fit_the_unet_are_refused_at_load() {
    let src = fixtures_dir().join("tiny-sdxl-refiner");
    let dir = common::temp_dir("sdxl-refiner-index", "model");
    for entry in std::fs::read_dir(&src).unwrap() {
        let entry = entry.unwrap();
        let to = dir.join(entry.file_name());
        if entry.file_name() == "model_index.json" {
            let text = std::fs::read_to_string(entry.path()).unwrap();
            std::fs::write(
                &to,
                text.replace(
                    "\"requires_aesthetics_score\": true",
                    "\"requires_aesthetics_score\": false",
                ),
            )
            .unwrap();
        } else {
            std::os::unix::fs::symlink(entry.path(), &to).unwrap();
        }
    }
    let err = match StableDiffusion::load_dir(&dir, "broken", Device::Cpu, Kind::Float) {
        Ok(_) => panic!("loaded a refiner whose time ids do not fit"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("requires_aesthetics_score"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn sd_only_pipelines_refuse_sdxl_clearly() {
    let base = model("tiny-sdxl");
    let image = RgbImage::new(64, 64);
    let err = pipelines::instruct(
        &base,
        &GenerationParams {
            prompt: "x".into(),
            steps: Some(1),
            ..Default::default()
        },
        &image,
        &mut |_| {},
        &AtomicBool::new(false),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("sdxl"), "{err}");
}

#[test]
fn high_noise_fraction_outside_the_schedule_is_refused() {
    let base = model("tiny-sdxl");
    let refiner = model("tiny-sdxl-refiner");
    for fraction in [0.0, 1.0, -0.5, f64::NAN] {
        let params = GenerationParams {
            prompt: "x".into(),
            steps: Some(2),
            high_noise_fraction: Some(fraction),
            ..Default::default()
        };
        let err = pipelines::text_to_image_refined(
            &base,
            &refiner,
            &params,
            &mut |_| {},
            &AtomicBool::new(false),
        )
        .err()
        .unwrap_or_else(|| panic!("{fraction} was accepted"));
        assert!(err.to_string().contains("high_noise_fraction"), "{err}");
    }
}

/// SDXL's VAE overflows in half precision: with `force_upcast` it runs in float32 while the
/// rest of the model runs in float16, and a half-precision generation gives a real image.
#[test]
fn half_precision_upcasts_the_vae() {
    let dir = fixtures_dir().join("tiny-sdxl");
    let model = StableDiffusion::load_dir(&dir, "tiny-sdxl", Device::Cpu, Kind::Half).unwrap();
    assert_eq!((model.dtype, model.vae_dtype), (Kind::Half, Kind::Float));
    let images = pipelines::text_to_image(
        &model,
        &GenerationParams {
            prompt: "a photo of a cat".into(),
            steps: Some(2),
            seed: Some(3),
            ..Default::default()
        },
        &mut |_| {},
        &AtomicBool::new(false),
    )
    .unwrap();
    let pixels = images[0].image.as_raw();
    let (lo, hi) = (pixels.iter().min().unwrap(), pixels.iter().max().unwrap());
    assert!(hi - lo > 16, "a flat image ({lo}..{hi}): NaN or overflow");
}

/// What `generate` adds on top of the pipelines works for SDXL as for SD: a style, the
/// safety checker, inpainting only the masked region, and outpainting.
#[test]
fn generate_applies_styles_safety_only_masked_and_outpainting() {
    use imagegen_crds::{Mode, Outpaint};
    use imagegen_engine::safety::{Safety, SafetyChecker, SafetyPolicy};
    use imagegen_engine::styles::StyleBook;
    use imagegen_engine::{GenerationOutcome, Inputs};

    let run = |model: &StableDiffusion, params: GenerationParams, inputs: Inputs| {
        pipelines::generate(
            model,
            &params,
            &inputs,
            &StyleBook::builtin(),
            &mut |_| {},
            &AtomicBool::new(false),
        )
        .unwrap_or_else(|e| panic!("{e}"))
    };
    let base = GenerationParams {
        prompt: "a photo of a cat".into(),
        steps: Some(2),
        seed: Some(5),
        count: Some(2),
        ..Default::default()
    };

    let mut model = model("tiny-sdxl");
    let checker_dir = fixtures_dir().join(
        common::fixture_index()["safety"]["model"]
            .as_str()
            .expect("the safety fixture"),
    );
    let checker = SafetyChecker::load(&checker_dir, Device::Cpu, Kind::Float).unwrap();
    model.safety = Safety::new(SafetyPolicy::Block, Some(checker)).unwrap();
    let styled = run(
        &model,
        GenerationParams {
            style: Some("portrait".into()),
            ..base.clone()
        },
        Inputs::default(),
    );
    // The checker saw every image: each is delivered or withheld with its reason.
    assert_eq!(styled.images.len() + styled.withheld.len(), 2);
    for image in &styled.images {
        assert_ne!(
            image.metadata.prompt, "a photo of a cat",
            "the style's prompt"
        );
    }

    // The product behaviour around inpainting, with the checker off so that every image
    // is delivered.
    model.safety = Safety::off();
    let photo = rgb(&fixtures_dir().join("references/sdxl/inpaint-image.png"));
    let mask = gray(&fixtures_dir().join("references/sdxl/inpaint-mask.png"));
    let only_one = |outcome: GenerationOutcome| {
        assert_eq!(outcome.images.len(), 1);
        outcome.images.into_iter().next().unwrap().image
    };
    let only_masked = only_one(run(
        &model,
        GenerationParams {
            mode: Some(Mode::Inpaint),
            only_masked: Some(true),
            only_masked_padding: Some(8),
            count: Some(1),
            ..base.clone()
        },
        Inputs {
            image: Some(image::DynamicImage::ImageRgb8(photo.clone())),
            mask: Some(mask),
            ..Default::default()
        },
    ));
    assert_eq!(only_masked.dimensions(), photo.dimensions());
    // Far from the mask (its box is 20..44 × 16..40): the input's exact pixels.
    assert_eq!(only_masked.get_pixel(2, 60), photo.get_pixel(2, 60));
    assert_ne!(only_masked.get_pixel(32, 28), photo.get_pixel(32, 28));

    let outpainted = only_one(run(
        &model,
        GenerationParams {
            mode: Some(Mode::Outpaint),
            outpaint: Some(Outpaint {
                left: 16,
                right: 0,
                top: 0,
                bottom: 8,
            }),
            count: Some(1),
            ..base
        },
        Inputs {
            image: Some(image::DynamicImage::ImageRgb8(photo.clone())),
            ..Default::default()
        },
    ));
    assert_eq!(outpainted.dimensions(), (80, 72));
    assert_eq!(outpainted.get_pixel(16 + 40, 30), photo.get_pixel(40, 30));
}
