//! `imagegen train --store`: photos come from the store, checkpoints and the LoRA go to it,
//! `--resume latest` continues from the store's newest checkpoint. The binary runs in another
//! working directory than the `file://` store's, so relative paths only work through the
//! store (`object_store`), as they would with S3.

#[path = "../../engine/tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{fixtures_dir, step_numbers, subject_photo, temp_dir};
use imagegen_engine::lora::Lora;
use imagegen_engine::train::TrainerEvent;
use imagegen_engine::StableDiffusion;
use tch::{Device, Kind};

const OUT: &str = "tenants/t/loras/cat";

/// A `file://` store holding a folder of two photos (and a non-image, which is skipped) at
/// `tenants/t/uploads/photos/`, and one upload object without an extension at
/// `tenants/t/uploads/single`, as `POST /v1/uploads` stores them.
fn store_with_photos(dir: &Path) -> PathBuf {
    let store = dir.join("store");
    let uploads = store.join("tenants/t/uploads");
    std::fs::create_dir_all(uploads.join("photos")).unwrap();
    for i in 0..2 {
        subject_photo(i)
            .save(uploads.join("photos").join(format!("{i}.png")))
            .unwrap();
    }
    std::fs::write(uploads.join("photos/notes.txt"), "not a photo").unwrap();
    let mut png = Vec::new();
    subject_photo(2)
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    std::fs::write(uploads.join("single"), png).unwrap();
    store
}

/// Child processes run torch on one thread: the tiny models gain nothing from more, and
/// OpenMP's spinning threads crawl when tests share a few cores.
/// The child's temp dir (its staging folder) is `<cwd>/../tmp`, to check that it is cleaned.
fn imagegen(cwd: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_imagegen"));
    command
        .env("OMP_NUM_THREADS", "1")
        .env("TMPDIR", child_tmp(cwd))
        .env_remove("IMAGEGEN_STORE")
        .current_dir(cwd);
    command
}

fn child_tmp(cwd: &Path) -> PathBuf {
    let tmp = cwd.parent().unwrap().join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    tmp
}

fn assert_staging_removed(cwd: &Path) {
    let left: Vec<_> = std::fs::read_dir(child_tmp(cwd))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(left.is_empty(), "staging folders left: {left:?}");
}

/// Runs `imagegen train` in `cwd`; returns (success, events, stderr).
fn train_cli(cwd: &Path, args: &[&str]) -> (bool, Vec<TrainerEvent>, String) {
    let out = imagegen(cwd).arg("train").args(args).output().unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    let events = stdout
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{line}: {e}")))
        .collect();
    (out.status.success(), events, stderr)
}

