//! Shared helpers for the parity tests: where the fixtures are and how to compare tensors.
#![allow(dead_code)]

use std::path::PathBuf;
use tch::Tensor;

/// The folder written by `tests/fixtures/make_fixtures.py`. `scripts/test.sh` generates it
/// and exports IMAGEGEN_FIXTURES; a plain `cargo test` looks in the default place.
pub fn fixtures_dir() -> PathBuf {
    let dir = match std::env::var_os("IMAGEGEN_FIXTURES") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/generated"),
    };
    assert!(
        dir.join("index.json").is_file(),
        "parity fixtures not found in {}: run scripts/test.sh (it generates them with diffusers)",
        dir.display()
    );
    dir
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
