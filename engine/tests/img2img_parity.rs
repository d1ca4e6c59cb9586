//! Image-to-image end to end: sdedit equals diffusers' `StableDiffusionImg2ImgPipeline` and
//! instruct equals `StableDiffusionInstructPix2PixPipeline` on the same weights, init image,
//! seeds and scheduler: within 1/255 on at least 99.9% of 8-bit values.

#[macro_use]
mod common;

use std::sync::atomic::AtomicBool;

use common::{fixtures_dir, load_reference, u8_values};
use image::RgbImage;
use imagegen_engine::image::processor::resize_rgb;
use imagegen_engine::pipelines;
use imagegen_engine::pipelines::image_to_image::{default_size, start_step};
use imagegen_engine::{Error, GenerationParams, StableDiffusion, Strategy};
use tch::{Device, Kind, Tensor};

#[derive(serde::Deserialize, Clone, Debug)]
struct Case {
    name: String,
    model: String,
    strategy: String,
    file: String,
    prompt: String,
    negative_prompt: Option<String>,
    width: u32,
    height: u32,
    /// Whether the request names the output size (else it comes from the init image).
    pass_size: bool,
    steps: u32,
    guidance: f64,
    image_guidance: Option<f64>,
    strength: Option<f64>,
    seed: u64,
    count: u32,
    scheduler: String,
    init_image: String,
}

fn cases() -> Vec<Case> {
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures_dir().join("index.json")).unwrap())
            .unwrap();
    serde_json::from_value(index["img2img"]["cases"].clone()).expect("img2img cases in index.json")
}

fn model(name: &str) -> StableDiffusion {
    let dir = fixtures_dir().join(name);
    StableDiffusion::load_dir(&dir, name, Device::Cpu, Kind::Float).unwrap()
}

fn init_image(path: &str) -> RgbImage {
    image::open(fixtures_dir().join(path)).unwrap().to_rgb8()
}

/// How many values differ at all, the fraction within 1/255, and the largest difference in
/// 8-bit steps.
fn compare_u8(ours: &[u8], reference: &[u8]) -> (usize, f64, u8) {
    assert_eq!(ours.len(), reference.len());
    let mut differ = 0usize;
    let mut close = 0usize;
    let mut worst = 0u8;
    for (a, b) in ours.iter().zip(reference) {
        let d = a.abs_diff(*b);
        worst = worst.max(d);
        differ += usize::from(d > 0);
        close += usize::from(d <= 1);
    }
    (differ, close as f64 / ours.len() as f64, worst)
}

fn params(case: &Case) -> GenerationParams {
    GenerationParams {
        prompt: case.prompt.clone(),
        negative_prompt: case.negative_prompt.clone(),
        width: case.pass_size.then_some(case.width),
        height: case.pass_size.then_some(case.height),
        steps: Some(case.steps),
        guidance_scale: Some(case.guidance),
        scheduler: Some(case.scheduler.clone()),
        seed: Some(case.seed),
        count: Some(case.count),
        strategy: Some(match case.strategy.as_str() {
            "sdedit" => Strategy::Sdedit,
            "instruct" => Strategy::Instruct,
            other => panic!("unknown strategy {other}"),
        }),
        strength: case.strength,
        image_guidance_scale: case.image_guidance,
        ..Default::default()
    }
}

fn run_case(name: &str) {
    let case = cases()
        .into_iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no img2img fixture case {name}"));
    let model = model(&case.model);
    let init = init_image(&case.init_image);
    let reference = load_reference(&fixtures_dir().join(&case.file));

    // The pixels diffusers encoded: our resize must give exactly Pillow's.
    let sized = resize_rgb(&init, case.width, case.height);
    assert_eq!(
        sized.as_raw().as_slice(),
        u8_values(&reference["init_u8"]).as_slice(),
        "{name}: resized input differs from Pillow's"
    );

    let mut last = None;
    let images = pipelines::image_to_image(
        &model,
        &params(&case),
        &init,
        &mut |p| last = Some(p),
        &AtomicBool::new(false),
    )
    .unwrap();
    let last = last.expect("progress reported");
    assert_eq!(last.step, last.total, "{name}: progress ends at the total");
    if case.strategy == "sdedit" {
        let start = start_step(case.steps as usize, case.strength.unwrap());
        assert!(
            last.total >= case.steps as usize - start,
            "{name}: {last:?}"
        );
    } else {
        assert!(last.total >= case.steps as usize, "{name}: {last:?}");
    }

    let expected = &reference["images_u8"];
    assert_eq!(
        expected.size(),
        vec![case.count as i64, case.height as i64, case.width as i64, 3]
    );
    assert_eq!(images.len(), case.count as usize);
    for (i, image) in images.iter().enumerate() {
        assert_eq!(
            (image.image.width(), image.image.height()),
            (case.width, case.height)
        );
        assert_eq!(image.metadata.seed, case.seed + i as u64);
        let want = u8_values(&expected.get(i as i64));
        let (differ, fraction, worst) = compare_u8(image.image.as_raw(), &want);
        eprintln!(
            "{name}[{i}]: {:.4}% within 1/255, {differ} of {} values differ, worst {worst}/255",
            fraction * 100.0,
            want.len()
        );
        assert!(
            fraction >= 0.999,
            "{name}[{i}]: only {:.3}% of values within 1/255 of diffusers (worst {worst}/255)",
            fraction * 100.0
        );
        let spread = Tensor::from_slice(&want)
            .to_kind(Kind::Float)
            .std(true)
            .double_value(&[]);
        assert!(spread > 1.0, "{name}: reference image is flat");
    }
}

