//! DreamBooth-LoRA training on the tiny fixture models: the loss falls, the file is what
//! diffusers expects (and diffusers gives our image with it), resume continues from the
//! checkpoint's step, v-prediction and prior preservation train, CLI errors are one line.

#[path = "../../engine/tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::rc::Rc;
use std::sync::atomic::AtomicBool;

use common::{assert_images_match, fixtures_dir, python, step_numbers, subject_photo, temp_dir};
use imagegen_engine::lora;
use imagegen_engine::lora::Lora;
use imagegen_engine::models::unet::Conditioning;
use imagegen_engine::pipelines;
use imagegen_engine::styles::StyleBook;
use imagegen_engine::train::{train, TrainConfig, TrainOutcome, TrainerEvent};
use imagegen_engine::{GeneratedImage, GenerationParams, Inputs, StableDiffusion};
use tch::{Device, Kind};

fn model(name: &str) -> StableDiffusion {
    // The tiny models gain nothing from intra-op threads, and OpenMP's spinning threads
    // slow to a crawl when the tests (and other jobs) share a few cores.
    tch::set_num_threads(1);
    StableDiffusion::load_dir(&fixtures_dir().join(name), name, Device::Cpu, Kind::Float).unwrap()
}

/// Three synthetic "photos" of one subject (a yellow disc on different backgrounds), of a
/// non-square size so that the crop is exercised.
fn instance_images(dir: &Path) -> PathBuf {
    let images = dir.join("images");
    std::fs::create_dir_all(&images).unwrap();
    for i in 0..3u32 {
        subject_photo(i)
            .save(images.join(format!("{i}.png")))
            .unwrap();
    }
    images
}

fn config(model: &str, images: &Path, out: &Path) -> TrainConfig {
    let mut c = TrainConfig::new(
        fixtures_dir().join(model).display().to_string(),
        vec![images.to_path_buf()],
        "a photo of sks cat",
        out,
    );
    c.resolution = 64;
    c.seed = 7;
    c.lr = 1e-2;
    c.rank = 4;
    c.alpha = 8.0;
    c
}

fn run(model: &StableDiffusion, c: &TrainConfig) -> (TrainOutcome, Vec<TrainerEvent>) {
    let mut events = Vec::new();
    let outcome = train(model, c, &mut |e| events.push(e)).unwrap();
    (outcome, events)
}

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len() as f64
}

/// The mean loss of the last `k` steps is clearly below that of the first `k`.
fn assert_loss_falls(what: &str, losses: &[f64], k: usize) {
    let (first, last) = (mean(&losses[..k]), mean(&losses[losses.len() - k..]));
    eprintln!("{what}: mean loss of the first {k} steps {first:.4}, of the last {k} {last:.4}");
    assert!(
        last < 0.9 * first,
        "{what}: the loss did not fall: {first:.4} -> {last:.4}"
    );
}

#[test]
fn loss_falls_and_events_follow_the_contract() {
    let dir = temp_dir("train", "loss");
    let images = instance_images(&dir);
    let model = model("tiny-sd1");
    let mut c = config("tiny-sd1", &images, &dir.join("out"));
    c.steps = 300;
    c.warmup_steps = 10;
    let (outcome, events) = run(&model, &c);
    assert_eq!(outcome.losses.len(), 300);
    assert_loss_falls("tiny-sd1", &outcome.losses, 50);
    assert_eq!(
        events.first(),
        Some(&TrainerEvent::Started {
            total: 300,
            seed: 7
        })
    );
    assert_eq!(step_numbers(&events), (1..=300).collect::<Vec<_>>());
    match &events[1] {
        TrainerEvent::Step { lr, eta, .. } => {
            assert_eq!(*lr, 0.0, "warmup starts at 0");
            assert!(*eta >= 0.0);
        }
        other => panic!("second event {other:?}"),
    }
    match events.last() {
        Some(TrainerEvent::Done {
            step,
            total,
            output,
            ..
        }) => {
            assert_eq!((*step, *total), (300, 300));
            assert!(Path::new(output).is_file());
        }
        other => panic!("last event {other:?}"),
    }
}

