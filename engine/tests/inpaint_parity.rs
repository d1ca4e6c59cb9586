//! Inpainting against diffusers' `StableDiffusionInpaintPipeline` on the same image, mask
//! and weights: within 1/255 on at least 99.9% of values, for a regular 4-channel UNet
//! (blending route) and a dedicated 9-channel inpainting UNet. Also: PIL's Lanczos resize
//! reproduced exactly, the kept area surviving end to end, and request errors.

#[macro_use]
mod common;

use std::sync::atomic::AtomicBool;

use common::{assert_images_match, fixtures_dir, gray, rgb};
use image::{GrayImage, RgbImage};
use imagegen_engine::pipelines;
use imagegen_engine::{
    image::processor as image_processor, noise, GenerationParams, InpaintRoute, StableDiffusion,
};
use tch::{Device, Kind};

#[derive(serde::Deserialize, Clone, Debug)]
struct Case {
    name: String,
    model: String,
    file: String,
    prompt: String,
    negative_prompt: Option<String>,
    width: u32,
    height: u32,
    steps: u32,
    guidance: f64,
    strength: f64,
    seed: u64,
    count: u32,
    scheduler: String,
    image: String,
    mask: String,
}

#[derive(serde::Deserialize, Clone, Debug)]
struct ResizeCheck {
    source: String,
    mode: String,
    width: u32,
    height: u32,
    expected: String,
}

fn index() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures_dir().join("index.json")).unwrap())
        .unwrap()
}

fn cases() -> Vec<Case> {
    serde_json::from_value(index()["inpaint"]["cases"].clone()).expect("inpaint in index.json")
}

fn model(name: &str) -> StableDiffusion {
    let dir = fixtures_dir().join(name);
    StableDiffusion::load_dir(&dir, name, Device::Cpu, Kind::Float).unwrap()
}

fn run_case(name: &str) {
    let case = cases()
        .into_iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no inpaint fixture case {name}"));
    let model = model(&case.model);
    let expected_route = if case.model == "tiny-inpaint" {
        InpaintRoute::Dedicated
    } else {
        InpaintRoute::Blend
    };
    assert_eq!(pipelines::inpaint_route(&model).unwrap(), expected_route);
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
        strength: Some(case.strength),
        ..Default::default()
    };
    let image = rgb(&fixtures_dir().join(&case.image));
    let mask = gray(&fixtures_dir().join(&case.mask));
    let mut steps_seen = 0;
    let images = pipelines::inpaint(
        &model,
        &params,
        &image,
        &mask,
        &mut |p| steps_seen = p.step,
        &AtomicBool::new(false),
    )
    .unwrap();
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
    sd1_ddim => "inpaint-sd1-ddim",
    sd1_pndm => "inpaint-sd1-pndm",
    sd1_euler_a => "inpaint-sd1-euler-a",
    sd1_dpmpp_2m => "inpaint-sd1-dpmpp-2m",
    sd1_euler_a_count2 => "inpaint-sd1-euler-a-count2",
    sd1_resized => "inpaint-sd1-resized",
    sd2_ddim => "inpaint-sd2-ddim",
    dedicated_ddim => "inpaint-9ch-ddim",
    dedicated_pndm => "inpaint-9ch-pndm",
    dedicated_euler_a_count2 => "inpaint-9ch-euler-a-count2",
    dedicated_dpmpp_2m => "inpaint-9ch-dpmpp-2m",
    dedicated_euler => "inpaint-9ch-euler",
}

/// A case added to the fixtures must get a test here.
#[test]
fn every_fixture_case_has_a_test() {
    common::assert_cases_covered("inpaint", cases().into_iter().map(|c| c.name), COVERED);
}