parity_tests! {
    sd1_ddim => "tiny-sd1-img2img-ddim",
    sd1_pndm => "tiny-sd1-img2img-pndm",
    sd1_euler => "tiny-sd1-img2img-euler",
    sd1_euler_a => "tiny-sd1-img2img-euler-a",
    sd1_dpmpp_2m => "tiny-sd1-img2img-dpmpp-2m",
    sd1_dpmpp_2m_karras => "tiny-sd1-img2img-dpmpp-2m-karras",
    sd1_ddim_s03 => "tiny-sd1-img2img-ddim-s0.3",
    sd1_pndm_s03 => "tiny-sd1-img2img-pndm-s0.3",
    sd1_euler_a_s03 => "tiny-sd1-img2img-euler-a-s0.3",
    sd1_dpmpp_2m_karras_s03 => "tiny-sd1-img2img-dpmpp-2m-karras-s0.3",
    sd1_count2 => "tiny-sd1-img2img-count2",
    sd1_noguidance => "tiny-sd1-img2img-noguidance",
    sd1_pndm_s01 => "tiny-sd1-img2img-pndm-s0.1",
    sd1_resize => "tiny-sd1-img2img-resize",
    sd2_ddim => "tiny-sd2-img2img-ddim",
    sd2_pndm => "tiny-sd2-img2img-pndm",
    sd2_euler => "tiny-sd2-img2img-euler",
    sd2_euler_a => "tiny-sd2-img2img-euler-a",
    sd2_dpmpp_2m_karras => "tiny-sd2-img2img-dpmpp-2m-karras",
    sd2_ddim_s03 => "tiny-sd2-img2img-ddim-s0.3",
    sd2_pndm_s03 => "tiny-sd2-img2img-pndm-s0.3",
    sd2_euler_a_s03 => "tiny-sd2-img2img-euler-a-s0.3",
    sd2_default_size => "tiny-sd2-img2img-default-size",
    pix2pix_euler_a => "tiny-pix2pix-euler-a",
    pix2pix_ddim_count2 => "tiny-pix2pix-ddim-count2",
    pix2pix_pndm_noguidance => "tiny-pix2pix-pndm-noguidance",
}

/// A case added to the fixtures must get a test here.
#[test]
fn every_fixture_case_has_a_test() {
    common::assert_cases_covered("img2img", cases().into_iter().map(|c| c.name), COVERED);
}

fn small_request(strategy: Strategy) -> GenerationParams {
    GenerationParams {
        prompt: "a cat".into(),
        steps: Some(4),
        seed: Some(1),
        strategy: Some(strategy),
        ..Default::default()
    }
}

fn field_of(err: &Error) -> &'static str {
    match err {
        Error::InvalidRequest { field, .. } => field,
        other => panic!("expected an invalid request, got {other}"),
    }
}

#[test]
fn strength_must_be_in_range_and_run_a_step() {
    let model = model("tiny-sd1");
    let init = RgbImage::from_pixel(64, 64, image::Rgb([120, 30, 200]));
    for strength in [-0.1, 1.5, f64::NAN] {
        let params = GenerationParams {
            strength: Some(strength),
            ..small_request(Strategy::Sdedit)
        };
        let err = pipelines::sdedit(&model, &params, &init, &mut |_| {}, &AtomicBool::new(false))
            .expect_err("out of range");
        assert_eq!(field_of(&err), "strength", "{strength}: {err}");
    }
    // 4 steps × 0.2 rounds down to no step: diffusers fails there too (except with PNDM).
    for strength in [0.0, 0.2] {
        let params = GenerationParams {
            strength: Some(strength),
            scheduler: Some("ddim".into()),
            ..small_request(Strategy::Sdedit)
        };
        let err = pipelines::sdedit(&model, &params, &init, &mut |_| {}, &AtomicBool::new(false))
            .expect_err("no step runs");
        assert_eq!(field_of(&err), "strength", "{strength}: {err}");
        assert!(err.to_string().contains("no denoising step"), "{err}");
    }
    // Strength 1 runs every step; 0.25 of 4 runs one.
    for (strength, steps) in [(1.0, 4), (0.25, 1)] {
        let params = GenerationParams {
            strength: Some(strength),
            scheduler: Some("ddim".into()),
            width: Some(32),
            height: Some(32),
            ..small_request(Strategy::Sdedit)
        };
        let mut seen = Vec::new();
        let images = pipelines::sdedit(
            &model,
            &params,
            &init,
            &mut |p| seen.push(p.step),
            &AtomicBool::new(false),
        )
        .unwrap();
        assert_eq!(seen, (1..=steps).collect::<Vec<_>>(), "strength {strength}");
        assert_eq!(images[0].metadata.strength, Some(strength));
        assert_eq!(
            (images[0].image.width(), images[0].image.height()),
            (32, 32)
        );
    }
}

