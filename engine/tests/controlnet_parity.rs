//! The ControlNet against diffusers' `ControlNetModel` and `StableDiffusionControlNetPipeline`
//! on the random models that tests/fixtures/extra_controlnet.py saved: residuals within
//! 1e-4, whole generations within 1/255 on at least 99.9% of values.

#[macro_use]
mod common;

use std::path::Path;
use std::sync::atomic::AtomicBool;

use common::{
    assert_close, assert_images_match, compare_u8, fixtures_dir, load_reference, max_abs_diff,
};
use image::RgbImage;
use imagegen_crds::Strategy;
use imagegen_engine::image::canny::canny_edges;
use imagegen_engine::models::controlnet::{ControlNetModel, ControlResiduals};
use imagegen_engine::models::loading::{load_controlnet, load_unet};
use imagegen_engine::models::unet::Conditioning;
use imagegen_engine::pipelines;
use imagegen_engine::{Error, GenerationParams, StableDiffusion};
use tch::{Device, Kind};

const TOL: f64 = 1e-4;

#[derive(serde::Deserialize)]
struct Fixtures {
    dir: String,
    base: String,
    components: String,
    cases: Vec<Case>,
}

#[derive(serde::Deserialize, Clone, Debug)]
struct Case {
    name: String,
    model: String,
    control_image: String,
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
    control_scale: f64,
}

impl Case {
    fn params(&self) -> GenerationParams {
        GenerationParams {
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            width: Some(self.width),
            height: Some(self.height),
            steps: Some(self.steps),
            guidance_scale: Some(self.guidance),
            scheduler: Some(self.scheduler.clone()),
            seed: Some(self.seed),
            count: Some(self.count),
            control_scale: Some(self.control_scale),
            ..Default::default()
        }
    }

    fn control_image(&self) -> RgbImage {
        image::open(fixtures_dir().join(&self.control_image))
            .unwrap()
            .to_rgb8()
    }
}

fn fixtures() -> Fixtures {
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures_dir().join("index.json")).unwrap())
            .unwrap();
    serde_json::from_value(index["controlnet"].clone())
        .expect("index.json has no \"controlnet\" entry: regenerate the fixtures")
}

fn case(name: &str) -> Case {
    fixtures()
        .cases
        .into_iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no controlnet fixture case {name}"))
}

fn model(name: &str) -> StableDiffusion {
    let dir = fixtures_dir().join(name);
    StableDiffusion::load_dir(&dir, name, Device::Cpu, Kind::Float).unwrap()
}

fn controlnet() -> ControlNetModel {
    load_controlnet(
        &fixtures_dir().join(fixtures().dir),
        Device::Cpu,
        Kind::Float,
    )
    .unwrap()
    .model
}

fn no_cancel() -> AtomicBool {
    AtomicBool::new(false)
}

#[test]
fn residuals_match_diffusers() {
    let f = fixtures();
    let reference = load_reference(&fixtures_dir().join(&f.components));
    let controlnet = controlnet();
    let unet = load_unet(
        &fixtures_dir().join(&f.base).join("unet"),
        Device::Cpu,
        Kind::Float,
    )
    .unwrap()
    .model;
    let sample = &reference["sample"];
    let context = &reference["encoder_hidden_states"];
    let timestep = reference["timestep"].double_value(&[]);
    let scale = reference["conditioning_scale"].double_value(&[]);
    let residuals = tch::no_grad(|| {
        controlnet.forward(
            sample,
            timestep,
            context,
            &reference["controlnet_cond"],
            scale,
        )
    });

    assert_eq!(residuals.down.len(), unet.skip_count());
    assert_eq!(controlnet.skip_count(), unet.skip_count());
    for (i, ours) in residuals.down.iter().enumerate() {
        let want = &reference[&format!("down_{i}")];
        eprintln!("down_{i}: max abs diff {:e}", max_abs_diff(ours, want));
        assert_close(&format!("down_{i}"), ours, want, TOL);
    }
    assert!(
        !reference.contains_key(&format!("down_{}", residuals.down.len())),
        "diffusers gives more residuals"
    );
    eprintln!(
        "mid: max abs diff {:e}",
        max_abs_diff(&residuals.mid, &reference["mid"])
    );
    assert_close("mid", &residuals.mid, &reference["mid"], TOL);

    // The UNet with diffusers' own residuals, and with ours.
    let theirs = ControlResiduals {
        down: (0..residuals.down.len())
            .map(|i| reference[&format!("down_{i}")].shallow_clone())
            .collect(),
        mid: reference["mid"].shallow_clone(),
    };
    for (what, control) in [("diffusers'", &theirs), ("our", &residuals)] {
        let out = tch::no_grad(|| {
            unet.forward_with_control(
                sample,
                timestep,
                &Conditioning::text(context.shallow_clone()),
                Some(control),
            )
        });
        eprintln!(
            "UNet with {what} residuals: max abs diff {:e}",
            max_abs_diff(&out, &reference["unet_out"])
        );
        assert_close(
            &format!("UNet with {what} residuals"),
            &out,
            &reference["unet_out"],
            TOL,
        );
    }
    let plain = tch::no_grad(|| {
        unet.forward(
            sample,
            timestep,
            &Conditioning::text(context.shallow_clone()),
        )
    });
    assert!(
        max_abs_diff(&plain, &reference["unet_out"]) > 1e-2,
        "the residuals must change the UNet's output"
    );
}