/// The file's keys, shapes and header.
fn read_header(path: &Path) -> (BTreeMap<String, Vec<usize>>, BTreeMap<String, String>) {
    let bytes = std::fs::read(path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let shapes = meta
        .tensors()
        .into_iter()
        .map(|(k, v)| (k, v.shape.clone()))
        .collect();
    let header = meta
        .metadata()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    (shapes, header)
}

#[test]
fn the_file_has_diffusers_keys_shapes_and_metadata() {
    let dir = temp_dir("train", "file");
    let images = instance_images(&dir);
    let model = model("tiny-sd1");
    let mut c = config("tiny-sd1", &images, &dir.join("out"));
    c.steps = 3;
    c.train_text_encoder = true;
    c.kohya = true;
    let (outcome, _) = run(&model, &c);

    // What diffusers' save_lora_weights writes for peft adapters on to_q/k/v/out.0 (and the
    // text encoder's q/k/v/out_proj): one A [r, in] and one B [out, r] per projection.
    let mut expected = BTreeMap::new();
    for (prefix, vars, targets) in [
        (
            "unet",
            &model.unet.vars,
            &["to_q", "to_k", "to_v", "to_out.0"][..],
        ),
        (
            "text_encoder",
            &model.text_encoder().vars,
            &["q_proj", "k_proj", "v_proj", "out_proj"][..],
        ),
    ] {
        for (name, var) in vars.variables() {
            let Some(module) = name.strip_suffix(".weight") else {
                continue;
            };
            let is_target = targets.iter().any(|t| module.ends_with(&format!(".{t}")));
            let in_attention = module.contains(".attn1.")
                || module.contains(".attn2.")
                || module.contains(".self_attn.");
            if is_target && in_attention {
                let (out_dim, in_dim) = (var.size()[0] as usize, var.size()[1] as usize);
                expected.insert(format!("{prefix}.{module}.lora_A.weight"), vec![4, in_dim]);
                expected.insert(format!("{prefix}.{module}.lora_B.weight"), vec![out_dim, 4]);
            }
        }
    }
    let (shapes, header) = read_header(&outcome.output);
    assert!(expected.len() > 8);
    assert_eq!(shapes, expected);

    let adapter: serde_json::Value =
        serde_json::from_str(&header["lora_adapter_metadata"]).unwrap();
    for component in ["unet", "text_encoder"] {
        assert_eq!(adapter[format!("{component}.r")], 4);
        assert_eq!(adapter[format!("{component}.lora_alpha")], 8.0);
    }
    assert_eq!(header["imagegen.instance_prompt"], "a photo of sks cat");
    assert_eq!(header["imagegen.steps"], "3");
    assert_eq!(header["imagegen.rank"], "4");
    assert_eq!(header["imagegen.alpha"], "8");
    assert_eq!(header["imagegen.seed"], "7");
    assert!(header["imagegen.base_model"].ends_with("tiny-sd1"));

    // The kohya export: names our loader resolves, an alpha per module, and the same
    // deltas as the diffusers file.
    let kohya = outcome.kohya_output.clone().unwrap();
    assert!(kohya.ends_with("out_kohya.safetensors"));
    let (kohya_shapes, kohya_header) = read_header(&kohya);
    assert_eq!(kohya_shapes.len(), expected.len() / 2 * 3);
    assert!(kohya_shapes
        .keys()
        .any(|k| k.starts_with("lora_te_text_model_encoder_layers_0_self_attn_q_proj.")));
    assert_eq!(kohya_header["ss_network_dim"], "4");
    let from_diffusers = Lora::load(&outcome.output, &model, false).unwrap();
    let from_kohya = Lora::load(&kohya, &model, false).unwrap();
    assert_eq!(from_diffusers.modules.len(), from_kohya.modules.len());
    for (a, b) in from_diffusers.modules.iter().zip(&from_kohya.modules) {
        assert_eq!(a.target, b.target);
        assert_eq!(a.scale, 2.0);
        assert_eq!(b.scale, 2.0);
        assert!(a.down.equal(&b.down) && a.up.equal(&b.up));
    }
}

#[test]
fn resume_continues_from_the_checkpoint_step() {
    let dir = temp_dir("train", "resume");
    let images = instance_images(&dir);
    let model = model("tiny-sd1");
    let mut c = config("tiny-sd1", &images, &dir.join("full"));
    c.steps = 20;
    c.checkpoint_every = Some(10);
    let (full, events) = run(&model, &c);
    let checkpoint = dir.join("full").join("checkpoint-10");
    assert!(events.contains(&TrainerEvent::Checkpoint {
        step: 10,
        path: checkpoint.display().to_string()
    }));
    assert!(checkpoint.join("state.json").is_file());

    let mut resumed_config = c.clone();
    resumed_config.out = dir.join("resumed");
    resumed_config.resume = Some(checkpoint);
    let (resumed, events) = run(&model, &resumed_config);
    assert_eq!(step_numbers(&events), (11..=20).collect::<Vec<_>>());
    assert_eq!(resumed.losses.len(), 10);
    for (a, b) in full.losses[10..].iter().zip(&resumed.losses) {
        assert!((a - b).abs() <= 1e-5 * a.abs().max(1.0), "{a} vs {b}");
    }
    let a = Lora::load(&full.output, &model, false).unwrap();
    let b = Lora::load(&resumed.output, &model, false).unwrap();
    for (x, y) in a.modules.iter().zip(&b.modules) {
        let diff = (&x.up - &y.up).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "{}: {diff}", x.target);
    }

    // `latest` picks the newest checkpoint of the output folder; none means a fresh start.
    let mut latest_config = c.clone();
    latest_config.out = dir.join("full");
    latest_config.resume = Some(PathBuf::from("latest"));
    latest_config.steps = 25;
    let (_, events) = run(&model, &latest_config);
    assert_eq!(step_numbers(&events), (11..=25).collect::<Vec<_>>());
    latest_config.out = dir.join("fresh");
    let (_, events) = run(&model, &latest_config);
    assert_eq!(step_numbers(&events), (1..=25).collect::<Vec<_>>());
}

