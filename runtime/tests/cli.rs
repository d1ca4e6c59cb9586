//! The `imagegen` binary as a user runs it: flags, output files, exit codes, one-line errors.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{fixtures_dir, load_reference, u8_values};

fn imagegen() -> Command {
    Command::new(env!("CARGO_BIN_EXE_imagegen"))
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("imagegen-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs and returns (exit code, stdout, stderr).
fn run(args: &[&str]) -> (i32, String, String) {
    let output = imagegen().args(args).output().expect("binary runs");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn generate_writes_the_diffusers_image_with_metadata() {
    let model = fixtures_dir().join("tiny-sd1");
    let dir = scratch("generate");
    let out = dir.join("cat.png");
    let (code, stdout, stderr) = run(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "a photo of a cat",
        "--negative-prompt",
        "blurry",
        "--width",
        "64",
        "--height",
        "64",
        "--steps",
        "6",
        "--guidance",
        "7.5",
        "--seed",
        "42",
        "--scheduler",
        "euler",
        "--device",
        "cpu",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "stderr: {stderr}");
    assert_eq!(stdout.trim(), out.to_str().unwrap());
    let bytes = std::fs::read(&out).unwrap();
    let decoded = image::load_from_memory(&bytes).unwrap().to_rgb8();
    assert_eq!(decoded.dimensions(), (64, 64));

    let reference =
        load_reference(&fixtures_dir().join("references/pipelines/tiny-sd1-euler.safetensors"));
    let want_bytes = u8_values(&reference["images_u8"].get(0));
    let close = decoded
        .as_raw()
        .iter()
        .zip(&want_bytes)
        .filter(|(a, b)| a.abs_diff(**b) <= 1)
        .count();
    assert!(
        close as f64 >= 0.999 * want_bytes.len() as f64,
        "{close}/{} values within 1/255",
        want_bytes.len()
    );

    let metadata = imagegen_runtime::output::read_metadata(&bytes).expect("imagegen text chunk");
    assert_eq!(metadata["seed"], 42);
    assert_eq!(metadata["prompt"], "a photo of a cat");
    assert_eq!(metadata["negative_prompt"], "blurry");
    assert_eq!(metadata["scheduler"], "euler");
    assert_eq!(metadata["steps"], 6);
}

#[test]
fn count_writes_numbered_files() {
    let model = fixtures_dir().join("tiny-sd1");
    let dir = scratch("count");
    let out = dir.join("batch.png");
    let (code, stdout, stderr) = run(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "a dog",
        "--width",
        "64",
        "--height",
        "48",
        "--steps",
        "2",
        "--count",
        "2",
        "--seed",
        "9",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "stderr: {stderr}");
    assert_eq!(stdout.lines().count(), 2);
    for i in 0..2 {
        let path = dir.join(format!("batch-{i}.png"));
        let img = image::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!((img.width(), img.height()), (64, 48));
    }
    assert!(!out.exists());
}

#[test]
fn bad_input_is_one_line_and_non_zero() {
    let model = fixtures_dir().join("tiny-sd1");
    let model = model.to_str().unwrap();
    let dir = scratch("bad");
    let out = dir.join("x.png");
    let out = out.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![
                "generate", "--model", model, "--prompt", "x", "--width", "63", "--out", out,
            ],
            "width",
        ),
        (
            vec![
                "generate",
                "--model",
                model,
                "--prompt",
                "x",
                "--scheduler",
                "heun",
                "--out",
                out,
            ],
            "euler-a",
        ),
        (
            vec![
                "generate",
                "--model",
                "/no/such/model",
                "--prompt",
                "x",
                "--out",
                out,
            ],
            "/no/such/model",
        ),
        (
            vec![
                "generate", "--model", model, "--prompt", "x", "--dtype", "f8", "--out", out,
            ],
            "dtype",
        ),
        (
            vec![
                "generate", "--model", model, "--prompt", "x", "--steps", "many", "--out", out,
            ],
            "steps",
        ),
        (vec!["generate", "--model", model, "--out", out], "--prompt"),
        (
            vec![
                "generate", "--model", model, "--prompt", "x", "--device", "cuda:7", "--out", out,
            ],
            "cuda",
        ),
    ];
    for (args, mentions) in cases {
        let (code, stdout, stderr) = run(&args);
        assert_ne!(code, 0, "{args:?} succeeded");
        assert!(stdout.is_empty(), "{args:?}: stdout {stdout:?}");
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(
            lines.len(),
            1,
            "{args:?}: stderr should be one line: {stderr:?}"
        );
        assert!(
            lines[0].contains(mentions),
            "{args:?}: {:?} should mention {mentions}",
            lines[0]
        );
    }
    assert!(!std::path::Path::new(out).exists());
}

#[test]
fn pickle_only_model_is_refused_with_advice() {
    let src = fixtures_dir().join("tiny-sd1");
    let dir = scratch("pickle");
    // A copy of the model whose UNet has only a .bin checkpoint.
    for entry in walk(&src) {
        let rel = entry.strip_prefix(&src).unwrap();
        let dest = dir.join(rel);
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        if rel.starts_with("unet") && rel.extension().is_some_and(|e| e == "safetensors") {
            std::fs::write(
                dest.with_file_name("diffusion_pytorch_model.bin"),
                b"pickle",
            )
            .unwrap();
        } else {
            std::fs::copy(&entry, &dest).unwrap();
        }
    }
    let out = dir.join("x.png");
    let (code, _, stderr) = run(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        "x",
        "--steps",
        "1",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_ne!(code, 0);
    assert!(
        stderr.contains("safetensors") && stderr.contains("diffusion_pytorch_model.bin"),
        "{stderr}"
    );
}

fn walk(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

#[test]
fn styles_lists_the_presets() {
    let (code, stdout, stderr) = run(&["styles"]);
    assert_eq!(code, 0, "{stderr}");
    for id in [
        "black-and-white",
        "portrait",
        "anime",
        "pixel-art",
        "sticker",
        "neon",
    ] {
        assert!(
            stdout.lines().any(|l| l.starts_with(id)),
            "{id} missing from:\n{stdout}"
        );
    }
    assert!(stdout.lines().count() >= 16);
    let (code, stdout, _) = run(&["styles", "--json"]);
    assert_eq!(code, 0);
    let styles: Vec<serde_json::Value> = serde_json::from_str(&stdout).unwrap();
    assert!(styles
        .iter()
        .all(|s| s["prompt"].as_str().unwrap().contains("{prompt}")));
}

#[test]
fn black_and_white_style_is_gray_and_records_the_applied_prompt() {
    let model = fixtures_dir().join("tiny-sd1");
    let dir = scratch("style");
    let out = dir.join("bw.png");
    let (code, _, stderr) = run(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "a cat",
        "--style",
        "black-and-white",
        "--width",
        "64",
        "--height",
        "64",
        "--steps",
        "2",
        "--seed",
        "1",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    let bytes = std::fs::read(&out).unwrap();
    let img = image::load_from_memory(&bytes).unwrap().to_rgb8();
    assert!(
        img.pixels().all(|p| p[0] == p[1] && p[1] == p[2]),
        "not grayscale"
    );
    let metadata = imagegen_runtime::output::read_metadata(&bytes).unwrap();
    let prompt = metadata["prompt"].as_str().unwrap();
    assert!(
        prompt.contains("a cat") && prompt != "a cat",
        "applied prompt recorded: {prompt}"
    );

    let (code, _, stderr) = run(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "a cat",
        "--style",
        "baroque-ish",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_ne!(code, 0);
    assert!(
        stderr.contains("neon") && stderr.lines().count() == 1,
        "{stderr}"
    );
}