fn base_args(store: &Path) -> Vec<String> {
    [
        "--model",
        &fixtures_dir().join("tiny-sd1").display().to_string(),
        "--store",
        &format!("file://{}", store.display()),
        "--instance-prompt",
        "a photo of sks cat",
        "--resolution",
        "64",
        "--seed",
        "7",
        "--rank",
        "4",
        "--device",
        "cpu",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn with(mut args: Vec<String>, extra: &[&str]) -> Vec<String> {
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn refs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

fn checkpoint_paths(events: &[TrainerEvent]) -> Vec<(u32, String)> {
    events
        .iter()
        .filter_map(|e| match e {
            TrainerEvent::Checkpoint { step, path } => Some((*step, path.clone())),
            _ => None,
        })
        .collect()
}

fn done_output(events: &[TrainerEvent]) -> String {
    match events.last() {
        Some(TrainerEvent::Done { output, .. }) => output.clone(),
        other => panic!("last event {other:?}"),
    }
}

#[test]
fn the_lora_and_checkpoints_go_to_the_store_and_resume_latest_continues_from_it() {
    let dir = temp_dir("train-store", "roundtrip");
    let store = store_with_photos(&dir);
    let cwd = dir.join("elsewhere");
    std::fs::create_dir_all(&cwd).unwrap();
    let args = with(
        base_args(&store),
        &[
            "--images",
            "tenants/t/uploads/photos/",
            "--images",
            "tenants/t/uploads/single",
            "--out",
            OUT,
            "--resume",
            "latest",
            "--checkpoint-every",
            "2",
        ],
    );

    // A fresh start (no checkpoint in the store yet): checkpoint 2 of 4 is uploaded.
    let (ok, events, stderr) = train_cli(&cwd, &refs(&with(args.clone(), &["--steps", "4"])));
    assert!(ok, "{stderr}");
    assert_eq!(step_numbers(&events), vec![1, 2, 3, 4]);
    assert_eq!(
        checkpoint_paths(&events),
        vec![(2, format!("{OUT}/checkpoint-2"))]
    );
    let lora_path = format!("{OUT}/pytorch_lora_weights.safetensors");
    assert_eq!(done_output(&events), lora_path);
    for file in [
        "state.json",
        "optimizer.safetensors",
        "pytorch_lora_weights.safetensors",
    ] {
        assert!(
            store.join(OUT).join("checkpoint-2").join(file).is_file(),
            "{file}"
        );
    }
    let lora_file = store.join(&lora_path);
    assert!(lora_file.is_file());
    assert!(
        std::fs::read_dir(&cwd).unwrap().next().is_none(),
        "nothing is written to the working directory"
    );
    tch::set_num_threads(1);
    let model = StableDiffusion::load_dir(
        &fixtures_dir().join("tiny-sd1"),
        "tiny-sd1",
        Device::Cpu,
        Kind::Float,
    )
    .unwrap();
    let first = Lora::load(&lora_file, &model, false).unwrap();
    assert!(!first.modules.is_empty());

    // A restarted run with more steps resumes from the store's checkpoint 2 (the staging
    // folder of the first run is gone), and its kohya file goes to the store too.
    let (ok, events, stderr) = train_cli(&cwd, &refs(&with(args, &["--steps", "6", "--kohya"])));
    assert!(ok, "{stderr}");
    assert_eq!(step_numbers(&events), vec![3, 4, 5, 6]);
    assert_eq!(
        checkpoint_paths(&events),
        vec![(4, format!("{OUT}/checkpoint-4"))]
    );
    assert!(store.join(OUT).join("checkpoint-4/state.json").is_file());
    assert_eq!(done_output(&events), lora_path);
    assert!(store.join(OUT).join("cat_kohya.safetensors").is_file());
    let second = Lora::load(&lora_file, &model, false).unwrap();
    let changed = first
        .modules
        .iter()
        .zip(&second.modules)
        .any(|(a, b)| (&a.up - &b.up).abs().max().double_value(&[]) > 0.0);
    assert!(changed, "the second run overwrote the LoRA in the store");
    assert_staging_removed(&cwd);
}

#[test]
fn missing_store_images_and_dot_dot_paths_are_one_line_errors() {
    let dir = temp_dir("train-store", "errors");
    let store = store_with_photos(&dir);
    let cwd = dir.join("elsewhere");
    std::fs::create_dir_all(&cwd).unwrap();
    let cases: [(&[&str], &str); 4] = [
        (
            &["--images", "tenants/t/uploads/missing", "--out", OUT],
            "no image",
        ),
        (&["--images", "../uploads/photos", "--out", OUT], "--images"),
        (
            &[
                "--images",
                "tenants/t/uploads/photos",
                "--out",
                "tenants/t/../u/x",
            ],
            "--out",
        ),
        (
            &[
                "--images",
                "tenants/t/uploads/photos",
                "--out",
                OUT,
                "--resume",
                "tenants/t/loras/none/checkpoint-9",
            ],
            "not found",
        ),
    ];
    for (extra, wanted) in cases {
        let args = with(with(base_args(&store), extra), &["--steps", "2"]);
        let (ok, events, stderr) = train_cli(&cwd, &refs(&args));
        assert!(!ok, "{args:?} succeeded");
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(stderr.contains(wanted), "{wanted}: {stderr}");
        assert_eq!(events.len(), 1, "{events:?}");
        assert!(
            matches!(events[0], TrainerEvent::Failed { .. }),
            "{events:?}"
        );
        assert_staging_removed(&cwd);
    }
    assert!(!store.join("tenants/t/loras").exists());
}