fn run_case(name: &str) {
    let case = case(name);
    let model = model(&case.model);
    let controlnet = controlnet();
    let mut steps_seen = 0;
    let images = pipelines::controlnet(
        &model,
        &case.params(),
        &controlnet,
        &case.control_image(),
        &mut |p| steps_seen = p.step,
        &no_cancel(),
    )
    .unwrap();
    assert_eq!(steps_seen, case.steps as usize);
    assert_images_match(
        name,
        &images,
        &fixtures_dir().join(&case.file),
        (case.width, case.height),
        case.seed,
    );
}

parity_tests! {
    tiny_controlnet_euler_a => "tiny-controlnet-euler-a",
    tiny_controlnet_dpmpp_2m_count2 => "tiny-controlnet-dpmpp-2m-count2",
}

#[test]
fn every_fixture_case_has_a_test() {
    common::assert_cases_covered(
        "controlnet",
        fixtures().cases.into_iter().map(|c| c.name),
        COVERED,
    );
}

fn text_to_image(model: &StableDiffusion, params: &GenerationParams) -> Vec<RgbImage> {
    pipelines::text_to_image(model, params, &mut |_| {}, &no_cancel())
        .unwrap()
        .into_iter()
        .map(|g| g.image)
        .collect()
}

fn with_control(
    model: &StableDiffusion,
    controlnet: &ControlNetModel,
    params: &GenerationParams,
    control: &RgbImage,
) -> Vec<RgbImage> {
    pipelines::controlnet(
        model,
        params,
        controlnet,
        control,
        &mut |_| {},
        &no_cancel(),
    )
    .unwrap()
    .into_iter()
    .map(|g| g.image)
    .collect()
}

/// The ControlNet does something: the same request without it gives another image.
#[test]
fn control_changes_the_image() {
    let case = case("tiny-controlnet-euler-a");
    let model = model(&case.model);
    let params = case.params();
    let plain = text_to_image(&model, &params);
    let guided = with_control(&model, &controlnet(), &params, &case.control_image());
    let (fraction, worst) = compare_u8(guided[0].as_raw(), plain[0].as_raw());
    eprintln!(
        "with and without the ControlNet: {:.2}% within 1/255, worst {worst}/255",
        fraction * 100.0
    );
    assert!(
        fraction < 0.5 && worst > 10,
        "the ControlNet barely changes the image"
    );
}

/// diffusers multiplies the residuals by the scale: at 0 they vanish exactly.
#[test]
fn control_scale_zero_is_text_to_image() {
    let case = case("tiny-controlnet-dpmpp-2m-count2");
    let model = model(&case.model);
    let params = GenerationParams {
        control_scale: Some(0.0),
        ..case.params()
    };
    let plain = text_to_image(&model, &params);
    let guided = with_control(&model, &controlnet(), &params, &case.control_image());
    assert_eq!(plain.len(), 2);
    assert!(plain == guided, "scale 0 must give text-to-image's images");
}

/// canny_to_image is the ControlNet pipeline on the edges of the (resized) input.
#[test]
fn canny_to_image_uses_the_edges_of_the_input() {
    let case = case("tiny-controlnet-euler-a");
    let model = model(&case.model);
    let controlnet = controlnet();
    // Something with structure for the edge detector: the blurred control image.
    let input = image::imageops::blur(&case.control_image(), 1.0);
    let params = GenerationParams {
        steps: Some(2),
        width: None,
        height: None,
        canny_low: Some(50.0),
        canny_high: Some(120.0),
        strategy: Some(Strategy::Canny),
        ..case.params()
    };
    let out = pipelines::canny_to_image(
        &model,
        &params,
        &controlnet,
        &input,
        &mut |_| {},
        &no_cancel(),
    )
    .unwrap();
    assert_eq!(out[0].image.dimensions(), input.dimensions());
    let edges = canny_edges(&input, 50.0, 120.0).unwrap();
    assert!(edges.pixels().any(|p| p.0 == [255, 255, 255]));
    let direct = with_control(&model, &controlnet, &params, &edges);
    assert!(out[0].image == direct[0]);
}