#[test]
fn instruct_refuses_a_four_channel_model() {
    let model = model("tiny-sd1");
    let init = RgbImage::from_pixel(64, 64, image::Rgb([10, 200, 30]));
    let err = pipelines::image_to_image(
        &model,
        &small_request(Strategy::Instruct),
        &init,
        &mut |_| {},
        &AtomicBool::new(false),
    )
    .expect_err("4-channel UNet");
    assert!(
        err.to_string()
            .contains("instruct needs an InstructPix2Pix model"),
        "{err}"
    );
}

#[test]
fn sdedit_and_text_to_image_refuse_an_instruct_model() {
    let model = model("tiny-pix2pix");
    let init = RgbImage::from_pixel(64, 64, image::Rgb([10, 200, 30]));
    let err = pipelines::sdedit(
        &model,
        &small_request(Strategy::Sdedit),
        &init,
        &mut |_| {},
        &AtomicBool::new(false),
    )
    .expect_err("8-channel UNet");
    assert_eq!(field_of(&err), "strategy", "{err}");
    let err = pipelines::text_to_image(
        &model,
        &small_request(Strategy::Sdedit),
        &mut |_| {},
        &AtomicBool::new(false),
    )
    .expect_err("8-channel UNet");
    assert_eq!(field_of(&err), "strategy", "{err}");
}

#[test]
fn bad_image_requests_name_the_field() {
    let model = model("tiny-pix2pix");
    let init = RgbImage::from_pixel(64, 64, image::Rgb([10, 200, 30]));
    let params = GenerationParams {
        image_guidance_scale: Some(f64::INFINITY),
        ..small_request(Strategy::Instruct)
    };
    let err = pipelines::instruct(&model, &params, &init, &mut |_| {}, &AtomicBool::new(false))
        .expect_err("infinite image guidance");
    assert_eq!(field_of(&err), "image_guidance_scale", "{err}");
    // Too small to give a default size.
    let tiny = RgbImage::from_pixel(7, 64, image::Rgb([1, 2, 3]));
    let err = pipelines::instruct(
        &model,
        &small_request(Strategy::Instruct),
        &tiny,
        &mut |_| {},
        &AtomicBool::new(false),
    )
    .expect_err("7 pixels wide");
    assert_eq!(field_of(&err), "width", "{err}");
    let err = pipelines::image_to_image(
        &model,
        &small_request(Strategy::Canny),
        &init,
        &mut |_| {},
        &AtomicBool::new(false),
    )
    .expect_err("canny");
    assert_eq!(field_of(&err), "strategy", "{err}");
}

#[test]
fn sizes_and_start_steps_follow_diffusers() {
    assert_eq!(default_size(&RgbImage::new(70, 45)), (64, 40));
    assert_eq!(default_size(&RgbImage::new(64, 64)), (64, 64));
    // init_timestep = min(int(steps × strength), steps); start = steps − init_timestep.
    assert_eq!(start_step(8, 0.75), 2);
    assert_eq!(start_step(8, 0.3), 6);
    assert_eq!(start_step(10, 1.0), 0);
    assert_eq!(start_step(10, 0.0), 10);
    assert_eq!(start_step(3, 0.7), 1); // 2.0999... → 2
}

#[test]
fn cancel_stops_sdedit_between_steps() {
    let model = model("tiny-sd1");
    let init = RgbImage::from_pixel(32, 32, image::Rgb([120, 30, 200]));
    let cancel = AtomicBool::new(false);
    let params = GenerationParams {
        steps: Some(10),
        strength: Some(1.0),
        ..small_request(Strategy::Sdedit)
    };
    let mut seen = 0;
    let result = pipelines::sdedit(
        &model,
        &params,
        &init,
        &mut |p| {
            seen = p.step;
            if p.step == 2 {
                cancel.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        },
        &cancel,
    );
    assert!(matches!(result, Err(Error::Cancelled)));
    assert_eq!(seen, 2);
}
