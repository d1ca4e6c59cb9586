//! Which ready pod of a model a new job goes to, from what each pod says of its load
//! (`GET /v1/load`). The policy, in order:
//!
//! 1. **LoRA-warm**: a pod that has the request's LoRAs loaded, or queued by a job ahead,
//!    skips loading them (a LoRA costs a file read and, on a GPU, hundreds of milliseconds
//!    to fuse). The pod with most of them wins, but only while its load stays within
//!    `slack` jobs of the least-loaded pod: affinity must not pile a popular LoRA's
//!    traffic onto one pod while others idle.
//! 2. **Least-loaded**: fewest queued plus running jobs. A pod whose device is held by a
//!    training counts as [`TRAINING_LOAD`] jobs more; a pod whose queue is full is left
//!    out while another has room (it would answer 429).
//! 3. **Spread**: among equals, rendezvous hashing of the job id over pod names, so that
//!    ties spread evenly and a retried submission of the same job picks the same pod while
//!    the pods stay the same.
//!
//! A pod that did not say its load (no answer within the timeout) ranks after every pod
//! that did, and is still chosen when no other is ready.

use imagegen_crds::api::RuntimeLoad;

use crate::api::image_generation::RuntimePod;
use crate::runtime_pods::{rendezvous_weight, PodEndpoint};

/// The jobs a running training counts as: it holds the device for minutes.
pub const TRAINING_LOAD: u64 = 1000;
/// The load of a pod that did not answer: after every pod that did.
const UNKNOWN_LOAD: u64 = u64::MAX / 2;

/// Why a pod was chosen: a metric label, and the submission's message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChoiceReason {
    /// It had some of the request's LoRAs loaded or queued.
    LoraWarm,
    /// It was the only least-loaded pod.
    LeastLoaded,
    /// Several were equally loaded: the job id's hash picked it.
    Spread,
    /// No ready pod said its load.
    LoadUnknown,
}

impl ChoiceReason {
    pub fn label(self) -> &'static str {
        match self {
            ChoiceReason::LoraWarm => "lora_warm",
            ChoiceReason::LeastLoaded => "least_loaded",
            ChoiceReason::Spread => "spread",
            ChoiceReason::LoadUnknown => "load_unknown",
        }
    }
}

/// The chosen pod, why, and the load it had.
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    pub pod: RuntimePod,
    pub reason: ChoiceReason,
    /// Queued plus running jobs of the pod when chosen (`None`: unknown).
    pub load: Option<u64>,
    /// The request's LoRAs that the pod had warm.
    pub warm_loras: usize,
    /// Recent seconds per job of the pod (`None`: unknown).
    pub seconds_per_job: Option<f64>,
}

/// The jobs a pod's load counts as.
pub fn jobs(load: &RuntimeLoad) -> u64 {
    let training = if load.trainings.running {
        TRAINING_LOAD
    } else {
        0
    };
    u64::from(load.queued) + u64::from(load.running) + training
}

fn is_full(load: &RuntimeLoad) -> bool {
    load.queue_capacity > 0 && load.queued >= load.queue_capacity
}

/// How many of `loras` (store paths relative to the tenant's root) the pod has loaded or
/// queued.
fn warm(load: &RuntimeLoad, loras: &[String]) -> usize {
    loras
        .iter()
        .filter(|l| load.loaded_loras.contains(l) || load.queued_loras.contains(l))
        .count()
}

/// What a job asks of the choice.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub job_id: &'a str,
    /// Its LoRAs, as store paths relative to the tenant's root.
    pub loras: &'a [String],
    /// A pod that lost this job before: another is taken when one is ready.
    pub avoid: Option<&'a str>,
}