#[test]
fn bad_requests_name_the_field() {
    let case = case("tiny-controlnet-euler-a");
    let model = model(&case.model);
    let controlnet = controlnet();
    let control = case.control_image();
    let base = GenerationParams {
        steps: Some(2),
        ..case.params()
    };
    let cases: Vec<(&str, GenerationParams)> = vec![
        (
            "canny_low",
            GenerationParams {
                canny_low: Some(-1.0),
                ..base.clone()
            },
        ),
        (
            "canny_high",
            GenerationParams {
                canny_high: Some(300.0),
                ..base.clone()
            },
        ),
        (
            "canny_low",
            GenerationParams {
                canny_low: Some(210.0),
                canny_high: Some(200.0),
                ..base.clone()
            },
        ),
        (
            "control_scale",
            GenerationParams {
                control_scale: Some(f64::NAN),
                ..base.clone()
            },
        ),
        (
            "control_scale",
            GenerationParams {
                control_scale: Some(-0.5),
                ..base.clone()
            },
        ),
        (
            "strategy",
            GenerationParams {
                strategy: Some(Strategy::Sdedit),
                ..base.clone()
            },
        ),
        (
            "width",
            GenerationParams {
                width: Some(60),
                ..base.clone()
            },
        ),
    ];
    for (field, params) in cases {
        let err = pipelines::canny_to_image(
            &model,
            &params,
            &controlnet,
            &control,
            &mut |_| {},
            &no_cancel(),
        )
        .expect_err(field);
        match &err {
            Error::InvalidRequest { field: f, .. } => assert_eq!(*f, field, "{err}"),
            other => panic!("{field}: {other}"),
        }
    }
    let err = pipelines::controlnet(
        &model,
        &GenerationParams {
            control_scale: Some(11.0),
            ..base.clone()
        },
        &controlnet,
        &control,
        &mut |_| {},
        &no_cancel(),
    )
    .expect_err("scale above the maximum");
    assert!(err.to_string().contains("control_scale"), "{err}");
}

/// A ControlNet made for another UNet is refused before anything runs.
#[test]
fn a_controlnet_for_another_unet_is_refused() {
    let model = model("tiny-sd2");
    let err = pipelines::controlnet(
        &model,
        &GenerationParams {
            prompt: "a cat".into(),
            steps: Some(2),
            ..Default::default()
        },
        &controlnet(),
        &RgbImage::new(64, 40),
        &mut |_| {},
        &no_cancel(),
    )
    .expect_err("mismatched ControlNet");
    assert!(
        matches!(
            &err,
            Error::InvalidRequest {
                field: "controlnet",
                ..
            }
        ),
        "{err}"
    );
}

/// A copy of the fixture ControlNet with `edit` applied to its config.
fn edited_controlnet(tag: &str, edit: impl FnOnce(&mut serde_json::Value)) -> std::path::PathBuf {
    let src = fixtures_dir().join(fixtures().dir);
    let dst =
        std::env::temp_dir().join(format!("imagegen-controlnet-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dst).unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(dst.join("config.json"), config.to_string()).unwrap();
    std::fs::copy(
        src.join("diffusion_pytorch_model.safetensors"),
        dst.join("diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    dst
}

fn load_error(dir: &Path) -> String {
    let err = match load_controlnet(dir, Device::Cpu, Kind::Float) {
        Ok(_) => panic!("{} must be refused", dir.display()),
        Err(err) => err,
    };
    std::fs::remove_dir_all(dir).ok();
    assert!(matches!(err, Error::Unsupported { .. }), "{err}");
    err.to_string()
}

#[test]
fn unsupported_configs_are_refused_by_name() {
    let bgr = edited_controlnet("bgr", |c| {
        c["controlnet_conditioning_channel_order"] = "bgr".into()
    });
    let message = load_error(&bgr);
    assert!(message.contains("bgr"), "{message}");

    let pooled = edited_controlnet("pool", |c| c["global_pool_conditions"] = true.into());
    let message = load_error(&pooled);
    assert!(message.contains("global_pool_conditions"), "{message}");

    let unet = edited_controlnet("class", |c| {
        c["_class_name"] = "UNet2DConditionModel".into()
    });
    let message = load_error(&unet);
    assert!(message.contains("ControlNetModel"), "{message}");
}