/// The resize diffusers applies to PIL inputs, byte for byte.
#[test]
fn lanczos_resize_matches_pil() {
    let checks: Vec<ResizeCheck> =
        serde_json::from_value(index()["inpaint"]["resize_checks"].clone()).unwrap();
    assert!(!checks.is_empty());
    for check in checks {
        let source = fixtures_dir().join(&check.source);
        let expected = fixtures_dir().join(&check.expected);
        let (ours, want) = match check.mode.as_str() {
            "RGB" => (
                image_processor::resize_rgb(&rgb(&source), check.width, check.height).into_raw(),
                rgb(&expected).into_raw(),
            ),
            "L" => (
                image_processor::resize_gray(&gray(&source), check.width, check.height).into_raw(),
                gray(&expected).into_raw(),
            ),
            mode => panic!("unexpected mode {mode}"),
        };
        let differing = ours.iter().zip(&want).filter(|(a, b)| a != b).count();
        assert_eq!(
            differing, 0,
            "{} -> {}x{}: {differing} values differ from PIL",
            check.source, check.width, check.height
        );
    }
}

fn synthetic_image(width: u32, height: u32) -> RgbImage {
    RgbImage::from_fn(width, height, |x, y| {
        let (fx, fy) = (x as f64, y as f64);
        image::Rgb([
            (40.0 + 180.0 * fx / (width - 1) as f64).round() as u8,
            (30.0 + 160.0 * fy / (height - 1) as f64).round() as u8,
            (128.0 + 90.0 * (fx / 5.0).sin() * (fy / 7.0).cos()).round() as u8,
        ])
    })
}

/// With a regular UNet, pixels far from the mask come back as the input image up to the
/// VAE's own round-trip error (encode with the image's posterior sample, decode) plus a
/// margin: the decoder's receptive field (mid-block attention included) is the whole image,
/// so the repainted latents leak into the kept area. The fixture VAEs have random weights,
/// so their round trip is poor (about 55/255 on average); the sharp half of this test is
/// that an all-black mask gives the round trip exactly.
#[test]
fn kept_area_survives_with_a_regular_unet() {
    const SIZE: u32 = 128;
    const FAR: i64 = 16;
    let (x0, y0, x1, y1) = (48i64, 56i64, 72i64, 80i64);
    // Margins over the round trip's error, in 8-bit steps: on the worst far value and on
    // the mean over far values.
    const MARGIN: f64 = 8.0;
    const MEAN_MARGIN: f64 = 2.0;
    let model = model("tiny-sd1");
    let image = synthetic_image(SIZE, SIZE);
    let mask = GrayImage::from_fn(SIZE, SIZE, |x, y| {
        let inside = (x0..x1).contains(&(x as i64)) && (y0..y1).contains(&(y as i64));
        image::Luma([if inside { 255 } else { 0 }])
    });
    let seed = 11;
    let params = GenerationParams {
        prompt: "a photo of a dog".into(),
        steps: Some(8),
        scheduler: Some("ddim".into()),
        seed: Some(seed),
        ..Default::default()
    };
    let out = pipelines::inpaint(
        &model,
        &params,
        &image,
        &mask,
        &mut |_| {},
        &AtomicBool::new(false),
    )
    .unwrap()
    .remove(0)
    .image;
    assert_eq!(
        out.dimensions(),
        (SIZE, SIZE),
        "defaults to the image's size"
    );

    // The round trip the kept latents went through: the same posterior sample (the first
    // draw of the image's generator), decoded without inpainting.
    let round_trip = tch::no_grad(|| {
        let pixels = image_processor::image_tensor(&image);
        let posterior = model.vae.model.encode(&pixels);
        let latents_size = i64::from(SIZE) / 8;
        let sample = noise::draw_sequence(
            seed,
            &[noise::Draw {
                shape: vec![1, 4, latents_size, latents_size],
                kind: Kind::Float,
            }],
        )
        .remove(0);
        let latents = posterior.sample(&sample) * model.vae.model.config.scaling_factor;
        imagegen_engine::pipelines::text_to_image::to_rgb(&model.decode(&latents).get(0)).unwrap()
    });

    let far = |x: i64, y: i64| {
        let dx = (x0 - x).max(x - (x1 - 1)).max(0);
        let dy = (y0 - y).max(y - (y1 - 1)).max(0);
        dx.max(dy) > FAR
    };
    let (mut rt_worst, mut out_worst, mut leak_worst) = (0u8, 0u8, 0u8);
    let (mut rt_sum, mut out_sum, mut n) = (0f64, 0f64, 0usize);
    for y in 0..SIZE {
        for x in 0..SIZE {
            if !far(x as i64, y as i64) {
                continue;
            }
            for c in 0..3 {
                let input = image.get_pixel(x, y).0[c];
                let rt = round_trip.get_pixel(x, y).0[c];
                let o = out.get_pixel(x, y).0[c];
                rt_worst = rt_worst.max(rt.abs_diff(input));
                out_worst = out_worst.max(o.abs_diff(input));
                leak_worst = leak_worst.max(o.abs_diff(rt));
                rt_sum += f64::from(rt.abs_diff(input));
                out_sum += f64::from(o.abs_diff(input));
                n += 1;
            }
        }
    }
    let (rt_mean, out_mean) = (rt_sum / n as f64, out_sum / n as f64);
    eprintln!(
        "far from the mask ({n} values): VAE round trip vs input: mean {rt_mean:.2}/255, worst \
         {rt_worst}/255; inpainted vs input: mean {out_mean:.2}/255, worst {out_worst}/255; \
         inpainted vs round trip: worst {leak_worst}/255"
    );
    assert!(
        f64::from(out_worst) <= f64::from(rt_worst) + MARGIN,
        "far pixels differ from the input by up to {out_worst}/255, the VAE round trip by \
         {rt_worst}/255"
    );
    assert!(
        out_mean <= rt_mean + MEAN_MARGIN,
        "far pixels: mean error {out_mean:.2}/255 vs the round trip's {rt_mean:.2}/255"
    );
    // With nothing to repaint, the kept latents are the image's own: the output is exactly
    // the VAE round trip.
    let untouched = pipelines::inpaint(
        &model,
        &params,
        &image,
        &GrayImage::new(SIZE, SIZE),
        &mut |_| {},
        &AtomicBool::new(false),
    )
    .unwrap()
    .remove(0)
    .image;
    assert!(
        untouched == round_trip,
        "an all-black mask must give the VAE round trip"
    );
    // And the repainted area did change.
    let changed = (y0..y1)
        .flat_map(|y| (x0..x1).map(move |x| (x as u32, y as u32)))
        .filter(|&(x, y)| out.get_pixel(x, y) != round_trip.get_pixel(x, y))
        .count();
    assert!(changed > 0, "the masked area was not repainted");
}

