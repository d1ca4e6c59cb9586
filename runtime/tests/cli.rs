//! The `imagegen` binary as a user runs it: flags, output files, exit codes, one-line errors.

#[path = "../../engine/tests/common/mod.rs"]
mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{compare_u8, fixtures_dir, load_reference, u8_values};

fn imagegen() -> Command {
    Command::new(env!("CARGO_BIN_EXE_imagegen"))
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("imagegen-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs and returns (exit code, stdout, stderr). The fixture models ship without a safety
/// checker, which the default policy (block) requires: `generate` runs get `--safety off`
/// unless they name a policy themselves.
fn run(args: &[&str]) -> (i32, String, String) {
    let mut args = args.to_vec();
    if args.first() == Some(&"generate") && !args.contains(&"--safety") {
        args.extend(["--safety", "off"]);
    }
    let output = imagegen().args(&args).output().expect("binary runs");
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

    let close = close_to_reference(
        &decoded,
        "references/pipelines/tiny-sd1-euler.safetensors",
        0,
    );
    assert!(close >= 0.999, "{:.3}% within 1/255", close * 100.0);

    let metadata =
        imagegen_engine::image::output::read_metadata(&bytes).expect("imagegen text chunk");
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
    let metadata = imagegen_engine::image::output::read_metadata(&bytes).unwrap();
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

/// A colourful test image and a mask with a white rectangle, written as PNG files.
fn write_inputs(
    dir: &std::path::Path,
    (w, h): (u32, u32),
    rect: (u32, u32, u32, u32),
) -> (PathBuf, PathBuf) {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([(x * 4) as u8, (y * 4) as u8, ((x + y) * 2) as u8])
    });
    let (rx, ry, rw, rh) = rect;
    let mask = image::GrayImage::from_fn(w, h, |x, y| {
        let inside = x >= rx && x < rx + rw && y >= ry && y < ry + rh;
        image::Luma([if inside { 255 } else { 0 }])
    });
    let (img_path, mask_path) = (dir.join("input.png"), dir.join("mask.png"));
    img.save(&img_path).unwrap();
    mask.save(&mask_path).unwrap();
    (img_path, mask_path)
}

/// Pixels farther than `margin` from the rectangle are the input's, bit for bit.
fn assert_kept_outside(
    out: &image::RgbImage,
    input: &image::RgbImage,
    offset: (u32, u32),
    rect: (u32, u32, u32, u32),
    margin: u32,
) {
    let (rx, ry, rw, rh) = rect;
    let mut checked = 0;
    for (x, y, p) in input.enumerate_pixels() {
        let near =
            x + margin >= rx && x < rx + rw + margin && y + margin >= ry && y < ry + rh + margin;
        if !near {
            assert_eq!(
                out.get_pixel(x + offset.0, y + offset.1),
                p,
                "pixel ({x}, {y}) changed"
            );
            checked += 1;
        }
    }
    assert!(checked > 0);
}

fn generate_with(extra: &[&str], out: &std::path::Path) -> (i32, String) {
    let model = fixtures_dir().join("tiny-sd1");
    let mut args = vec![
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "a red ball",
        "--steps",
        "3",
        "--seed",
        "3",
    ];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--out", out.to_str().unwrap()]);
    let (code, _, stderr) = run(&args);
    (code, stderr)
}

#[test]
fn inpainting_keeps_every_pixel_outside_the_blurred_mask() {
    let dir = scratch("inpaint");
    let rect = (16, 20, 24, 16);
    let (img, mask) = write_inputs(&dir, (64, 64), rect);
    let out = dir.join("out.png");
    let (code, stderr) = generate_with(
        &[
            "--init-image",
            img.to_str().unwrap(),
            "--mask",
            mask.to_str().unwrap(),
            "--mask-blur",
            "2",
            "--mask-grow",
            "2",
        ],
        &out,
    );
    assert_eq!(code, 0, "{stderr}");
    let result = image::open(&out).unwrap().to_rgb8();
    let input = image::open(&img).unwrap().to_rgb8();
    assert_eq!(result.dimensions(), (64, 64));
    // grow 2 + blur sigma 2 reaches at most 2 + 3·2 + 1 pixels out.
    assert_kept_outside(&result, &input, (0, 0), rect, 9);
    let centre = (rect.0 + rect.2 / 2, rect.1 + rect.3 / 2);
    assert_ne!(
        result.get_pixel(centre.0, centre.1),
        input.get_pixel(centre.0, centre.1),
        "masked area repainted"
    );
}

#[test]
fn only_masked_generates_a_crop_and_pastes_it_back() {
    let dir = scratch("only-masked");
    let rect = (80, 72, 20, 16);
    let (img, mask) = write_inputs(&dir, (128, 112), rect);
    let out = dir.join("out.png");
    let (code, stderr) = generate_with(
        &[
            "--init-image",
            img.to_str().unwrap(),
            "--mask",
            mask.to_str().unwrap(),
            "--only-masked",
            "--only-masked-padding",
            "8",
            "--width",
            "64",
            "--height",
            "64",
            "--mask-blur",
            "1",
        ],
        &out,
    );
    assert_eq!(code, 0, "{stderr}");
    let result = image::open(&out).unwrap().to_rgb8();
    let input = image::open(&img).unwrap().to_rgb8();
    assert_eq!(result.dimensions(), (128, 112), "the full image comes back");
    assert_kept_outside(&result, &input, (0, 0), rect, 5);
}

#[test]
fn outpainting_extends_the_canvas_and_keeps_the_original() {
    let dir = scratch("outpaint");
    let (img, _) = write_inputs(&dir, (64, 48), (0, 0, 0, 0));
    let out = dir.join("out.png");
    let (code, stderr) = generate_with(
        &[
            "--init-image",
            img.to_str().unwrap(),
            "--outpaint",
            "16,0,8,0",
            "--mask-blur",
            "2",
        ],
        &out,
    );
    assert_eq!(code, 0, "{stderr}");
    let result = image::open(&out).unwrap().to_rgb8();
    let input = image::open(&img).unwrap().to_rgb8();
    assert_eq!(result.dimensions(), (80, 56));
    // Everything of the original farther than the blur's reach from the new area is kept.
    for (x, y, p) in input.enumerate_pixels() {
        if x >= 8 && y >= 8 {
            assert_eq!(
                result.get_pixel(x + 16, y + 8),
                p,
                "original pixel ({x}, {y}) changed"
            );
        }
    }
}

#[test]
fn sdedit_defaults_to_the_input_size() {
    let dir = scratch("sdedit");
    let (img, _) = write_inputs(&dir, (72, 44), (0, 0, 0, 0));
    let out = dir.join("out.png");
    let (code, stderr) = generate_with(
        &["--init-image", img.to_str().unwrap(), "--strength", "0.5"],
        &out,
    );
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(
        image::open(&out).unwrap().to_rgb8().dimensions(),
        (72, 40),
        "rounded down to multiples of 8"
    );
}

#[test]
fn canny_strategy_runs_with_a_controlnet() {
    let dir = scratch("canny");
    let (img, _) = write_inputs(&dir, (64, 64), (0, 0, 0, 0));
    let out = dir.join("out.png");
    let controlnet = fixtures_dir().join("tiny-controlnet");
    let (code, stderr) = generate_with(
        &[
            "--init-image",
            img.to_str().unwrap(),
            "--strategy",
            "canny",
            "--controlnet",
            controlnet.to_str().unwrap(),
            "--control-scale",
            "0.8",
        ],
        &out,
    );
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(image::open(&out).unwrap().to_rgb8().dimensions(), (64, 64));
    let (code, stderr) = generate_with(
        &["--init-image", img.to_str().unwrap(), "--strategy", "canny"],
        &out,
    );
    assert_ne!(code, 0);
    assert!(stderr.contains("controlnet"), "{stderr}");
}

/// A PNG whose header claims `w`×`h` pixels, with an empty data chunk.
fn png_header_only(w: u32, h: u32) -> Vec<u8> {
    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in bytes {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    for (kind, data) in [
        (&b"IHDR"[..], &ihdr[4..]),
        (b"IDAT", &[][..]),
        (b"IEND", &[][..]),
    ] {
        let mut chunk = kind.to_vec();
        chunk.extend_from_slice(data);
        png.extend_from_slice(&(data.len() as u32).to_be_bytes());
        png.extend_from_slice(&chunk);
        png.extend_from_slice(&crc32(&chunk).to_be_bytes());
    }
    png
}

#[test]
fn bad_input_images_are_one_line_errors() {
    let dir = scratch("bad-images");
    let (img, _) = write_inputs(&dir, (64, 64), (0, 0, 0, 0));
    let small_mask = dir.join("small-mask.png");
    image::GrayImage::new(32, 32).save(&small_mask).unwrap();
    let corrupt = dir.join("corrupt.png");
    std::fs::write(&corrupt, b"\x89PNG\r\n\x1a\nnot really").unwrap();
    let bomb = dir.join("bomb.png");
    std::fs::write(&bomb, png_header_only(100_000, 100_000)).unwrap();
    let out = dir.join("out.png");
    let missing = dir.join("missing.png");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![
                "--init-image",
                img.to_str().unwrap(),
                "--mask",
                small_mask.to_str().unwrap(),
            ],
            "mask",
        ),
        (vec!["--init-image", corrupt.to_str().unwrap()], "image"),
        (vec!["--init-image", bomb.to_str().unwrap()], "pixels"),
        (
            vec!["--init-image", missing.to_str().unwrap()],
            "missing.png",
        ),
        (
            vec!["--mode", "inpaint", "--init-image", img.to_str().unwrap()],
            "mask",
        ),
        (
            vec!["--outpaint", "8,8", "--init-image", img.to_str().unwrap()],
            "LEFT,RIGHT,TOP,BOTTOM",
        ),
        (
            vec!["--init-image", img.to_str().unwrap(), "--strength", "1.5"],
            "strength",
        ),
    ];
    for (args, mentions) in cases {
        let (code, stderr) = generate_with(&args, &out);
        assert_ne!(code, 0, "{args:?} succeeded");
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{args:?}: {stderr:?}");
        assert!(
            lines[0].contains(mentions),
            "{args:?}: {:?} should mention {mentions}",
            lines[0]
        );
    }
    assert!(!out.exists());
}