/// Loading a model draws nothing from torch's generator (layers start as zeros, not random
/// inits): a load on one thread, e.g. the service loading a model while a training runs,
/// must not shift a seeded sequence on another.
#[test]
fn loading_a_model_leaves_the_generator_alone() {
    use imagegen_engine::noise::with_seed;
    let draw = || tch::Tensor::randn([64], (Kind::Float, Device::Cpu));
    let alone = with_seed(9, draw);
    let after_loads = with_seed(9, || {
        let _ = model("tiny-sd1");
        let _ = model("tiny-sd2");
        draw()
    });
    assert!(after_loads.equal(&alone));
}

#[test]
fn a_v_prediction_model_trains() {
    let dir = temp_dir("train", "vpred");
    let images = instance_images(&dir);
    let model = model("tiny-sd2");
    let mut c = config("tiny-sd2", &images, &dir.join("out"));
    c.steps = 300;
    c.snr_gamma = Some(5.0);
    let (outcome, _) = run(&model, &c);
    assert_loss_falls("tiny-sd2 (v-prediction, min-SNR 5)", &outcome.losses, 50);
    Lora::load(&outcome.output, &model, false).unwrap();
}

#[test]
fn prior_preservation_generates_and_reuses_class_images() {
    let dir = temp_dir("train", "prior");
    let images = instance_images(&dir);
    let model = model("tiny-sd1");
    let mut c = config("tiny-sd1", &images, &dir.join("out"));
    c.steps = 4;
    c.class_prompt = Some("a photo of a cat".into());
    c.class_images = 2;
    c.batch_size = 2;
    c.grad_accum = 2;
    let (outcome, _) = run(&model, &c);
    let class_dir = dir.join("out").join("class_images");
    let list = || {
        let mut files: Vec<_> = std::fs::read_dir(&class_dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        files
    };
    let files = list();
    assert_eq!(files.len(), 2);
    let first = image::open(&files[0]).unwrap();
    assert_eq!((first.width(), first.height()), (64, 64));
    assert!(outcome.losses.iter().all(|l| l.is_finite()));
    let modified = std::fs::metadata(&files[0]).unwrap().modified().unwrap();
    c.class_images = 3;
    run(&model, &c);
    let again = list();
    assert_eq!(again.len(), 3, "one more generated");
    assert_eq!(
        std::fs::metadata(&again[0]).unwrap().modified().unwrap(),
        modified,
        "existing class images are reused"
    );
}

/// Child processes run torch on one thread, as the tests do (see `model`).
fn single_threaded(mut command: Command) -> Command {
    command.env("OMP_NUM_THREADS", "1");
    command
}

fn imagegen() -> Command {
    single_threaded(Command::new(env!("CARGO_BIN_EXE_imagegen")))
}

/// Runs `imagegen train` with `args`; returns (success, stdout lines, stderr).
fn train_cli(args: &[&str]) -> (bool, Vec<String>, String) {
    let out = imagegen().arg("train").args(args).output().unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    (
        out.status.success(),
        stdout.lines().map(String::from).collect(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn cli_errors_are_one_line_and_a_failed_event() {
    let dir = temp_dir("train", "cli-errors");
    let images = instance_images(&dir);
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let model = fixtures_dir().join("tiny-sd1").display().to_string();
    let out = dir.join("out").display().to_string();
    let cases: [(Vec<String>, &str); 4] = [
        (
            vec!["--images".into(), dir.join("missing").display().to_string()],
            "does not exist",
        ),
        (
            vec!["--images".into(), empty.display().to_string()],
            "holds no images",
        ),
        (
            vec![
                "--images".into(),
                images.display().to_string(),
                "--rank".into(),
                "0".into(),
            ],
            "rank",
        ),
        (
            vec![
                "--images".into(),
                images.display().to_string(),
                "--mixed-precision".into(),
                "fp16".into(),
                "--device".into(),
                "cpu".into(),
            ],
            "CUDA",
        ),
    ];
    for (extra, wanted) in cases {
        let mut args: Vec<String> = vec![
            "--model".into(),
            model.clone(),
            "--instance-prompt".into(),
            "a photo of sks cat".into(),
            "--out".into(),
            out.clone(),
        ];
        args.extend(extra);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let (ok, stdout, stderr) = train_cli(&refs);
        assert!(!ok, "{args:?} succeeded");
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(stderr.contains(wanted), "{stderr}");
        assert_eq!(stdout.len(), 1, "{stdout:?}");
        let event: TrainerEvent = serde_json::from_str(&stdout[0]).unwrap();
        assert!(matches!(event, TrainerEvent::Failed { .. }), "{event:?}");
    }
}

#[derive(serde::Serialize, Clone)]
struct Case {
    name: String,
    model: String,
    loras: Vec<(String, f64)>,
    prompt: String,
    negative_prompt: String,
    width: u32,
    height: u32,
    steps: u32,
    guidance: f64,
    seed: u64,
    count: u32,
    scheduler: String,
    out: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    strength: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    image: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    mask: Option<String>,
}

fn params(case: &Case) -> GenerationParams {
    GenerationParams {
        prompt: case.prompt.clone(),
        negative_prompt: Some(case.negative_prompt.clone()),
        width: Some(case.width),
        height: Some(case.height),
        steps: Some(case.steps),
        guidance_scale: Some(case.guidance),
        scheduler: Some(case.scheduler.clone()),
        seed: Some(case.seed),
        count: Some(case.count),
        strength: case.strength,
        ..Default::default()
    }
}

/// Our images for a case: text-to-image through `generate`, inpainting through the
/// pipeline method with the LoRAs fused (as lora_parity.rs does).
fn ours(model: &StableDiffusion, case: &Case) -> Vec<GeneratedImage> {
    let loras: Vec<(Rc<Lora>, f64)> = case
        .loras
        .iter()
        .map(|(p, w)| (Rc::new(Lora::load(Path::new(p), model, false).unwrap()), *w))
        .collect();
    let cancel = AtomicBool::new(false);
    match (&case.image, &case.mask) {
        (Some(image), Some(mask)) => {
            let image = image::open(image).unwrap().to_rgb8();
            let mask = image::open(mask).unwrap().to_luma8();
            let _fused = lora::fuse_loras(model, &loras).unwrap();
            pipelines::inpaint(model, &params(case), &image, &mask, &mut |_| {}, &cancel).unwrap()
        }
        _ => {
            let inputs = Inputs {
                loras,
                ..Default::default()
            };
            pipelines::generate(
                model,
                &params(case),
                &inputs,
                &StyleBook::builtin(),
                &mut |_| {},
                &cancel,
            )
            .unwrap()
            .images
        }
    }
}

/// Share of 8-bit values that differ by more than 2.
fn changed_fraction(a: &GeneratedImage, b: &GeneratedImage) -> f64 {
    let (a, b) = (a.image.as_raw(), b.image.as_raw());
    let changed = a.iter().zip(b).filter(|(x, y)| x.abs_diff(**y) > 2).count();
    changed as f64 / a.len() as f64
}

/// A LoRA trained by `imagegen train` (UNet and text encoder, alpha ≠ rank, with the kohya
/// export) gives diffusers' image in our runtime: text-to-image with both files, and
/// inpainting with the 9-channel inpainting UNet (tiny-inpaint is tiny-sd1 with a 9-channel
/// conv_in: the LoRA's attention weights apply, conv_in is left alone).
#[test]
fn a_trained_lora_gives_diffusers_image() {
    let dir = temp_dir("train", "parity");
    let images = instance_images(&dir);
    let out = dir.join("sks");
    let tiny_sd1 = fixtures_dir().join("tiny-sd1");
    let (ok, stdout, stderr) = train_cli(&[
        "--model",
        tiny_sd1.to_str().unwrap(),
        "--images",
        images.to_str().unwrap(),
        "--instance-prompt",
        "a photo of sks cat",
        "--steps",
        "150",
        "--rank",
        "4",
        "--alpha",
        "8",
        "--lr",
        "1e-2",
        "--resolution",
        "64",
        "--seed",
        "3",
        "--train-text-encoder",
        "--kohya",
        "--device",
        "cpu",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "training failed: {stderr}");
    let events: Vec<TrainerEvent> = stdout
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    assert!(matches!(
        events.last(),
        Some(TrainerEvent::Done { step: 150, .. })
    ));
    let diffusers_file = out.join("pytorch_lora_weights.safetensors");
    let kohya_file = out.join("sks_kohya.safetensors");

    let fixtures = fixtures_dir();
    let case = |name: &str, model: &str, lora: &Path, weight: f64| Case {
        name: name.into(),
        model: fixtures.join(model).display().to_string(),
        loras: vec![(lora.display().to_string(), weight)],
        prompt: "a photo of sks cat".into(),
        negative_prompt: "blurry".into(),
        width: 64,
        height: 64,
        steps: 6,
        guidance: 7.5,
        seed: 42,
        count: 1,
        scheduler: "ddim".into(),
        out: dir
            .join(format!("{name}.safetensors"))
            .display()
            .to_string(),
        strength: None,
        image: None,
        mask: None,
    };
    let mut inpaint = case("trained-inpaint-9ch", "tiny-inpaint", &diffusers_file, 1.0);
    inpaint.strength = Some(1.0);
    inpaint.image = Some(
        fixtures
            .join("references/inpaint/square-image.png")
            .display()
            .to_string(),
    );
    inpaint.mask = Some(
        fixtures
            .join("references/inpaint/square-mask.png")
            .display()
            .to_string(),
    );
    let cases = vec![
        case("trained", "tiny-sd1", &diffusers_file, 1.0),
        case("trained-kohya", "tiny-sd1", &kohya_file, 0.8),
        inpaint,
    ];
    let cases_file = dir.join("cases.json");
    std::fs::write(&cases_file, serde_json::to_string(&cases).unwrap()).unwrap();
    let script = common::workspace_root().join("tests/check_trained_lora.py");
    let status = single_threaded(Command::new(python()))
        .arg(&script)
        .arg(&cases_file)
        .env("HF_HUB_OFFLINE", "1")
        .status()
        .unwrap();
    assert!(status.success(), "{} failed", script.display());

    let sd1 = model("tiny-sd1");
    let inpainting = model("tiny-inpaint");
    for c in &cases {
        let m = if c.model.ends_with("tiny-inpaint") {
            &inpainting
        } else {
            &sd1
        };
        let with = ours(m, c);
        assert_images_match(
            &c.name,
            &with,
            Path::new(&c.out),
            (c.width, c.height),
            c.seed,
        );
        let base = ours(
            m,
            &Case {
                loras: Vec::new(),
                ..c.clone()
            },
        );
        let changed = changed_fraction(&with[0], &base[0]);
        eprintln!(
            "{}: {:.1}% of values differ from the base model's",
            c.name,
            changed * 100.0
        );
        assert!(
            changed > 0.2,
            "{}: the trained LoRA barely changes the image",
            c.name
        );
    }
}

#[test]
fn bf16_mixed_precision_trains_on_the_cpu_with_float32_lora_weights() {
    let dir = temp_dir("train", "bf16");
    let images = instance_images(&dir);
    let model = StableDiffusion::load_dir(
        &fixtures_dir().join("tiny-sd1"),
        "tiny-sd1",
        Device::Cpu,
        Kind::BFloat16,
    )
    .unwrap();
    let mut c = config("tiny-sd1", &images, &dir.join("out"));
    c.steps = 5;
    c.train_text_encoder = true;
    c.mixed_precision = imagegen_engine::train::MixedPrecision::Bf16;
    let (outcome, _) = run(&model, &c);
    assert!(outcome.losses.iter().all(|l| l.is_finite()));
    let bytes = std::fs::read(&outcome.output).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (_, b) = file
        .tensors()
        .into_iter()
        .find(|(k, _)| k.ends_with("lora_B.weight"))
        .unwrap();
    assert_eq!(b.dtype(), safetensors::Dtype::F32);
    assert!(
        b.data().iter().any(|&byte| byte != 0),
        "B moved away from its zero start"
    );
}

/// A minimal HTTP/1.1 endpoint: answers every request 200 and records (authorization
/// header, body).
/// What the endpoint received: (authorization header, body) per request.
type Received = std::sync::Arc<std::sync::Mutex<Vec<(String, String)>>>;

fn progress_endpoint() -> (String, Received) {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!(
        "http://{}/v1/trainings/ns/sks/progress",
        listener.local_addr().unwrap()
    );
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    break;
                }
                let (mut length, mut auth) = (0usize, String::new());
                loop {
                    let mut header = String::new();
                    reader.read_line(&mut header).unwrap();
                    let header = header.trim_end();
                    if header.is_empty() {
                        break;
                    }
                    let (name, value) = header.split_once(':').unwrap();
                    match name.to_ascii_lowercase().as_str() {
                        "content-length" => length = value.trim().parse().unwrap(),
                        "authorization" => auth = value.trim().to_string(),
                        _ => {}
                    }
                }
                let mut body = vec![0; length];
                reader.read_exact(&mut body).unwrap();
                record
                    .lock()
                    .unwrap()
                    .push((auth, String::from_utf8(body).unwrap()));
                stream
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                    .unwrap();
            }
        }
    });
    (url, seen)
}

