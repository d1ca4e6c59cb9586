//! The schedulers against diffusers: the recordings of `tests/fixtures/schedulers.py`
//! (`$IMAGEGEN_FIXTURES/references/schedulers`), plus unit tests of the interface.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use imagegen_engine::schedulers::{
    self, Scheduler, SchedulerConfig, SchedulerError, SchedulerKind, TimestepSpacing,
};
use serde::Deserialize;
use tch::{Device, Kind, Tensor};

/// Loop tensors (scaled inputs, previous samples) must match diffusers this closely.
const SAMPLE_TOLERANCE: f64 = 1e-6;
/// Timesteps must match this closely...
const TIMESTEP_TOLERANCE: f64 = 1e-6;
/// ... and init_noise_sigma relatively.
const INIT_NOISE_SIGMA_RTOL: f64 = 1e-6;

#[derive(Debug, Deserialize)]
struct Index {
    cases: Vec<Case>,
    sweeps: Vec<Sweep>,
}

#[derive(Debug, Deserialize)]
struct Case {
    name: String,
    kind: String,
    steps: usize,
    config_json: String,
    file: Option<String>,
    error: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Sweep {
    name: String,
    kind: String,
    variant: String,
    config_json: String,
    file: String,
    steps: Vec<usize>,
    errors: HashMap<String, String>,
}

fn references_dir() -> PathBuf {
    common::fixtures_dir().join("references").join("schedulers")
}

fn index() -> Index {
    let path = references_dir().join("index.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (generate it with tests/fixtures/schedulers.py)",
            path.display()
        )
    });
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn kind_of(name: &str) -> SchedulerKind {
    name.parse()
        .unwrap_or_else(|e| panic!("fixture kind {name}: {e}"))
}

/// Euler's Karras timesteps are not rounded and come from numpy's float32 logarithm of the
/// training sigmas, which numpy computes with its own SIMD code (not correctly rounded, and
/// different between CPUs); we use the correctly rounded logarithm, so these timesteps may
/// differ by a few float32 ulps (measured: at most 6.1e-5 at t = 593, 6.2e-7 relative).
const KARRAS_TIMESTEP_RTOL: f64 = 2e-6;

fn timestep_tolerance(kind: SchedulerKind, config: &SchedulerConfig, t: f64) -> f64 {
    if kind == SchedulerKind::Euler && config.use_karras_sigmas == Some(true) {
        TIMESTEP_TOLERANCE + KARRAS_TIMESTEP_RTOL * t.abs()
    } else {
        TIMESTEP_TOLERANCE
    }
}

fn tensor_values(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(
        t.to_kind(Kind::Double)
            .to_device(Device::Cpu)
            .flatten(0, -1),
    )
    .expect("a tensor of numbers")
}

/// Largest absolute difference, where NaN matches NaN and infinities match themselves (some
/// degenerate schedules make diffusers produce them, and we must too).
fn max_abs_diff(ours: &Tensor, reference: &Tensor) -> f64 {
    assert_eq!(ours.size(), reference.size(), "shape mismatch");
    tensor_values(ours)
        .into_iter()
        .zip(tensor_values(reference))
        .map(|(a, b)| match (a.is_nan(), b.is_nan()) {
            (true, true) => 0.0,
            (false, false) if a == b => 0.0,
            (false, false) => (a - b).abs(),
            _ => f64::INFINITY,
        })
        .fold(0.0, f64::max)
}

fn check_timesteps(
    what: &str,
    kind: SchedulerKind,
    config: &SchedulerConfig,
    scheduler: &dyn Scheduler,
    reference: &Tensor,
    reference_init_noise_sigma: f64,
) -> Result<f64, String> {
    let expected = tensor_values(reference);
    let ours = scheduler.timesteps();
    if ours.len() != expected.len() {
        return Err(format!(
            "{what}: {} timesteps {:?}.., diffusers has {} {:?}..",
            ours.len(),
            &ours[..ours.len().min(12)],
            expected.len(),
            &expected[..expected.len().min(12)],
        ));
    }
    let mut max_diff: f64 = 0.0;
    for (i, (&a, &b)) in ours.iter().zip(&expected).enumerate() {
        let diff = (a - b).abs();
        if diff > timestep_tolerance(kind, config, b) {
            return Err(format!("{what}: timestep {i} is {a}, diffusers {b}"));
        }
        max_diff = max_diff.max(diff);
    }
    let sigma = scheduler.init_noise_sigma();
    let rel = (sigma - reference_init_noise_sigma).abs() / reference_init_noise_sigma.abs();
    if rel > INIT_NOISE_SIGMA_RTOL {
        return Err(format!(
            "{what}: init_noise_sigma {sigma}, diffusers {reference_init_noise_sigma}"
        ));
    }
    Ok(max_diff)
}