#[test]
fn lora_flag_applies_loras_and_bad_specs_are_one_line_errors() {
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures_dir().join("index.json")).unwrap())
            .unwrap();
    let files = &index["lora"]["files"];
    let lora_dir = fixtures_dir().join(files["lora-a-dir"].as_str().unwrap());
    let dir = scratch("lora");
    let out = dir.join("lora.png");
    let model = fixtures_dir().join("tiny-sd1");
    let common_args = |lora: &str| {
        vec![
            "generate".to_string(),
            "--model".into(),
            model.to_str().unwrap().into(),
            "--prompt".into(),
            "a photo of a cat".into(),
            "--negative-prompt".into(),
            "blurry".into(),
            "--width".into(),
            "64".into(),
            "--height".into(),
            "64".into(),
            "--steps".into(),
            "6".into(),
            "--seed".into(),
            "42".into(),
            "--scheduler".into(),
            "euler".into(),
            "--device".into(),
            "cpu".into(),
            "--lora".into(),
            lora.to_string(),
            "--out".into(),
            out.to_str().unwrap().into(),
        ]
    };
    // A folder means its pytorch_lora_weights.safetensors; the weight is 1 by default.
    let args = common_args(lora_dir.to_str().unwrap());
    let (code, _, stderr) = run(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(code, 0, "stderr: {stderr}");
    let decoded = image::open(&out).unwrap().to_rgb8();
    let reference = load_reference(&fixtures_dir().join("references/lora/lora-a.safetensors"));
    let want = u8_values(&reference["images_u8"].get(0));
    let close = decoded
        .as_raw()
        .iter()
        .zip(&want)
        .filter(|(a, b)| a.abs_diff(**b) <= 1)
        .count();
    assert!(
        close as f64 >= 0.999 * want.len() as f64,
        "{close}/{} values within 1/255",
        want.len()
    );

    for (spec, expected) in [
        (format!("{}:heavy", lora_dir.display()), "not a weight"),
        ("/nonexistent/lora.safetensors:0.5".to_string(), "not found"),
    ] {
        let args = common_args(&spec);
        let (code, _, stderr) = run(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert_ne!(code, 0);
        assert!(stderr.contains(expected), "{stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    }
}

#[test]
fn mask_prompt_finds_the_mask_and_inpaints_only_there() {
    let dir = scratch("mask-prompt");
    let (img, _) = write_inputs(&dir, (64, 48), (0, 0, 1, 1));
    let clipseg = fixtures_dir().join("tiny-clipseg");
    let found = dir.join("found.png");
    let (code, stdout, stderr) = run(&[
        "mask",
        "--model",
        clipseg.to_str().unwrap(),
        "--image",
        img.to_str().unwrap(),
        "--prompt",
        "a red ball",
        "--grow",
        "0",
        "--device",
        "cpu",
        "--out",
        found.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stdout.trim(), found.to_str().unwrap());
    let mask = image::open(&found).unwrap().to_luma8();
    assert_eq!(mask.dimensions(), (64, 48));
    assert!(mask.pixels().all(|p| p[0] == 0 || p[0] == 255));
    let white = mask.pixels().filter(|p| p[0] == 255).count();
    assert!(white > 0, "the prompt found nothing");

    let out = dir.join("out.png");
    let (code, stderr) = generate_with(
        &[
            "--init-image",
            img.to_str().unwrap(),
            "--mask-prompt",
            "a red ball",
            "--mask-model",
            clipseg.to_str().unwrap(),
            // The random fixture model's mask is fine-grained (patches of a few pixels): no
            // grow and no feathering, so that every pixel it leaves out must stay.
            "--mask-blur",
            "0",
            "--mask-grow",
            "0",
            "--device",
            "cpu",
        ],
        &out,
    );
    assert_eq!(code, 0, "{stderr}");
    let result = image::open(&out).unwrap().to_rgb8();
    let input = image::open(&img).unwrap().to_rgb8();
    assert_eq!(result.dimensions(), (64, 48));
    let mut kept = 0;
    for (x, y, p) in input.enumerate_pixels() {
        if mask.get_pixel(x, y)[0] == 0 {
            assert_eq!(result.get_pixel(x, y), p, "pixel ({x}, {y}) changed");
            kept += 1;
        }
    }
    assert!(kept > 0, "the found mask covers the whole image");
    assert_ne!(result, input, "the found area was repainted");
}

/// The fraction of `decoded`'s 8-bit values within 1/255 of image `index` of a reference.
fn close_to_reference(decoded: &image::RgbImage, reference: &str, index: i64) -> f64 {
    let reference = load_reference(&fixtures_dir().join(reference));
    let want = u8_values(&reference["images_u8"].get(index));
    compare_u8(decoded.as_raw(), &want).0
}

/// An SDXL folder runs with the SD 1.5 flags alone: its family, size (the UNet's),
/// scheduler (Euler) and guidance (5, diffusers' SDXL default) come from the folder and
/// the family; with --refiner the base hands over in latents; mask prompts inpaint.
#[test]
fn sdxl_runs_with_the_sd15_flags_and_hands_over_to_a_refiner() {
    let dir = scratch("sdxl");
    let model = fixtures_dir().join("tiny-sdxl");
    let out = dir.join("base.png");
    let common = |seed: &'static str, steps: &'static str| {
        vec![
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "a photo of a cat",
            "--negative-prompt",
            "blurry",
            "--steps",
            steps,
            "--seed",
            seed,
            "--device",
            "cpu",
        ]
    };
    let mut args = common("40", "6");
    args.extend(["--out", out.to_str().unwrap()]);
    let (code, _, stderr) = run(&args);
    assert_eq!(code, 0, "stderr: {stderr}");
    let bytes = std::fs::read(&out).unwrap();
    let decoded = image::load_from_memory(&bytes).unwrap().to_rgb8();
    assert_eq!(decoded.dimensions(), (64, 64));
    let close = close_to_reference(&decoded, "references/sdxl/sdxl-euler.safetensors", 0);
    assert!(close >= 0.999, "{:.3}% within 1/255", close * 100.0);
    let metadata = imagegen_engine::image::output::read_metadata(&bytes).unwrap();
    assert_eq!(
        (
            metadata["guidance_scale"].as_f64(),
            metadata["scheduler"].as_str()
        ),
        (Some(5.0), Some("euler"))
    );

    let refiner = fixtures_dir().join("tiny-sdxl-refiner");
    let refined = dir.join("refined.png");
    let mut args = common("80", "10");
    args.extend([
        "--refiner",
        refiner.to_str().unwrap(),
        "--high-noise-fraction",
        "0.8",
        "--out",
        refined.to_str().unwrap(),
    ]);
    let (code, _, stderr) = run(&args);
    assert_eq!(code, 0, "stderr: {stderr}");
    let decoded = image::open(&refined).unwrap().to_rgb8();
    let close = close_to_reference(&decoded, "references/sdxl/sdxl-base-refiner.safetensors", 0);
    assert!(close >= 0.999, "{:.3}% within 1/255", close * 100.0);

    let (img, _) = write_inputs(&dir, (64, 48), (0, 0, 1, 1));
    let clipseg = fixtures_dir().join("tiny-clipseg");
    let inpainted = dir.join("inpainted.png");
    let mut args = common("3", "2");
    args.extend([
        "--init-image",
        img.to_str().unwrap(),
        "--mask-prompt",
        "a red ball",
        "--mask-model",
        clipseg.to_str().unwrap(),
        "--out",
        inpainted.to_str().unwrap(),
    ]);
    let (code, _, stderr) = run(&args);
    assert_eq!(code, 0, "stderr: {stderr}");
    assert_eq!(
        image::open(&inpainted).unwrap().to_rgb8().dimensions(),
        (64, 48)
    );

    // A fraction without a refiner is a one-line error.
    let mut args = common("1", "2");
    args.extend([
        "--high-noise-fraction",
        "0.5",
        "--out",
        out.to_str().unwrap(),
    ]);
    let (code, _, stderr) = run(&args);
    assert_ne!(code, 0);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("refiner"), "{stderr}");
}
