//! add_noise and loops that start at a later step (image-to-image, inpainting) against
//! diffusers, for every scheduler.

mod common;

use common::{fixtures_dir, load_reference, max_abs_diff};
use imagegen_engine::schedulers::{self, SchedulerConfig, SchedulerKind};
use tch::{Device, Kind, Tensor};

const TOL: f64 = 1e-6;

#[derive(serde::Deserialize)]
struct Case {
    name: String,
    kind: String,
    steps: usize,
    config: serde_json::Value,
    starts: Vec<usize>,
    after_steps: Vec<usize>,
    file: String,
}

fn cases() -> Vec<Case> {
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures_dir().join("index.json")).unwrap())
            .unwrap();
    serde_json::from_value(index["scheduler_offsets"]["cases"].clone())
        .expect("scheduler_offsets in index.json")
}

fn build(case: &Case) -> Box<dyn schedulers::Scheduler> {
    let kind: SchedulerKind = case.kind.parse().unwrap();
    let config = SchedulerConfig::from_json_str(&case.config.to_string()).unwrap();
    schedulers::build(kind, &config, case.steps).unwrap()
}

fn check(what: &str, ours: &Tensor, reference: &Tensor) {
    let diff = max_abs_diff(ours, reference);
    assert!(diff <= TOL, "{what}: max abs diff {diff:e}");
}

#[test]
fn image_to_image_starts_match_diffusers() {
    let cases = cases();
    assert_eq!(cases.len(), 12, "six kinds, two configs");
    for case in &cases {
        let r = load_reference(&fixtures_dir().join(&case.file));
        for &start in &case.starts {
            let mut scheduler = build(case);
            let noisy = scheduler.add_noise(&r["original"], &r["noise"], start);
            check(
                &format!("{} start {start} add_noise", case.name),
                &noisy,
                &r[&format!("start{start}_noisy")],
            );
            // Ancestral noise: the generator seeded once, drawing one tensor per step taken.
            let total = scheduler.timesteps().len();
            let mut draws = imagegen_engine::noise::with_seed(123, || {
                (start..total)
                    .map(|_| Tensor::randn(noisy.size(), (Kind::Float, Device::Cpu)))
                    .collect::<Vec<_>>()
            })
            .into_iter();
            let mut latents = noisy;
            let expected = &r[&format!("start{start}_prev_samples")];
            for (i, step) in (start..total).enumerate() {
                let _ = scheduler.scale_model_input(&latents, step);
                let noise = draws.next().filter(|_| scheduler.needs_noise());
                latents = scheduler.step(
                    &r["model_outputs"].get(step as i64),
                    step,
                    &latents,
                    noise.as_ref(),
                );
                check(
                    &format!("{} start {start} step {step}", case.name),
                    &latents,
                    &expected.get(i as i64),
                );
            }
            assert_eq!(
                expected.size()[0] as usize,
                total - start,
                "{}: loop length",
                case.name
            );
        }
    }
}

#[test]
fn inpainting_renoise_matches_diffusers() {
    for case in &cases() {
        let r = load_reference(&fixtures_dir().join(&case.file));
        let scheduler = build(case);
        for &k in &case.after_steps {
            let noisy = scheduler.add_noise(&r["original"], &r["noise"], k);
            check(
                &format!("{} after {k} steps", case.name),
                &noisy,
                &r[&format!("after{k}_noisy")],
            );
        }
    }
}