#[derive(Default, Debug)]
struct Diffs {
    cases: usize,
    refused: usize,
    timesteps: f64,
    scaled_inputs: f64,
    prev_samples: f64,
}

/// Runs the recorded denoising loop through our scheduler, chaining our own samples.
fn run_case(
    kind: SchedulerKind,
    case: &Case,
    config: &SchedulerConfig,
    mut scheduler: Box<dyn Scheduler>,
    diffs: &mut Diffs,
) -> Result<(), String> {
    let file = case.file.as_ref().expect("a case without error has a file");
    let reference = common::load_reference(&references_dir().join(file));
    let get = |name: &str| {
        reference
            .get(name)
            .unwrap_or_else(|| panic!("{file}: no tensor {name}"))
    };
    let timestep_diff = check_timesteps(
        &case.name,
        kind,
        config,
        scheduler.as_ref(),
        get("timesteps"),
        get("init_noise_sigma").double_value(&[]),
    )?;
    diffs.timesteps = diffs.timesteps.max(timestep_diff);

    let latents = get("sample") * scheduler.init_noise_sigma();
    let diff = max_abs_diff(&latents, get("latents"));
    if diff > SAMPLE_TOLERANCE {
        return Err(format!("{}: initial latents differ by {diff:e}", case.name));
    }
    let (model_outputs, scaled_inputs, prev_samples) = (
        get("model_outputs"),
        get("scaled_inputs"),
        get("prev_samples"),
    );
    let noises = reference.get("noises");
    if scheduler.needs_noise() != noises.is_some() {
        return Err(format!(
            "{}: needs_noise() is {} but diffusers {} noise",
            case.name,
            scheduler.needs_noise(),
            if noises.is_some() {
                "draws"
            } else {
                "draws no"
            }
        ));
    }
    let mut sample = latents;
    for i in 0..scheduler.timesteps().len() {
        let index = i as i64;
        let scaled = scheduler.scale_model_input(&sample, i);
        let diff = max_abs_diff(&scaled, &scaled_inputs.get(index));
        diffs.scaled_inputs = diffs.scaled_inputs.max(diff);
        if diff > SAMPLE_TOLERANCE {
            return Err(format!(
                "{}: scaled input {i} differs by {diff:e}",
                case.name
            ));
        }
        let noise = noises.map(|noises| noises.get(index));
        sample = scheduler.step(&model_outputs.get(index), i, &sample, noise.as_ref());
        if sample.kind() != Kind::Float {
            return Err(format!(
                "{}: step {i} returned {:?}",
                case.name,
                sample.kind()
            ));
        }
        let diff = max_abs_diff(&sample, &prev_samples.get(index));
        diffs.prev_samples = diffs.prev_samples.max(diff);
        if diff > SAMPLE_TOLERANCE {
            return Err(format!(
                "{}: prev_sample {i} differs by {diff:e}",
                case.name
            ));
        }
    }
    diffs.cases += 1;
    Ok(())
}

