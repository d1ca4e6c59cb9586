//! The safety checker against diffusers' `StableDiffusionSafetyChecker` on a tiny random
//! checker, the policies applied to generated images, and the command line.

#[path = "../../engine/tests/common/mod.rs"]
mod common;

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

use common::{assert_close, fixtures_dir, load_reference};
use image::RgbImage;
use imagegen_engine::models::loading::load_safety_checker;
use imagegen_engine::pipelines;
use imagegen_engine::safety::{clip_pixel_values, Safety, SafetyChecker};
use imagegen_engine::styles::StyleBook;
use imagegen_engine::{
    Error, GenerationOutcome, GenerationParams, Inputs, LoadOptions, SafetyPolicy, StableDiffusion,
};
use tch::{Device, Kind, Tensor};

fn safety_index() -> serde_json::Value {
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures_dir().join("index.json")).unwrap())
            .unwrap();
    index["safety"].clone()
}

fn checker_dir() -> PathBuf {
    fixtures_dir().join(safety_index()["model"].as_str().unwrap())
}

fn references() -> std::collections::HashMap<String, Tensor> {
    load_reference(&fixtures_dir().join(safety_index()["file"].as_str().unwrap()))
}

#[test]
fn flags_and_scores_match_diffusers() {
    let checker = load_safety_checker(&checker_dir(), Device::Cpu, Kind::Float).unwrap();
    let refs = references();
    let pixels = &refs["pixel_values"];
    let embeds = checker.model.image_embeds(pixels);
    assert_close("image_embeds", &embeds, &refs["image_embeds"], 1e-4);
    let verdicts = checker.model.check(pixels);
    let flags: Vec<i64> = Vec::try_from(&refs["has_nsfw_concepts"]).unwrap();
    assert_eq!(flags, vec![1, 0, 1], "the fixture flags images 0 and 2");
    for (i, verdict) in verdicts.iter().enumerate() {
        assert_eq!(verdict.has_nsfw_concept, flags[i] == 1, "image {i}");
        let concept = Tensor::from_slice(&verdict.concept_scores);
        let special = Tensor::from_slice(&verdict.special_scores);
        assert_close(
            "concept_scores",
            &concept,
            &refs["concept_scores"].get(i as i64),
            1e-4,
        );
        assert_close(
            "special_scores",
            &special,
            &refs["special_scores"].get(i as i64),
            1e-4,
        );
        eprintln!(
            "image {i}: concept diff {:e}, special diff {:e}",
            common::max_abs_diff(&concept, &refs["concept_scores"].get(i as i64)),
            common::max_abs_diff(&special, &refs["special_scores"].get(i as i64))
        );
    }
    assert_eq!(verdicts[0].bad_concepts.len(), 8);
    assert!(
        verdicts[2].special_care.contains(&1),
        "image 2 is flagged through special care"
    );
    assert_eq!(verdicts[2].bad_concepts, vec![16]);
}

#[test]
fn preprocessing_is_close_to_clip_image_processor() {
    let refs = references();
    let images: Vec<RgbImage> = (0..3)
        .map(|i| {
            let t = &refs[&format!("image_{i}")];
            let (h, w, _) = t.size3().unwrap();
            RgbImage::from_raw(w as u32, h as u32, common::u8_values(t)).unwrap()
        })
        .collect();
    let ours = clip_pixel_values(&images.iter().collect::<Vec<_>>(), 224);
    let reference = &refs["pixel_values"];
    let mean_diff = (&ours - reference)
        .abs()
        .mean(Kind::Double)
        .double_value(&[]);
    eprintln!(
        "pixel_values: mean abs diff {mean_diff:e}, max {:e}",
        common::max_abs_diff(&ours, reference)
    );
    // Bicubic resampling differs from PIL's in the last bits (and, on the noise image,
    // more): the flags must not.
    assert!(mean_diff < 0.05, "mean abs diff {mean_diff}");
    let checker = SafetyChecker::load(&checker_dir(), Device::Cpu, Kind::Float).unwrap();
    let flags: Vec<bool> = checker
        .check(&images.iter().collect::<Vec<_>>())
        .iter()
        .map(|v| v.has_nsfw_concept)
        .collect();
    assert_eq!(flags, vec![true, false, true]);
}

fn tiny_model() -> StableDiffusion {
    StableDiffusion::load_dir(
        &fixtures_dir().join("tiny-sd1"),
        "tiny-sd1",
        Device::Cpu,
        Kind::Float,
    )
    .unwrap()
}

const SEED: u64 = 42;

fn params() -> GenerationParams {
    GenerationParams {
        prompt: "a photo of a cat".into(),
        width: Some(64),
        height: Some(64),
        steps: Some(4),
        scheduler: Some("euler".into()),
        seed: Some(SEED),
        count: Some(3),
        ..Default::default()
    }
}

fn generate(model: &StableDiffusion) -> GenerationOutcome {
    pipelines::generate(
        model,
        &params(),
        &Inputs::default(),
        &StyleBook::builtin(),
        &mut |_| {},
        &AtomicBool::new(false),
    )
    .unwrap()
}

