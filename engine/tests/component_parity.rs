//! Each component of our engine against the same component in diffusers/transformers, on
//! the random models that tests/fixtures/make_fixtures.py saved: max abs diff ≤ 1e-4 (fp32).

mod common;

use std::path::{Path, PathBuf};

use common::{assert_close, fixtures_dir, load_reference};
use imagegen_engine::models::loading::{load_text_encoder, load_unet, load_vae};
use imagegen_engine::models::unet::Conditioning;
use imagegen_engine::tokenizer::ClipTokenizer;
use imagegen_engine::{noise, Error};
use tch::{Device, Kind, Tensor};

const TOL: f64 = 1e-4;

#[derive(serde::Deserialize)]
struct Index {
    models: Vec<ModelEntry>,
}

#[derive(serde::Deserialize)]
struct ModelEntry {
    name: String,
    dir: String,
}

fn model_dirs() -> Vec<(String, PathBuf)> {
    let root = fixtures_dir();
    let index: Index =
        serde_json::from_str(&std::fs::read_to_string(root.join("index.json")).unwrap()).unwrap();
    index
        .models
        .into_iter()
        .filter(|m| root.join("references").join(&m.name).is_dir())
        .map(|m| (m.name, root.join(m.dir)))
        .collect()
}

fn reference(model: &str, component: &str) -> std::collections::HashMap<String, Tensor> {
    load_reference(
        &fixtures_dir()
            .join("references")
            .join(model)
            .join(format!("{component}.safetensors")),
    )
}

#[test]
fn every_fixture_model_is_covered() {
    let names: Vec<String> = model_dirs().into_iter().map(|(n, _)| n).collect();
    for required in ["tiny-sd1", "tiny-sd2"] {
        assert!(
            names.iter().any(|n| n == required),
            "fixture {required} missing: {names:?}"
        );
    }
}

#[test]
fn tokenizer_matches_transformers() {
    for (name, dir) in model_dirs() {
        let tokenizer = ClipTokenizer::from_dir(&dir.join("tokenizer"), 77).unwrap();
        let path = fixtures_dir()
            .join("references")
            .join(&name)
            .join("tokenizer.json");
        let cases: Vec<serde_json::Value> =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        assert!(cases.len() >= 5);
        for case in cases {
            let text = case["text"].as_str().unwrap();
            let expected: Vec<i64> = serde_json::from_value(case["ids"].clone()).unwrap();
            assert_eq!(
                tokenizer.encode(text).unwrap(),
                expected,
                "{name}: {text:?}"
            );
        }
    }
}