fn check_kind(kind: SchedulerKind) {
    let index = index();
    let mut diffs = Diffs::default();
    let mut failures = Vec::new();
    let cases: Vec<&Case> = index
        .cases
        .iter()
        .filter(|c| c.kind == kind.name())
        .collect();
    assert!(!cases.is_empty(), "no {kind} cases in the fixtures");
    for case in cases {
        assert_eq!(kind_of(&case.kind), kind);
        let config = SchedulerConfig::from_json_str(&case.config_json)
            .unwrap_or_else(|e| panic!("{}: {e}", case.name));
        match (schedulers::build(kind, &config, case.steps), &case.error) {
            (Err(_), Some(_)) => diffs.refused += 1,
            (Ok(_), Some(error)) => failures.push(format!(
                "{}: diffusers fails ({error}) but we built a scheduler",
                case.name
            )),
            (Err(error), None) => failures.push(format!("{}: build failed: {error}", case.name)),
            (Ok(scheduler), None) => {
                if let Err(failure) = run_case(kind, case, &config, scheduler, &mut diffs) {
                    failures.push(failure);
                }
            }
        }
    }
    println!(
        "{kind}: {} cases match, {} refused like diffusers; max abs diff: timesteps {:e}, \
         scaled inputs {:e}, prev samples {:e}",
        diffs.cases, diffs.refused, diffs.timesteps, diffs.scaled_inputs, diffs.prev_samples
    );
    assert!(
        failures.is_empty(),
        "{} {kind} case(s) differ from diffusers:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn ddim_matches_diffusers() {
    check_kind(SchedulerKind::Ddim);
}

#[test]
fn pndm_matches_diffusers() {
    check_kind(SchedulerKind::Pndm);
}

#[test]
fn euler_matches_diffusers() {
    check_kind(SchedulerKind::Euler);
}

#[test]
fn euler_ancestral_matches_diffusers() {
    check_kind(SchedulerKind::EulerAncestral);
}

#[test]
fn dpmpp_2m_matches_diffusers() {
    check_kind(SchedulerKind::DpmPp2m);
}

#[test]
fn dpmpp_2m_karras_matches_diffusers() {
    check_kind(SchedulerKind::DpmPp2mKarras);
}

/// Timesteps and init_noise_sigma for many step counts, and the step counts diffusers cannot
/// run (which `build` must refuse).
#[test]
fn timestep_sweeps_match_diffusers() {
    let index = index();
    assert!(!index.sweeps.is_empty(), "no sweeps in the fixtures");
    let mut failures = Vec::new();
    let mut checked = 0;
    for sweep in &index.sweeps {
        let kind = kind_of(&sweep.kind);
        let config = SchedulerConfig::from_json_str(&sweep.config_json)
            .unwrap_or_else(|e| panic!("{}: {e}", sweep.name));
        let reference = common::load_reference(&references_dir().join(&sweep.file));
        for &steps in &sweep.steps {
            let what = format!("{} ({}), {steps} steps", sweep.name, sweep.variant);
            match schedulers::build(kind, &config, steps) {
                Err(error) => failures.push(format!("{what}: build failed: {error}")),
                Ok(scheduler) => {
                    let timesteps = &reference[&format!("timesteps_{steps}")];
                    let sigma = reference[&format!("init_noise_sigma_{steps}")].double_value(&[]);
                    if let Err(failure) =
                        check_timesteps(&what, kind, &config, scheduler.as_ref(), timesteps, sigma)
                    {
                        failures.push(failure);
                    }
                }
            }
            checked += 1;
        }
        for (steps, error) in &sweep.errors {
            let steps: usize = steps.parse().expect("a step count");
            if schedulers::build(kind, &config, steps).is_ok() {
                failures.push(format!(
                    "{}, {steps} steps: diffusers fails ({error}) but we built a scheduler",
                    sweep.name
                ));
            }
            checked += 1;
        }
    }
    println!("timestep sweeps: {checked} schedules checked");
    assert!(
        failures.is_empty(),
        "{} schedule(s) differ from diffusers:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// The recorded ancestral noises are what libtorch's CPU generator seeded with 123 draws, so
/// the runtime's seeded draws reproduce diffusers' `generator=torch.Generator("cpu")`.
#[test]
fn ancestral_noise_is_torch_cpu_generator_output() {
    let index = index();
    let case = index
        .cases
        .iter()
        .filter(|c| c.kind == SchedulerKind::EulerAncestral.name() && c.error.is_none())
        .max_by_key(|c| c.steps)
        .expect("an euler-a case");
    let reference = common::load_reference(&references_dir().join(case.file.as_ref().unwrap()));
    let noises = &reference["noises"];
    let count = noises.size()[0];
    let shape = &noises.size()[1..];
    let draws: Vec<Tensor> = imagegen_engine::noise::with_seed(123, || {
        (0..count)
            .map(|_| Tensor::randn(shape, (Kind::Float, Device::Cpu)))
            .collect()
    });
    for (i, draw) in (0..count).zip(&draws) {
        let diff = max_abs_diff(draw, &noises.get(i));
        assert_eq!(diff, 0.0, "{}: draw {i} differs by {diff:e}", case.name);
    }
}

// ---------------------------------------------------------------------------------------
// The interface
// ---------------------------------------------------------------------------------------

const SD15_CONFIG: &str = r#"{
  "_class_name": "PNDMScheduler",
  "_diffusers_version": "0.6.0",
  "beta_end": 0.012,
  "beta_schedule": "scaled_linear",
  "beta_start": 0.00085,
  "num_train_timesteps": 1000,
  "set_alpha_to_one": false,
  "skip_prk_steps": true,
  "steps_offset": 1,
  "trained_betas": null,
  "clip_sample": false
}"#;

fn sd15() -> SchedulerConfig {
    SchedulerConfig::from_json_str(SD15_CONFIG).expect("SD1.5's config parses")
}

#[test]
fn kind_names_round_trip() {
    for kind in SchedulerKind::ALL {
        assert_eq!(kind.name().parse::<SchedulerKind>().unwrap(), kind);
        assert_eq!(kind.to_string(), kind.name());
    }
    let names: Vec<&str> = SchedulerKind::ALL.iter().map(|k| k.name()).collect();
    assert_eq!(
        names,
        [
            "ddim",
            "pndm",
            "euler",
            "euler-a",
            "dpmpp-2m",
            "dpmpp-2m-karras"
        ]
    );
}

#[test]
fn unknown_kind_error_lists_valid_names() {
    let error = "euler_a".parse::<SchedulerKind>().unwrap_err();
    assert!(matches!(error, SchedulerError::UnknownKind(ref name) if name == "euler_a"));
    let message = error.to_string();
    assert!(message.contains("euler_a"), "{message}");
    for kind in SchedulerKind::ALL {
        assert!(message.contains(kind.name()), "{message}");
    }
}

#[test]
fn kind_from_class_name() {
    let with = |json: &str| SchedulerConfig::from_json_str(json).unwrap();
    assert_eq!(
        SchedulerKind::from_class_name(&sd15()),
        Some(SchedulerKind::Pndm)
    );
    for (class, kind) in [
        ("DDIMScheduler", SchedulerKind::Ddim),
        ("EulerDiscreteScheduler", SchedulerKind::Euler),
        (
            "EulerAncestralDiscreteScheduler",
            SchedulerKind::EulerAncestral,
        ),
        ("DPMSolverMultistepScheduler", SchedulerKind::DpmPp2m),
    ] {
        let config = with(&format!(r#"{{"_class_name": "{class}"}}"#));
        assert_eq!(
            SchedulerKind::from_class_name(&config),
            Some(kind),
            "{class}"
        );
    }
    let karras =
        with(r#"{"_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": true}"#);
    assert_eq!(
        SchedulerKind::from_class_name(&karras),
        Some(SchedulerKind::DpmPp2mKarras)
    );
    let karras_euler =
        with(r#"{"_class_name": "EulerDiscreteScheduler", "use_karras_sigmas": true}"#);
    assert_eq!(
        SchedulerKind::from_class_name(&karras_euler),
        Some(SchedulerKind::Euler)
    );
    assert_eq!(
        SchedulerKind::from_class_name(&with(r#"{"_class_name": "LMSDiscreteScheduler"}"#)),
        None
    );
    assert_eq!(SchedulerKind::from_class_name(&with("{}")), None);
}

#[test]
fn config_parses_diffusers_json() {
    let config = sd15();
    assert_eq!(config.class_name.as_deref(), Some("PNDMScheduler"));
    assert_eq!(config.beta_start, Some(0.00085));
    assert_eq!(config.steps_offset, Some(1));
    assert_eq!(config.trained_betas, None);
    assert_eq!(config.timestep_spacing, None);
    // Python's json writes non-finite floats bare; strings containing them stay strings.
    let config = SchedulerConfig::from_json_str(
        r#"{"lambda_min_clipped": -Infinity, "sigma_max": Infinity, "_note": "NaN \" -Infinity",
            "timestep_spacing": "trailing", "beta_start": 1e-4}"#,
    )
    .unwrap();
    assert_eq!(config.lambda_min_clipped, Some(f64::NEG_INFINITY));
    assert_eq!(config.sigma_max, Some(f64::INFINITY));
    assert_eq!(config.timestep_spacing, Some(TimestepSpacing::Trailing));
    assert!(SchedulerConfig::from_json_str(r#"{"steps_offset": "one"}"#).is_err());
    let dir = std::env::temp_dir().join(format!("scheduler-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("scheduler_config.json");
    std::fs::write(&path, SD15_CONFIG).unwrap();
    assert_eq!(SchedulerConfig::from_file(&path).unwrap(), sd15());
    std::fs::remove_dir_all(&dir).unwrap();
    let missing = SchedulerConfig::from_file(dir.join("nope.json")).unwrap_err();
    assert!(missing.to_string().contains("nope.json"), "{missing}");
}

/// A config without timestep_spacing means "leading" to DDIM and PNDM but "linspace" to the
/// Euler and DPM-Solver schedulers (their diffusers defaults).
#[test]
fn absent_keys_take_each_class_default() {
    let timesteps = |kind| {
        schedulers::build(kind, &sd15(), 4)
            .unwrap()
            .timesteps()
            .to_vec()
    };
    assert_eq!(timesteps(SchedulerKind::Ddim), [751.0, 501.0, 251.0, 1.0]);
    assert_eq!(
        timesteps(SchedulerKind::Pndm),
        [751.0, 501.0, 501.0, 251.0, 1.0]
    );
    assert_eq!(timesteps(SchedulerKind::Euler), [999.0, 666.0, 333.0, 0.0]);
    assert_eq!(
        timesteps(SchedulerKind::EulerAncestral),
        [999.0, 666.0, 333.0, 0.0]
    );
    assert_eq!(
        timesteps(SchedulerKind::DpmPp2m),
        [999.0, 749.0, 500.0, 250.0]
    );
    // Karras sigmas pick their own timesteps.
    assert_eq!(timesteps(SchedulerKind::DpmPp2mKarras)[0], 999.0);
    // DDIM's own defaults: set_alpha_to_one and clip_sample on, linear betas.
    let empty = SchedulerConfig::default();
    assert_eq!(
        schedulers::build(SchedulerKind::Ddim, &empty, 2)
            .unwrap()
            .timesteps(),
        [500.0, 0.0]
    );
    // PNDM without skip_prk_steps runs 12 Runge-Kutta evaluations first.
    assert_eq!(
        schedulers::build(SchedulerKind::Pndm, &empty, 10)
            .unwrap()
            .timesteps()
            .len(),
        12 + 7
    );
    // Euler ancestral starts from pure noise at sigma_max, others from unit variance.
    let sigma = |kind| {
        schedulers::build(kind, &sd15(), 4)
            .unwrap()
            .init_noise_sigma()
    };
    assert_eq!(sigma(SchedulerKind::Ddim), 1.0);
    assert_eq!(sigma(SchedulerKind::DpmPp2m), 1.0);
    assert!((sigma(SchedulerKind::Euler) - 14.6146).abs() < 1e-3);
}

#[test]
fn needs_noise_only_for_ancestral() {
    for kind in SchedulerKind::ALL {
        let scheduler = schedulers::build(kind, &sd15(), 10).unwrap();
        assert_eq!(
            scheduler.needs_noise(),
            kind == SchedulerKind::EulerAncestral,
            "{kind}"
        );
    }
}

#[test]
fn build_rejects_what_it_cannot_run() {
    for kind in SchedulerKind::ALL {
        for steps in [0, 1001] {
            let error = schedulers::build(kind, &sd15(), steps).err().unwrap();
            assert!(
                matches!(error, SchedulerError::InvalidSteps { .. }),
                "{kind}: {error}"
            );
            assert!(error.to_string().contains("num_inference_steps"), "{error}");
        }
    }
    let rejected = |kind, json: &str, key: &str| {
        let config = SchedulerConfig::from_json_str(json).unwrap();
        let error = schedulers::build(kind, &config, 10)
            .err()
            .unwrap_or_else(|| {
                panic!("{kind} accepted {json}");
            });
        assert!(error.to_string().contains(key), "{kind}, {json}: {error}");
    };
    for kind in SchedulerKind::ALL {
        rejected(kind, r#"{"beta_schedule": "sigmoid"}"#, "beta_schedule");
        rejected(
            kind,
            r#"{"prediction_type": "flow_prediction"}"#,
            "prediction_type",
        );
        rejected(kind, r#"{"timestep_spacing": "sqrt"}"#, "timestep_spacing");
        rejected(kind, r#"{"trained_betas": [0.1, 0.2]}"#, "trained_betas");
    }
    rejected(
        SchedulerKind::Pndm,
        r#"{"prediction_type": "sample"}"#,
        "prediction_type",
    );
    rejected(
        SchedulerKind::EulerAncestral,
        r#"{"prediction_type": "sample"}"#,
        "prediction_type",
    );
    rejected(
        SchedulerKind::Euler,
        r#"{"interpolation_type": "log_linear"}"#,
        "interpolation_type",
    );
    rejected(
        SchedulerKind::Euler,
        r#"{"use_exponential_sigmas": true}"#,
        "use_exponential_sigmas",
    );
    rejected(
        SchedulerKind::DpmPp2m,
        r#"{"use_lu_lambdas": true}"#,
        "use_lu_lambdas",
    );
    rejected(
        SchedulerKind::DpmPp2m,
        r#"{"final_sigmas_type": "one"}"#,
        "final_sigmas_type",
    );
    rejected(
        SchedulerKind::DpmPp2m,
        r#"{"variance_type": "learned_range"}"#,
        "variance_type",
    );
    // PRK needs four steps; leading spacing with steps_offset 1 cannot do 1000 DDIM steps.
    let empty = SchedulerConfig::default();
    assert!(schedulers::build(SchedulerKind::Pndm, &empty, 3).is_err());
    assert!(schedulers::build(SchedulerKind::Ddim, &sd15(), 1000).is_err());
}

/// Steps return the sample's dtype and device (the runtime also runs fp16 on CUDA), and an
/// fp16 loop stays close to the float32 one.
#[test]
fn steps_keep_dtype_and_device() {
    let mut devices = vec![(Device::Cpu, Kind::Half), (Device::Cpu, Kind::Double)];
    if tch::Cuda::is_available() {
        devices.push((Device::Cuda(0), Kind::Half));
        devices.push((Device::Cuda(0), Kind::Float));
    }
    let shape = [1i64, 4, 8, 8];
    let pattern = |phase: f64| {
        (Tensor::arange(256, (Kind::Float, Device::Cpu)) * 0.37 + phase)
            .sin()
            .view(shape)
    };
    for kind in SchedulerKind::ALL {
        let run = |device: Device, dtype: Kind| {
            let mut scheduler = schedulers::build(kind, &sd15(), 8).unwrap();
            let mut sample = (pattern(0.0) * scheduler.init_noise_sigma())
                .to_device(device)
                .to_kind(dtype);
            for i in 0..scheduler.timesteps().len() {
                let scaled = scheduler.scale_model_input(&sample, i);
                assert_eq!((scaled.kind(), scaled.device()), (dtype, device), "{kind}");
                let model_output = pattern(i as f64).to_device(device).to_kind(dtype);
                let noise = scheduler
                    .needs_noise()
                    .then(|| pattern(100.0 + i as f64).to_device(device).to_kind(dtype));
                sample = scheduler.step(&model_output, i, &sample, noise.as_ref());
                assert_eq!(
                    (sample.kind(), sample.device()),
                    (dtype, device),
                    "{kind} step {i}"
                );
            }
            sample.to_kind(Kind::Float).to_device(Device::Cpu)
        };
        let reference = run(Device::Cpu, Kind::Float);
        for &(device, dtype) in &devices {
            let result = run(device, dtype);
            let diff = max_abs_diff(&result, &reference);
            let scale = tensor_values(&reference)
                .iter()
                .fold(1.0f64, |m, v| m.max(v.abs()));
            let tolerance = if dtype == Kind::Half {
                2e-2 * scale
            } else {
                1e-4 * scale
            };
            assert!(
                diff <= tolerance,
                "{kind} on {device:?} in {dtype:?} differs from float32 by {diff:e}"
            );
        }
    }
}