#[test]
fn mask_of_another_size_is_refused() {
    let model = model("tiny-sd1");
    let params = GenerationParams {
        prompt: "a cat".into(),
        steps: Some(2),
        ..Default::default()
    };
    let err = pipelines::inpaint(
        &model,
        &params,
        &synthetic_image(64, 64),
        &GrayImage::new(64, 32),
        &mut |_| {},
        &AtomicBool::new(false),
    )
    .expect_err("must fail");
    assert!(
        matches!(
            err,
            imagegen_engine::Error::InvalidRequest { field: "mask", .. }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("64x32"), "{err}");
}

#[test]
fn bad_strength_is_refused() {
    let model = model("tiny-sd1");
    for (strength, steps) in [(1.5, 4), (-0.1, 4), (f64::NAN, 4), (0.1, 4)] {
        let params = GenerationParams {
            prompt: "a cat".into(),
            steps: Some(steps),
            strength: Some(strength),
            ..Default::default()
        };
        let err = pipelines::inpaint(
            &model,
            &params,
            &synthetic_image(64, 64),
            &GrayImage::new(64, 64),
            &mut |_| {},
            &AtomicBool::new(false),
        )
        .expect_err("must fail");
        assert!(err.to_string().contains("strength"), "{strength}: {err}");
    }
}

#[test]
fn size_defaults_to_the_image_rounded_down_to_8() {
    let model = model("tiny-inpaint");
    let params = GenerationParams {
        prompt: "a cat".into(),
        steps: Some(1),
        guidance_scale: Some(1.0),
        seed: Some(1),
        ..Default::default()
    };
    let out = pipelines::inpaint(
        &model,
        &params,
        &synthetic_image(70, 45),
        &GrayImage::from_pixel(70, 45, image::Luma([255])),
        &mut |_| {},
        &AtomicBool::new(false),
    )
    .unwrap();
    assert_eq!(out[0].image.dimensions(), (64, 40));
}