/// The pod for `request` among the ready `pods`, given the loads that answered
/// (`load(pod_name)`); `None` when no pod is ready.
pub fn choose<'a>(
    pods: &[PodEndpoint],
    load: impl Fn(&str) -> Option<&'a RuntimeLoad>,
    request: Request,
    slack: u64,
) -> Option<Choice> {
    let (job_id, loras) = (request.job_id, request.loras);
    struct Ranked<'a> {
        pod: &'a RuntimePod,
        jobs: Option<u64>,
        warm: usize,
        full: bool,
        seconds_per_job: Option<f64>,
    }
    let others_ready = pods
        .iter()
        .any(|p| p.ready && Some(p.pod.name.as_str()) != request.avoid);
    let ranked: Vec<Ranked> = pods
        .iter()
        .filter(|p| p.ready && !(others_ready && Some(p.pod.name.as_str()) == request.avoid))
        .map(|p| {
            let load = load(&p.pod.name);
            Ranked {
                pod: &p.pod,
                jobs: load.map(jobs),
                warm: load.map_or(0, |l| warm(l, loras)),
                full: load.is_some_and(is_full),
                seconds_per_job: load.map(|l| l.seconds_per_job),
            }
        })
        .collect();
    let with_room: Vec<&Ranked> = ranked.iter().filter(|r| !r.full).collect();
    let candidates: Vec<&Ranked> = if with_room.is_empty() {
        ranked.iter().collect()
    } else {
        with_room
    };
    let least = candidates.iter().filter_map(|r| r.jobs).min();
    let affinity = |r: &Ranked| match (r.jobs, least) {
        (Some(jobs), Some(least)) if jobs <= least.saturating_add(slack) => r.warm,
        _ => 0,
    };
    let key = |r: &Ranked| {
        (
            affinity(r),
            std::cmp::Reverse(r.jobs.unwrap_or(UNKNOWN_LOAD)),
            rendezvous_weight(job_id, &r.pod.name),
        )
    };
    let best = candidates.iter().max_by_key(|r| key(r))?;
    let reason = if least.is_none() {
        ChoiceReason::LoadUnknown
    } else if affinity(best) > 0 {
        ChoiceReason::LoraWarm
    } else if candidates.iter().filter(|r| r.jobs == best.jobs).count() > 1 {
        ChoiceReason::Spread
    } else {
        ChoiceReason::LeastLoaded
    };
    Some(Choice {
        pod: best.pod.clone(),
        reason,
        load: best.jobs,
        warm_loras: best.warm,
        seconds_per_job: best.seconds_per_job,
    })
}