/// The tiny checker with thresholds re-set so that, of `images`, exactly one is flagged
/// (by one concept, with a clear margin), saved as a checker folder. Returns the folder and
/// the flagged index.
fn checker_flagging_one(images: &[&RgbImage], name: &str) -> (PathBuf, usize) {
    let checker = load_safety_checker(&checker_dir(), Device::Cpu, Kind::Float).unwrap();
    let embeds = checker
        .model
        .image_embeds(&clip_pixel_values(images, 224))
        .to_kind(Kind::Double);
    let vars = checker.vars.variables();
    let concepts = vars["concept_embeds"].to_kind(Kind::Double);
    let normalize = |t: &Tensor| t / t.norm_scalaropt_dim(2.0, [1i64].as_slice(), true);
    // [images, concepts]
    let cosine = normalize(&embeds).matmul(&normalize(&concepts).transpose(0, 1));
    let sorted = cosine.sort(0, true).0;
    let gap = sorted.get(0) - sorted.get(1);
    let concept = gap.argmax(0, false).int64_value(&[]);
    let margin = gap.double_value(&[concept]);
    assert!(
        margin > 0.004,
        "no concept separates the images (gap {margin})"
    );
    let flagged = cosine.select(1, concept).argmax(0, false).int64_value(&[]) as usize;
    let threshold = (sorted.double_value(&[0, concept]) + sorted.double_value(&[1, concept])) / 2.0;
    tch::no_grad(|| {
        let mut weights = vars["concept_embeds_weights"].shallow_clone();
        let _ = weights.fill_(2.0);
        let _ = weights.get(concept).fill_(threshold);
        let _ = vars["special_care_embeds_weights"]
            .shallow_clone()
            .fill_(2.0);
    });
    let dir = std::env::temp_dir().join(format!("imagegen-safety-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(checker_dir().join("config.json"), dir.join("config.json")).unwrap();
    checker.vars.save(dir.join("model.safetensors")).unwrap();
    (dir, flagged)
}

#[test]
fn policies_on_generated_images() {
    let mut model = tiny_model();
    // Off (load_dir's default): every image, unchecked.
    let plain = generate(&model);
    assert_eq!(plain.images.len(), 3);
    assert!(plain.withheld.is_empty());
    assert_eq!(
        plain.images.iter().map(|g| g.index).collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
    let images: Vec<&RgbImage> = plain.images.iter().map(|g| &g.image).collect();
    let (dir, flagged) = checker_flagging_one(&images, "policies");
    let checker = || Some(SafetyChecker::load(&dir, Device::Cpu, Kind::Float).unwrap());

    model.safety = Safety::new(SafetyPolicy::Block, checker()).unwrap();
    let blocked = generate(&model);
    assert_eq!(blocked.withheld.len(), 1);
    let withheld = &blocked.withheld[0];
    assert_eq!(withheld.index, flagged);
    assert_eq!(withheld.seed, SEED + flagged as u64);
    assert!(withheld.verdict.has_nsfw_concept);
    assert!(
        withheld.reason.starts_with("flagged as unsafe (concept "),
        "{}",
        withheld.reason
    );
    let kept: Vec<usize> = blocked.images.iter().map(|g| g.index).collect();
    assert_eq!(kept, (0..3).filter(|i| *i != flagged).collect::<Vec<_>>());
    for image in &blocked.images {
        assert_eq!(
            image.image, plain.images[image.index].image,
            "kept images are untouched"
        );
        assert!(image.flagged.is_none());
    }

    model.safety = Safety::new(SafetyPolicy::Blur, checker()).unwrap();
    let blurred = generate(&model);
    assert!(blurred.withheld.is_empty());
    assert_eq!(blurred.images.len(), 3);
    for (ours, original) in blurred.images.iter().zip(&plain.images) {
        if ours.index == flagged {
            assert!(ours.flagged.as_ref().is_some_and(|v| v.has_nsfw_concept));
            assert_ne!(ours.image, original.image, "the flagged image is blurred");
            assert_eq!(ours.image.dimensions(), original.image.dimensions());
        } else {
            assert!(ours.flagged.is_none());
            assert_eq!(ours.image, original.image, "unflagged images are untouched");
        }
    }

    model.safety = Safety::new(SafetyPolicy::Off, checker()).unwrap();
    let off = generate(&model);
    assert_eq!(off.images.len(), 3);
    assert!(off.withheld.is_empty());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_policy_that_checks_fails_to_load_without_a_checker() {
    let mut options = LoadOptions::new(fixtures_dir().join("tiny-sd1").to_str().unwrap());
    let err = StableDiffusion::load(&options)
        .err()
        .expect("block needs a checker");
    assert!(matches!(err, Error::SafetyCheckerMissing { .. }), "{err}");
    assert!(err.to_string().contains("--safety off"), "{err}");
    options.safety = SafetyPolicy::Blur;
    assert!(StableDiffusion::load(&options).is_err());
    options.safety = SafetyPolicy::Off;
    assert!(StableDiffusion::load(&options).is_ok());
    options.safety = SafetyPolicy::Block;
    options.safety_checker = Some(checker_dir().to_str().unwrap().to_string());
    let model = StableDiffusion::load(&options).unwrap();
    assert_eq!(model.safety.policy(), SafetyPolicy::Block);
    assert!(model.safety.checker().is_some());
}

fn run_cli(args: &[&str]) -> (i32, String, String) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_imagegen"))
        .args(args)
        .output()
        .expect("binary runs");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn cli_withholds_flagged_images_and_reports_them() {
    let plain = generate(&tiny_model());
    let images: Vec<&RgbImage> = plain.images.iter().map(|g| &g.image).collect();
    let (checker, flagged) = checker_flagging_one(&images, "cli");
    let model = fixtures_dir().join("tiny-sd1");
    let dir = std::env::temp_dir().join(format!("imagegen-safety-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("img.png");
    let seed = SEED.to_string();
    let common_args = [
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "a photo of a cat",
        "--width",
        "64",
        "--height",
        "64",
        "--steps",
        "4",
        "--scheduler",
        "euler",
        "--seed",
        &seed,
        "--device",
        "cpu",
        "--out",
        out.to_str().unwrap(),
    ];
    let mut args = common_args.to_vec();
    args.extend([
        "--count",
        "3",
        "--safety",
        "block",
        "--safety-checker",
        checker.to_str().unwrap(),
    ]);
    let (code, stdout, stderr) = run_cli(&args);
    assert_eq!(code, 0, "stderr: {stderr}");
    let written: Vec<String> = stdout.lines().map(String::from).collect();
    assert_eq!(written.len(), 2, "{stdout}");
    for i in 0..3 {
        let path = dir.join(format!("img-{i}.png"));
        assert_eq!(path.is_file(), i != flagged, "{}", path.display());
    }
    let line = format!(
        "image {flagged} (seed {}) withheld: flagged as unsafe (concept ",
        SEED + flagged as u64
    );
    assert!(stderr.contains(&line), "stderr: {stderr}");

    // All withheld: nothing written, non-zero exit.
    let only = dir.join("only.png");
    let flagged_seed = (SEED + flagged as u64).to_string();
    let mut args = common_args.to_vec();
    let out_at = args.iter().position(|a| *a == "--out").unwrap() + 1;
    args[out_at] = only.to_str().unwrap();
    let seed_at = args.iter().position(|a| *a == "--seed").unwrap() + 1;
    args[seed_at] = &flagged_seed;
    args.extend(["--safety-checker", checker.to_str().unwrap()]);
    // The flagged image was generated as image `flagged` of a batch of 3; alone with its
    // seed it is the same image (per-image noise).
    let (code, stdout, stderr) = run_cli(&args);
    assert_ne!(code, 0, "stdout: {stdout} stderr: {stderr}");
    assert!(stdout.trim().is_empty());
    assert!(!only.exists());
    assert!(stderr.contains("withheld"), "stderr: {stderr}");
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&checker);
}

#[test]
fn cli_needs_a_checker_unless_the_policy_is_off() {
    let model = fixtures_dir().join("tiny-sd1");
    let dir = std::env::temp_dir().join(format!("imagegen-safety-none-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("x.png");
    let (code, stdout, stderr) = run_cli(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "x",
        "--steps",
        "1",
        "--width",
        "64",
        "--height",
        "64",
        "--device",
        "cpu",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "stdout: {stdout}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    assert!(stderr.contains("needs a safety checker"), "{stderr}");
    assert!(!out.exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn loads_the_hub_layout_of_the_vision_tower() {
    // Checkpoints on the hub nest the tower as `vision_model.vision_model.…`; transformers 5
    // saves `vision_model.…`. Both load to the same model.
    let dir = std::env::temp_dir().join(format!("imagegen-safety-hub-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(checker_dir().join("config.json"), dir.join("config.json")).unwrap();
    let renamed: Vec<(String, Tensor)> =
        Tensor::read_safetensors(checker_dir().join("model.safetensors"))
            .unwrap()
            .into_iter()
            .map(|(name, t)| match name.strip_prefix("vision_model.") {
                Some(rest) if !rest.starts_with("vision_model.") => {
                    (format!("vision_model.vision_model.{rest}"), t)
                }
                _ => (name, t),
            })
            .collect();
    assert!(renamed
        .iter()
        .any(|(n, _)| n.starts_with("vision_model.vision_model.")));
    Tensor::write_safetensors(&renamed, dir.join("model.safetensors")).unwrap();
    let hub = load_safety_checker(&dir, Device::Cpu, Kind::Float).unwrap();
    let refs = references();
    assert_close(
        "image_embeds",
        &hub.model.image_embeds(&refs["pixel_values"]),
        &refs["image_embeds"],
        1e-4,
    );
    let _ = std::fs::remove_dir_all(&dir);
}
