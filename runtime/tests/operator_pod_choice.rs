//! The operator's choice of a pod against real runtimes: two `imagegen serve` processes on
//! the fixture model stand for two replicas of a model; the operator crate asks each its
//! load (`GET /v1/load`) and chooses as it does before every submission.

mod serve_support;

use std::time::{Duration, Instant};

use imagegen_crds::api::{GenerationRequest, JobState, LoraInput, ResponseFormat};
use imagegen_crds::generation::GenerationParams;
use imagegen_operator::api::image_generation::RuntimePod;
use imagegen_operator::dispatch;
use imagegen_operator::pod_choice::{self, ChoiceReason, Request};
use imagegen_operator::runtime_client::{HttpRuntime, RuntimeApi, Target};
use imagegen_operator::runtime_pods::PodEndpoint;
use serve_support::*;

const TENANT: &str = "team-a";
const TOKEN: &str = "pod-choice-token";

fn start(name: &str) -> Server {
    let dir = scratch(&format!("pod-choice-{name}"));
    let tokens = dir.join("tokens");
    std::fs::write(&tokens, format!("{TENANT}:{TOKEN}\n")).unwrap();
    let server = Server::start(
        name,
        Options {
            tokens: false,
            extra: vec!["--tokens-file".into(), tokens.display().to_string()],
            ..Options::default()
        },
    );
    // The tenant's LoRA `alice`, where a finished training leaves it (the store is shared
    // by a model's replicas: each stand-in gets the same file).
    let file = server
        .store
        .join(imagegen_crds::api::tenant_root(TENANT))
        .join(imagegen_crds::api::lora_file("alice"));
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    std::fs::copy(lora_fixture(), &file).unwrap();
    server
}

fn pod(name: &str, server: &Server) -> PodEndpoint {
    PodEndpoint {
        pod: RuntimePod {
            name: name.into(),
            address: server.base.trim_start_matches("http://").into(),
        },
        ready: true,
    }
}

fn target(server: &Server) -> Target {
    Target {
        base_url: server.base.clone(),
        token: TOKEN.into(),
    }
}

fn request(id: &str, steps: u32, size: u32, lora: bool) -> GenerationRequest {
    GenerationRequest {
        params: GenerationParams {
            prompt: "sks person".into(),
            steps: Some(steps),
            width: Some(size),
            height: Some(size),
            seed: Some(1),
            ..GenerationParams::default()
        },
        loras: if lora {
            vec![LoraInput {
                name: "alice".into(),
                weight: Some(0.8),
                path: Some(imagegen_crds::api::lora_file("alice")),
            }]
        } else {
            Vec::new()
        },
        job_id: Some(id.into()),
        response_format: Some(ResponseFormat::Url),
        ..GenerationRequest::default()
    }
}

async fn wait_state(runtime: &HttpRuntime, target: &Target, id: &str, done: fn(JobState) -> bool) {
    let started = Instant::now();
    loop {
        let job = runtime.job(target, id).await.unwrap();
        if done(job.state) {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "job {id}: {job:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn the_pod_with_the_lora_warm_wins_until_it_is_much_busier() {
    let (a, b) = (start("pod-a"), start("pod-b"));
    let pods = [pod("pod-a", &a), pod("pod-b", &b)];
    let runtime = HttpRuntime::new().unwrap();
    let lora = [imagegen_crds::api::lora_file("alice")];
    let with_lora = |job_id| Request {
        job_id,
        loras: &lora,
        avoid: None,
    };
    let plain = |job_id| Request {
        job_id,
        loras: &[],
        avoid: None,
    };

    // pod-a generates with the LoRA once: it stays loaded there.
    runtime
        .submit(&target(&a), &request("warm-up", 2, 64, true))
        .await
        .unwrap();
    wait_state(&runtime, &target(&a), "warm-up", JobState::is_finished).await;

    let loads = dispatch::loads(&runtime, TOKEN, &pods).await;
    assert_eq!(loads["pod-a"].loaded_loras, lora);
    assert!(loads["pod-b"].loaded_loras.is_empty());
    let choice = pod_choice::choose(&pods, |p| loads.get(p), with_lora("job-1"), 2).unwrap();
    assert_eq!(
        (choice.pod.name.as_str(), choice.reason),
        ("pod-a", ChoiceReason::LoraWarm)
    );
    // Without a LoRA, two idle pods are a tie.
    let choice = pod_choice::choose(&pods, |p| loads.get(p), plain("job-2"), 2).unwrap();
    assert_eq!(choice.reason, ChoiceReason::Spread);

    // pod-a gets busy: one slow job running and three queued behind it.
    for i in 0..4 {
        let id = format!("slow-{i}");
        runtime
            .submit(&target(&a), &request(&id, 200, 128, false))
            .await
            .unwrap();
    }
    wait_state(&runtime, &target(&a), "slow-0", |s| s != JobState::Queued).await;
    let loads = dispatch::loads(&runtime, TOKEN, &pods).await;
    assert_eq!((loads["pod-a"].running, loads["pod-a"].queued), (1, 3));
    // Four jobs ahead is more than the slack of 2 over idle pod-b: the LoRA gives way.
    let choice = pod_choice::choose(&pods, |p| loads.get(p), with_lora("job-3"), 2).unwrap();
    assert_eq!(
        (choice.pod.name.as_str(), choice.reason, choice.load),
        ("pod-b", ChoiceReason::LeastLoaded, Some(0))
    );
    // With a slack that covers them, it does not.
    let choice = pod_choice::choose(&pods, |p| loads.get(p), with_lora("job-3"), 8).unwrap();
    assert_eq!(choice.pod.name, "pod-a");

    for i in 0..4 {
        runtime
            .cancel(&target(&a), &format!("slow-{i}"))
            .await
            .unwrap();
    }
}
