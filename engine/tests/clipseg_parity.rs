//! CLIPSeg against transformers' `CLIPSegForImageSegmentation` on the tiny random model that
//! tests/fixtures/extra_clipseg.py saved: logits within 1e-4 (fp32) for the same inputs.

mod common;

use common::{assert_close, fixtures_dir, load_reference, max_abs_diff};
use imagegen_engine::pipelines::mask_prompt::{load_clipseg, ImageProcessorConfig, MaskOptions};
use tch::{Device, Kind};

const TOL: f64 = 1e-4;

fn model_dir() -> std::path::PathBuf {
    fixtures_dir().join("tiny-clipseg")
}

#[test]
fn logits_match_transformers() {
    let reference = load_reference(&fixtures_dir().join("references/clipseg/logits.safetensors"));
    let finder = load_clipseg(
        model_dir().to_str().unwrap(),
        None,
        Device::Cpu,
        Kind::Float,
    )
    .unwrap();
    for (pixels, logits) in [("pixel_values", "logits"), ("pixel_values_96", "logits_96")] {
        let ours = tch::no_grad(|| {
            finder
                .model
                .logits(&reference[pixels], &reference["input_ids"])
        });
        let spread = reference[logits].std(false).double_value(&[]);
        eprintln!(
            "{logits}: max abs diff {:e} (reference std {spread:.3})",
            max_abs_diff(&ours, &reference[logits])
        );
        assert!(spread > 1e-2, "the reference logits are nearly constant");
        assert_close(logits, &ours, &reference[logits], TOL);
    }
    let (image, text) = tch::no_grad(|| {
        (
            finder.model.image_embeddings(&reference["pixel_values"]),
            finder.model.text_embeddings(&reference["input_ids"]),
        )
    });
    assert_close("image_embeds", &image, &reference["image_embeds"], TOL);
    assert_close("text_embeds", &text, &reference["text_embeds"], TOL);
}

#[test]
fn tokenizer_gives_the_reference_ids() {
    let reference = load_reference(&fixtures_dir().join("references/clipseg/logits.safetensors"));
    let finder = load_clipseg(
        model_dir().to_str().unwrap(),
        None,
        Device::Cpu,
        Kind::Float,
    )
    .unwrap();
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures_dir().join("index.json")).unwrap())
            .unwrap();
    let prompts = index["clipseg"]["prompts"].as_array().unwrap();
    for (i, prompt) in prompts.iter().enumerate() {
        let ids = finder.tokenizer.encode(prompt.as_str().unwrap()).unwrap();
        let expected = Vec::<i64>::try_from(reference["input_ids"].get(i as i64)).unwrap();
        assert_eq!(ids, expected, "{prompt}");
    }
}

#[test]
fn found_mask_has_the_image_size() {
    let finder = load_clipseg(
        model_dir().to_str().unwrap(),
        None,
        Device::Cpu,
        Kind::Float,
    )
    .unwrap();
    let image = image::RgbImage::from_fn(90, 70, |x, y| {
        image::Rgb([(x * 2) as u8, (y * 3) as u8, 128])
    });
    let prompts = vec!["a photo of a cat".to_string(), "a red dog".to_string()];
    let options = imagegen_engine::pipelines::mask_prompt::MaskOptions::default();
    let mask = finder
        .find(&image, &prompts, Some("a red dog"), &options)
        .unwrap();
    assert_eq!(mask.dimensions(), (90, 70));
    let probs = finder.probabilities(&image, &["a photo of a cat"]).unwrap();
    assert_eq!(probs[0].len(), 90 * 70);
    assert!(probs[0].iter().all(|p| (0.0..=1.0).contains(p)));
}

/// Older CLIPSeg configs carry `eos_token_id: 2`, which transformers reads as "pool at the
/// largest id": with the end-of-text token the last of the vocabulary, the same logits.
#[test]
fn legacy_eos_token_id_pools_at_the_largest_id() {
    let reference = load_reference(&fixtures_dir().join("references/clipseg/logits.safetensors"));
    let dir = std::env::temp_dir().join(format!("imagegen-clipseg-eos-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(model_dir()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    let config_path = dir.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["text_config"]["eos_token_id"] = 2.into();
    std::fs::write(&config_path, config.to_string()).unwrap();
    let finder = load_clipseg(dir.to_str().unwrap(), None, Device::Cpu, Kind::Float).unwrap();
    let ours = tch::no_grad(|| {
        finder
            .model
            .logits(&reference["pixel_values"], &reference["input_ids"])
    });
    assert_close("logits (eos_token_id 2)", &ours, &reference["logits"], TOL);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A CLIPSeg folder as current transformers saves it (`CLIPSegProcessor.save_pretrained`:
/// the image processor nested in processor_config.json, the tokenizer as tokenizer.json):
/// the same ids, the same pixel values and the same mask as transformers' processor and model.
#[test]
fn a_folder_saved_by_current_transformers_gives_its_inputs_and_mask() {
    let index = common::fixture_index();
    let clipseg = &index["clipseg"];
    let saved_dir = fixtures_dir().join(clipseg["saved_dir"].as_str().unwrap());
    let files: Vec<&str> = clipseg["saved_files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    eprintln!("saved by transformers: {files:?}");
    let reference = load_reference(&fixtures_dir().join(clipseg["processor"].as_str().unwrap()));
    let finder = load_clipseg(saved_dir.to_str().unwrap(), None, Device::Cpu, Kind::Float).unwrap();

    let prompts: Vec<&str> = clipseg["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    for (i, prompt) in prompts.iter().enumerate() {
        let expected =
            Vec::<i64>::try_from(reference["processed_input_ids"].get(i as i64)).unwrap();
        assert_eq!(
            finder.tokenizer.encode(prompt).unwrap(),
            expected,
            "{prompt}"
        );
    }

    let (height, width) = (64u32, 64u32);
    let raw = Vec::<u8>::try_from(reference["image"].flatten(0, -1)).unwrap();
    let image = image::RgbImage::from_raw(width, height, raw).unwrap();
    let pixels = finder.processor.preprocess(&image);
    assert_close(
        "pixel_values",
        &pixels,
        &reference["processed_pixel_values"],
        1e-5,
    );
    // The defaults (mean and std 0.5) would not pass: the test tells the layouts apart.
    let defaults = ImageProcessorConfig::defaults(64).preprocess(&image);
    assert!(max_abs_diff(&defaults, &reference["processed_pixel_values"]) > 0.1);

    // The mask: probabilities above the threshold, ours against transformers' logits.
    let ours = finder.probabilities(&image, &prompts).unwrap();
    let theirs = reference["processed_logits"].sigmoid();
    let threshold = MaskOptions::default().threshold;
    for (i, prompt) in prompts.iter().enumerate() {
        let theirs = Vec::<f32>::try_from(theirs.get(i as i64).flatten(0, -1)).unwrap();
        let agree = ours[i]
            .iter()
            .zip(&theirs)
            .filter(|(a, b)| (**a > threshold) == (**b > threshold))
            .count();
        let share = agree as f64 / theirs.len() as f64;
        let above = theirs.iter().filter(|p| **p > threshold).count();
        eprintln!(
            "{prompt}: masks agree on {:.2}% ({above} pixels above)",
            share * 100.0
        );
        assert!(share >= 0.999, "{prompt}: masks agree on {share}");
    }
}