#[test]
fn progress_is_posted_with_the_bearer_token_and_a_dead_url_does_not_stop_training() {
    let dir = temp_dir("train", "progress");
    let images = instance_images(&dir);
    let (url, seen) = progress_endpoint();
    let tiny_sd1 = fixtures_dir().join("tiny-sd1");
    let args = |url: &str, out: &str| {
        imagegen()
            .args(["train", "--model", tiny_sd1.to_str().unwrap()])
            .args(["--images", images.to_str().unwrap()])
            .args(["--instance-prompt", "a photo of sks cat", "--steps", "3"])
            .args(["--resolution", "32", "--seed", "1", "--device", "cpu"])
            .args(["--progress-url", url, "--out"])
            .arg(dir.join(out))
            .env("IMAGEGEN_PROGRESS_TOKEN", "s3cret")
            .output()
            .unwrap()
    };
    let out = args(&url, "a");
    assert!(out.status.success());
    let stdout: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    assert_eq!(stdout.len(), 5, "started, 3 steps, done: {stdout:?}");
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen.iter()
            .map(|(_, body)| body.clone())
            .collect::<Vec<_>>(),
        stdout,
        "every event POSTed, in order"
    );
    assert!(seen.iter().all(|(auth, _)| auth == "Bearer s3cret"));

    // Nothing listens on port 9 of localhost.
    let out = args("http://127.0.0.1:9/progress", "b");
    assert!(out.status.success());
    assert!(dir
        .join("b")
        .join("pytorch_lora_weights.safetensors")
        .is_file());
    assert!(String::from_utf8(out.stderr)
        .unwrap()
        .contains("posting training progress failed"));
}