/// Why a new job should wait for a pod that is starting rather than join the queue of the
/// `choice` (a ready pod), if it should: `starting` more pods are on their way (the queue
/// needs more replicas than are ready), the chosen pod already has `per_replica` jobs or
/// more, and those jobs would take longer than a pod takes to start (`pod_start`, as the
/// model's last cold start measured it). A short queue is better joined at once; a long
/// one, left to the fresh pod. The caller bounds the wait (a pod that never becomes ready
/// must not hold jobs back for ever).
pub fn wait_for_starting_pod(
    choice: &Choice,
    starting: u32,
    per_replica: u32,
    pod_start: std::time::Duration,
) -> Option<String> {
    let jobs = choice.load?;
    let wait_here = jobs as f64 * choice.seconds_per_job?;
    let hold =
        starting > 0 && jobs >= u64::from(per_replica) && wait_here >= pod_start.as_secs_f64();
    hold.then(|| {
        format!(
            "the least busy ready pod has {jobs} jobs ahead (about {wait_here:.0}s), and \
             {starting} more pod(s) are starting (about {}s): waiting for one",
            pod_start.as_secs()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use imagegen_crds::api::TrainingLoad;
    use std::collections::{BTreeMap, HashMap};

    fn pod(name: &str, ready: bool) -> PodEndpoint {
        PodEndpoint {
            pod: RuntimePod {
                name: name.into(),
                address: format!("10.0.0.{}:8080", name.len()),
            },
            ready,
        }
    }

    fn load(queued: u32, running: u32, loaded: &[&str]) -> RuntimeLoad {
        RuntimeLoad {
            queued,
            queue_capacity: 8,
            running,
            loaded_loras: loaded.iter().map(|s| s.to_string()).collect(),
            seconds_per_job: 1.0,
            device: "cpu".into(),
            ..RuntimeLoad::default()
        }
    }

    fn pick(
        pods: &[PodEndpoint],
        loads: &HashMap<&str, RuntimeLoad>,
        loras: &[&str],
        job: &str,
    ) -> Choice {
        let loras: Vec<String> = loras.iter().map(|s| s.to_string()).collect();
        let request = Request {
            job_id: job,
            loras: &loras,
            avoid: None,
        };
        choose(pods, |name| loads.get(name), request, 2).unwrap()
    }

    #[test]
    fn a_resubmitted_job_avoids_the_pod_that_lost_it() {
        let pods = [pod("a", true), pod("b", true)];
        let loads = HashMap::from([("a", load(0, 0, &[])), ("b", load(3, 1, &[]))]);
        let mut request = Request {
            job_id: "job-1",
            loras: &[],
            avoid: Some("a"),
        };
        let choice = choose(&pods, |n| loads.get(n), request, 2).unwrap();
        assert_eq!(choice.pod.name, "b");
        // Unless it is the only one ready.
        let choice = choose(&pods[..1], |n| loads.get(n), request, 2).unwrap();
        assert_eq!(choice.pod.name, "a");
        request.avoid = None;
        assert_eq!(
            choose(&pods, |n| loads.get(n), request, 2)
                .unwrap()
                .pod
                .name,
            "a"
        );
    }

    const ALICE: &str = "loras/alice/pytorch_lora_weights.safetensors";

    #[test]
    fn the_pod_with_the_lora_wins_within_the_slack() {
        let pods = [pod("a", true), pod("b", true), pod("c", true)];
        let loads = HashMap::from([
            ("a", load(0, 0, &[])),
            ("b", load(1, 1, &[ALICE])),
            ("c", load(0, 1, &[])),
        ]);
        let choice = pick(&pods, &loads, &[ALICE], "job-1");
        assert_eq!(
            (choice.pod.name.as_str(), choice.reason, choice.warm_loras),
            ("b", ChoiceReason::LoraWarm, 1)
        );
        // A LoRA queued by a job ahead is as good as loaded.
        let mut queued = load(0, 1, &[]);
        queued.queued_loras = vec![ALICE.into()];
        let loads = HashMap::from([("a", load(0, 0, &[])), ("c", queued)]);
        assert_eq!(pick(&pods, &loads, &[ALICE], "job-1").pod.name, "c");
    }

    #[test]
    fn affinity_gives_way_when_its_pod_is_much_busier() {
        let pods = [pod("a", true), pod("b", true)];
        let loads = HashMap::from([("a", load(0, 0, &[])), ("b", load(3, 1, &[ALICE]))]);
        let choice = pick(&pods, &loads, &[ALICE], "job-1");
        assert_eq!(
            (choice.pod.name.as_str(), choice.reason, choice.load),
            ("a", ChoiceReason::LeastLoaded, Some(0))
        );
    }

    #[test]
    fn least_loaded_then_trainings_and_full_queues_last() {
        let pods = [pod("a", true), pod("b", true), pod("c", true)];
        let mut training = load(0, 0, &[]);
        training.trainings = TrainingLoad {
            running: true,
            queued: 0,
        };
        let full = load(8, 1, &[]);
        let loads = HashMap::from([("a", training), ("b", load(2, 1, &[])), ("c", full)]);
        let choice = pick(&pods, &loads, &[], "job-1");
        assert_eq!(
            (choice.pod.name.as_str(), choice.reason),
            ("b", ChoiceReason::LeastLoaded)
        );
        // Every queue full: the least full is still a choice (its 429 says to retry).
        let loads = HashMap::from([("b", load(8, 1, &[])), ("c", load(9, 1, &[]))]);
        assert_eq!(pick(&pods[1..], &loads, &[], "job-1").pod.name, "b");
    }

    #[test]
    fn unready_pods_are_never_chosen_and_unknown_loads_come_last() {
        let pods = [pod("a", false), pod("b", true), pod("c", true)];
        let loads = HashMap::from([("a", load(0, 0, &[ALICE])), ("c", load(5, 1, &[]))]);
        assert_eq!(pick(&pods, &loads, &[ALICE], "job-1").pod.name, "c");
        let none = HashMap::new();
        let choice = pick(&pods, &none, &[], "job-1");
        assert_eq!(choice.reason, ChoiceReason::LoadUnknown);
        assert_ne!(choice.pod.name, "a");
        let request = Request {
            job_id: "job-1",
            loras: &[],
            avoid: None,
        };
        assert!(choose(&pods[..1], |_| None, request, 2).is_none());
    }

    #[test]
    fn ties_spread_evenly_and_stably_by_job_id() {
        let pods = [pod("a", true), pod("b", true), pod("c", true)];
        let loads = HashMap::from([
            ("a", load(1, 1, &[])),
            ("b", load(1, 1, &[])),
            ("c", load(1, 1, &[])),
        ]);
        let mut counts = BTreeMap::new();
        for i in 0..300 {
            let choice = pick(&pods, &loads, &[], &format!("job-{i}"));
            assert_eq!(choice.reason, ChoiceReason::Spread);
            *counts.entry(choice.pod.name).or_insert(0) += 1;
        }
        assert_eq!(counts.len(), 3);
        assert!(counts.values().all(|n| *n >= 70), "{counts:?}");
        assert_eq!(
            pick(&pods, &loads, &[], "job-7"),
            pick(&pods, &loads, &[], "job-7")
        );
        // Rendezvous: a pod leaving moves only its own jobs.
        for i in 0..100 {
            let job = format!("job-{i}");
            let before = pick(&pods, &loads, &[], &job).pod.name;
            let after = pick(&pods[..2], &loads, &[], &job).pod.name;
            if before != "c" {
                assert_eq!(before, after);
            }
        }
    }

    #[test]
    fn busy_pods_wait_for_the_ones_starting_when_their_queue_is_longer() {
        let pods = [pod("a", true)];
        let mut busy = load(9, 1, &[]);
        busy.seconds_per_job = 2.0;
        let loads = HashMap::from([("a", busy)]);
        let choice = pick(&pods, &loads, &[], "job-1");
        let start = std::time::Duration::from_secs(15);
        // Ten jobs of 2 s ahead: longer than a pod's 15 s start.
        assert!(wait_for_starting_pod(&choice, 1, 2, start).is_some_and(|w| w.contains("10 jobs")));
        // Nothing starting, or a start slower than the queue: join the queue.
        assert_eq!(wait_for_starting_pod(&choice, 0, 2, start), None);
        let slow_start = std::time::Duration::from_secs(60);
        assert_eq!(wait_for_starting_pod(&choice, 1, 2, slow_start), None);
        // Fewer jobs than a replica's share: no wait.
        assert_eq!(wait_for_starting_pod(&choice, 1, 11, start), None);
    }

    #[test]
    fn a_queue_filling_one_job_at_a_time_stays_even() {
        // What the operator sees when it submits a burst one job after another.
        let pods = [pod("a", true), pod("b", true), pod("c", true)];
        let mut loads: HashMap<&str, RuntimeLoad> =
            ["a", "b", "c"].map(|n| (n, load(0, 0, &[]))).into();
        for i in 0..30 {
            let choice = pick(&pods, &loads, &[], &format!("job-{i}"));
            loads.get_mut(choice.pod.name.as_str()).unwrap().queued += 1;
        }
        let queued: Vec<u32> = ["a", "b", "c"].iter().map(|n| loads[n].queued).collect();
        assert_eq!(queued, [10, 10, 10]);
    }
}