/// The fixtures hold a tokenizer folder in each layout a user may bring, and the one that the
/// installed transformers saves is among them: `tokenizer_matches_transformers` covers all.
#[test]
fn fixtures_hold_every_tokenizer_layout() {
    let index = common::fixture_index();
    let mut layouts = std::collections::BTreeSet::new();
    for model in index["models"].as_array().unwrap() {
        let dir = fixtures_dir()
            .join(model["dir"].as_str().unwrap())
            .join("tokenizer");
        let has_json = dir.join("tokenizer.json").is_file();
        let has_files = dir.join("vocab.json").is_file() && dir.join("merges.txt").is_file();
        let layout = match (has_json, has_files) {
            (true, true) => "both",
            (true, false) => "tokenizer.json",
            (false, true) => "vocab.json+merges.txt",
            (false, false) => panic!("{}: no tokenizer", dir.display()),
        };
        assert_eq!(model["tokenizer_layout"], layout, "{}", dir.display());
        layouts.insert(layout);
    }
    if !index["generator"]["skip_large"].as_bool().unwrap_or(false) {
        assert_eq!(layouts.len(), 3, "{layouts:?}");
    }
    // tiny-sd2 is kept as transformers saved it; since 5.24 that is tokenizer.json alone.
    let tiny_sd2 = index["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "tiny-sd2")
        .unwrap();
    let version = index["generator"]["transformers"].as_str().unwrap();
    let minor: u32 = version.split('.').nth(1).unwrap().parse().unwrap();
    if version.starts_with("5.") && minor >= 24 {
        assert_eq!(tiny_sd2["tokenizer_layout"], "tokenizer.json");
    }
}

#[test]
fn text_encoder_matches_transformers() {
    for (name, dir) in model_dirs() {
        let r = reference(&name, "text_encoder");
        let encoder =
            load_text_encoder(&dir.join("text_encoder"), Device::Cpu, Kind::Float).unwrap();
        let ids = &r["input_ids"];
        let (last, penultimate) =
            tch::no_grad(|| (encoder.model.forward(ids, 0), encoder.model.forward(ids, 1)));
        assert_close(
            &format!("{name} last_hidden_state"),
            &last,
            &r["last_hidden_state"],
            TOL,
        );
        assert_close(
            &format!("{name} clip-skip 1"),
            &penultimate,
            &r["penultimate"],
            TOL,
        );
    }
}

#[test]
fn unet_matches_diffusers() {
    for (name, dir) in model_dirs() {
        let r = reference(&name, "unet");
        let unet = load_unet(&dir.join("unet"), Device::Cpu, Kind::Float).unwrap();
        let timestep = r["timestep"].double_value(&[]);
        let out = tch::no_grad(|| {
            unet.model.forward(
                &r["sample"],
                timestep,
                &Conditioning::text(r["encoder_hidden_states"].shallow_clone()),
            )
        });
        assert_close(&format!("{name} unet"), &out, &r["out"], TOL);
    }
}

#[test]
fn vae_matches_diffusers() {
    for (name, dir) in model_dirs() {
        let r = reference(&name, "vae");
        let vae = load_vae(&dir.join("vae"), Device::Cpu, Kind::Float).unwrap();
        tch::no_grad(|| {
            let dist = vae.model.encode(&r["image"]);
            assert_close(&format!("{name} vae mean"), &dist.mean, &r["mean"], TOL);
            assert_close(
                &format!("{name} vae logvar"),
                &dist.logvar,
                &r["logvar"],
                TOL,
            );
            assert_close(&format!("{name} vae std"), &dist.std, &r["std"], TOL);
            // latent_dist.sample(generator=torch.Generator("cpu").manual_seed(7))
            let noise = noise::with_seed(7, || {
                Tensor::randn(dist.mean.size(), (Kind::Float, Device::Cpu))
            });
            assert_close(
                &format!("{name} vae sample"),
                &dist.sample(&noise),
                &r["latent_sample"],
                TOL,
            );
            let decoded = vae.model.decode(&r["latents"]);
            assert_close(&format!("{name} vae decode"), &decoded, &r["decoded"], TOL);
        });
    }
}

/// The fp16 variant files load, and hold the fp32 weights rounded to half precision.
#[test]
fn fp16_variant_holds_the_rounded_weights() {
    let root = fixtures_dir();
    let full = load_unet(&root.join("tiny-sd1/unet"), Device::Cpu, Kind::Float).unwrap();
    let half = load_unet(&root.join("tiny-sd1-fp16/unet"), Device::Cpu, Kind::Half).unwrap();
    let half_vars = half.vars.variables();
    assert!(!half_vars.is_empty());
    for (name, full_value) in full.vars.variables() {
        let half_value = &half_vars[&name];
        assert_eq!(half_value.kind(), Kind::Half, "{name}");
        let expected = full_value.to_kind(Kind::Half);
        assert!(
            half_value.equal(&expected),
            "{name} differs from its fp32 value rounded to fp16"
        );
    }
}

/// Copies a component folder, letting `edit` change its tensors before saving.
fn edited_copy(src: &Path, edit: impl FnOnce(&mut Vec<(String, Tensor)>)) -> tempdir::Dir {
    let dir = tempdir::Dir::new();
    std::fs::copy(src.join("config.json"), dir.path().join("config.json")).unwrap();
    let mut tensors =
        Tensor::read_safetensors(src.join("diffusion_pytorch_model.safetensors")).unwrap();
    edit(&mut tensors);
    Tensor::write_safetensors(
        &tensors,
        dir.path().join("diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    dir
}

mod tempdir {
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicUsize, Ordering};

    static NEXT: AtomicUsize = AtomicUsize::new(0);

    /// A scratch folder removed on drop.
    pub struct Dir(PathBuf);

    impl Dir {
        pub fn new() -> Self {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let path =
                std::env::temp_dir().join(format!("imagegen-test-{}-{n}", std::process::id()));
            std::fs::create_dir_all(&path).unwrap();
            Dir(path)
        }
        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

#[test]
fn missing_tensor_is_named() {
    let src = fixtures_dir().join("tiny-sd1/vae");
    let victim = "decoder.conv_in.weight";
    let dir = edited_copy(&src, |t| t.retain(|(name, _)| name != victim));
    let err = load_vae(dir.path(), Device::Cpu, Kind::Float)
        .err()
        .expect("must fail");
    assert!(
        matches!(&err, Error::MissingTensor { name, .. } if name == victim),
        "{err}"
    );
    assert!(err.to_string().contains(victim));
}

#[test]
fn mismatched_tensor_is_named() {
    let src = fixtures_dir().join("tiny-sd1/vae");
    let victim = "decoder.conv_out.bias";
    let dir = edited_copy(&src, |t| {
        for (name, value) in t.iter_mut() {
            if name == victim {
                *value = Tensor::zeros([7], (Kind::Float, Device::Cpu));
            }
        }
    });
    let err = load_vae(dir.path(), Device::Cpu, Kind::Float)
        .err()
        .expect("must fail");
    assert!(
        matches!(&err, Error::ShapeMismatch { name, found, .. } if name == victim && found == &vec![7]),
        "{err}"
    );
}

#[test]
fn pickle_checkpoints_are_refused() {
    let dir = tempdir::Dir::new();
    std::fs::copy(
        fixtures_dir().join("tiny-sd1/vae/config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("diffusion_pytorch_model.bin"),
        b"not loaded",
    )
    .unwrap();
    let err = load_vae(dir.path(), Device::Cpu, Kind::Float)
        .err()
        .expect("must fail");
    assert!(matches!(err, Error::PickleRefused { .. }), "{err}");
    assert!(err.to_string().contains("safetensors"), "{err}");
}

/// tiny-sd2's VAE was saved with the old attention names (query/key/value/proj_attn);
/// vae_matches_diffusers proves it loads; this proves the file really has the old names.
#[test]
fn tiny_sd2_vae_uses_the_old_attention_names() {
    let tensors = Tensor::read_safetensors(
        fixtures_dir().join("tiny-sd2/vae/diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    assert!(tensors
        .iter()
        .any(|(n, _)| n.contains(".attentions.0.query.")));
    assert!(!tensors
        .iter()
        .any(|(n, _)| n.contains(".attentions.0.to_q.")));
}
