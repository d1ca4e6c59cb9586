//! The safety checker against diffusers' `StableDiffusionSafetyChecker` on a tiny random
//! checker, the policies applied to generated images, and the command line.

mod common;

use std::path::PathBuf;

use common::{assert_close, fixtures_dir, load_reference};
use imagegen_runtime::engine::load_safety_checker;
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