/// The trainer's unfused adapters compute what the inference path computes with the same
/// LoRA written to a file, loaded and fused (scale alpha / rank on both sides).
#[test]
fn unfused_training_adapters_equal_the_fused_file() {
    use imagegen_engine::train::lora_params::{write_tensors, TrainableLora};
    let dir = temp_dir("train", "unfused");
    let model = model("tiny-sd1");
    let lora = TrainableLora::new(&model, 4, 8.0, true, 5);
    // Draws go through the generator's lock: a draw outside it would shift the sequence of
    // a seeded training running beside this test.
    let sample = imagegen_engine::noise::with_seed(5, || {
        tch::no_grad(|| {
            for m in &lora.modules {
                let mut up = m.up.shallow_clone();
                let _ = up.normal_(0.0, 0.2);
            }
        });
        tch::Tensor::randn([1, 4, 8, 8], (Kind::Float, Device::Cpu))
    });
    let ids = model
        .text_encoder()
        .tokenizer
        .encode("a photo of sks cat")
        .unwrap();
    let ids = tch::Tensor::from_slice(&ids).unsqueeze(0);
    let forward = || {
        tch::no_grad(|| {
            model.unet.model.forward(
                &sample,
                500.0,
                &Conditioning::text(model.text_encoder().model.forward(&ids, 0)),
            )
        })
    };
    let base = forward();
    lora.attach(&model);
    let unfused = forward();
    TrainableLora::detach(&model);
    assert!(
        forward().equal(&base),
        "detaching restores the plain layers"
    );

    let file = dir.join("lora.safetensors");
    let mut metadata = std::collections::HashMap::new();
    metadata.insert(
        "lora_adapter_metadata".to_string(),
        lora.adapter_metadata().to_string(),
    );
    write_tensors(&file, &lora.diffusers_tensors(), metadata).unwrap();
    let loaded = Rc::new(Lora::load(&file, &model, false).unwrap());
    let fused = {
        let _fused = lora::fuse_loras(&model, &[(loaded, 1.0)]).unwrap();
        forward()
    };
    let change = common::max_abs_diff(&unfused, &base);
    let diff = common::max_abs_diff(&unfused, &fused);
    eprintln!("LoRA changes the UNet output by up to {change:.3e}; unfused vs fused {diff:.3e}");
    assert!(change > 1e-2, "the adapters changed nothing");
    assert!(diff < 1e-4, "unfused and fused differ by {diff:e}");
}
