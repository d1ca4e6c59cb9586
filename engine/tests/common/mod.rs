//! Shared helpers for the parity tests: where the fixtures are and how to compare tensors.
#![allow(dead_code, unused_macros)]

use std::path::PathBuf;

/// One `#[test]` per fixture case, each calling the file's `run_case(name)`, and
/// `COVERED`, the list of cases, for a test that every fixture case has one.
macro_rules! parity_tests {
    ($($test:ident => $case:literal),* $(,)?) => {
        $(#[test] fn $test() { run_case($case); })*
        const COVERED: &[&str] = &[$($case),*];
    };
}

use image::{Rgb, RgbImage};
use imagegen_engine::train::TrainerEvent;
use tch::Tensor;

/// Asserts that the fixture set has cases of `kind` and that each has a test (is in
/// `covered`, the list `parity_tests!` makes): a case added to the fixtures must get one.
pub fn assert_cases_covered(kind: &str, names: impl IntoIterator<Item = String>, covered: &[&str]) {
    let names: Vec<String> = names.into_iter().collect();
    assert!(!names.is_empty(), "no {kind} fixture cases");
    for name in names {
        assert!(
            covered.contains(&name.as_str()),
            "{kind} fixture case {name} has no test"
        );
    }
}

/// An image file as 8-bit RGB.
pub fn rgb(path: &std::path::Path) -> RgbImage {
    image::open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .to_rgb8()
}

/// An image file as 8-bit gray.
pub fn gray(path: &std::path::Path) -> image::GrayImage {
    image::open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .to_luma8()
}

/// The workspace's root, read when the test runs: `cargo test` names the package's folder
/// then, where a test binary reused from another checkout would carry that checkout's.
pub fn workspace_root() -> PathBuf {
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    manifest_dir.join("..")
}

/// The folder written by `tests/fixtures/make_fixtures.py`. `scripts/test.sh` generates it
/// and exports IMAGEGEN_FIXTURES; a plain `cargo test` looks in the default place.
pub fn fixtures_dir() -> PathBuf {
    let dir = match std::env::var_os("IMAGEGEN_FIXTURES") {
        Some(dir) => PathBuf::from(dir),
        None => workspace_root().join("tests/fixtures/generated"),
    };
    assert!(
        dir.join("index.json").is_file(),
        "parity fixtures not found in {}: run scripts/test.sh (it generates them with diffusers)",
        dir.display()
    );
    dir
}

/// The fixture folder's `index.json`: which models, files and cases it holds.
pub fn fixture_index() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures_dir().join("index.json")).unwrap())
        .unwrap()
}

/// The venv's python (IMAGEGEN_PYTHON) or python3, for the diffusers-side checks.
pub fn python() -> String {
    std::env::var("IMAGEGEN_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// An empty folder `imagegen-<prefix>-<name>-<pid>` under the system temp dir.
pub fn temp_dir(prefix: &str, name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("imagegen-{prefix}-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A synthetic "photo" of one training subject (a yellow disc) on background `i`, of a
/// non-square size so that the training crop is exercised.
pub fn subject_photo(i: u32) -> RgbImage {
    RgbImage::from_fn(80, 64, |x, y| {
        let (dx, dy) = (x as i32 - 30 - 5 * i as i32, y as i32 - 30);
        if dx * dx + dy * dy < 18 * 18 {
            Rgb([250, 200, 30])
        } else {
            Rgb([(30 + 60 * i) as u8, (x * 2) as u8, (200 - 50 * i - y) as u8])
        }
    })
}

/// The step numbers of a training's step events, in order.
pub fn step_numbers(events: &[TrainerEvent]) -> Vec<u32> {
    events
        .iter()
        .filter_map(|e| match e {
            TrainerEvent::Step { step, .. } => Some(*step),
            _ => None,
        })
        .collect()
}

/// Loads every tensor of a reference safetensors file, by name.
pub fn load_reference(path: &std::path::Path) -> std::collections::HashMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap_or_else(|e| panic!("reading reference {}: {e}", path.display()))
        .into_iter()
        .collect()
}

/// Largest absolute difference between two tensors of the same shape (compared in f64).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shape mismatch");
    let a = a.to_kind(tch::Kind::Double).to_device(tch::Device::Cpu);
    let b = b.to_kind(tch::Kind::Double).to_device(tch::Device::Cpu);
    (a - b).abs().max().double_value(&[])
}

/// Asserts `max |a - b| <= tol`, naming what was compared.
pub fn assert_close(what: &str, ours: &Tensor, reference: &Tensor, tol: f64) {
    let diff = max_abs_diff(ours, reference);
    assert!(diff <= tol, "{what}: max abs diff {diff:e} > {tol:e}");
}

/// The bytes of a uint8 tensor, in row-major order.
pub fn u8_values(t: &Tensor) -> Vec<u8> {
    let t = t.contiguous();
    let len = t.numel();
    let mut bytes = vec![0u8; len];
    t.copy_data_u8(&mut bytes, len);
    bytes
}

/// Fraction of values within 1/255 and the largest difference, in 8-bit steps.
pub fn compare_u8(ours: &[u8], reference: &[u8]) -> (f64, u8) {
    assert_eq!(ours.len(), reference.len());
    let mut close = 0usize;
    let mut worst = 0u8;
    for (a, b) in ours.iter().zip(reference) {
        let d = a.abs_diff(*b);
        worst = worst.max(d);
        if d <= 1 {
            close += 1;
        }
    }
    (close as f64 / ours.len() as f64, worst)
}

/// The parity criterion for whole generations: each image has the reference's size and
/// seed (`seed + i`), and at least 99.9% of its 8-bit values are within 1/255 of the
/// reference's `images_u8` (`[count, h, w, 3]`) in `reference_file`.
pub fn assert_images_match(
    name: &str,
    images: &[imagegen_engine::GeneratedImage],
    reference_file: &std::path::Path,
    (width, height): (u32, u32),
    seed: u64,
) {
    let reference = load_reference(reference_file);
    let expected = &reference["images_u8"];
    assert_eq!(
        expected.size(),
        vec![images.len() as i64, height as i64, width as i64, 3],
        "{name}: image count or size"
    );
    for (i, out) in images.iter().enumerate() {
        assert_eq!(out.image.dimensions(), (width, height), "{name}[{i}]");
        assert_eq!(out.metadata.seed, seed + i as u64, "{name}[{i}]");
        let want = u8_values(&expected.get(i as i64));
        let (fraction, worst) = compare_u8(out.image.as_raw(), &want);
        eprintln!(
            "{name}[{i}]: {:.4}% within 1/255, worst {worst}/255",
            fraction * 100.0
        );
        assert!(
            fraction >= 0.999,
            "{name}[{i}]: only {:.3}% of values within 1/255 of diffusers (worst {worst}/255)",
            fraction * 100.0
        );
        // Guard against a degenerate reference that any output would match.
        let spread = Tensor::from_slice(&want)
            .to_kind(tch::Kind::Float)
            .std(true)
            .double_value(&[]);
        assert!(spread > 1.0, "{name}: reference image is flat");
    }
}
