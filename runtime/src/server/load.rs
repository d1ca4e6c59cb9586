//! `GET /v1/load`: how busy this runtime is, for a caller choosing where to submit. It is
//! asked before every submission, so it reads only the job tables and figures the engine
//! worker publishes after its own work ([`Warm`]): no device call, no wait for the engine
//! thread, no process.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use imagegen_crds::api::{DeviceMemory, RuntimeLoad, TrainingLoad};
use tch::Device;

use super::device::Holder;
use super::error::ApiError;
use super::Shared;

/// What the engine worker publishes for `GET /v1/load`: its LoRA cache lives on its own
/// thread (not `Send`), and the GPU's memory is only known from a query after a job.
#[derive(Default)]
pub struct Warm {
    /// (tenant, store path) of every LoRA in the engine's cache.
    loras: Mutex<Vec<(String, String)>>,
    memory: Mutex<Option<DeviceMemory>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere must not turn every later load request into one.
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl Warm {
    pub fn set_memory(&self, memory: DeviceMemory) {
        *lock(&self.memory) = Some(memory);
    }

    fn memory(&self) -> Option<DeviceMemory> {
        *lock(&self.memory)
    }

    /// `tenant`'s loaded LoRAs, as store paths.
    fn loras_of(&self, tenant: &str) -> Vec<String> {
        lock(&self.loras)
            .iter()
            .filter(|(owner, _)| owner == tenant)
            .map(|(_, path)| path.clone())
            .collect()
    }
}

/// The worker's side: which tenant's store path each cached LoRA file came from (the cache
/// knows files only).
#[derive(Default)]
pub struct LoraOwners {
    by_file: HashMap<PathBuf, BTreeSet<(String, String)>>,
}

impl LoraOwners {
    /// `file` (the cache's key for it) was loaded for `tenant` as `store_path`.
    pub fn record(&mut self, file: PathBuf, tenant: &str, store_path: &str) {
        self.by_file
            .entry(file)
            .or_default()
            .insert((tenant.to_string(), store_path.to_string()));
    }

    /// Publishes the owners of the files the cache holds now, and forgets the others.
    pub fn publish<'a>(&mut self, cached: impl Iterator<Item = &'a Path>, warm: &Warm) {
        let cached: BTreeSet<&Path> = cached.collect();
        self.by_file
            .retain(|file, _| cached.contains(file.as_path()));
        let loras: BTreeSet<(String, String)> = self.by_file.values().flatten().cloned().collect();
        *lock(&warm.loras) = loras.into_iter().collect();
    }
}

/// How `GET /v1/load` names a device: `cpu`, `cuda:0`, `mps`.
pub fn device_name(device: Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(index) => format!("cuda:{index}"),
        Device::Mps => "mps".into(),
        Device::Vulkan => "vulkan".into(),
    }
}

/// The load as `tenant` sees it. A runtime that takes no submissions (model loading,
/// shutting down) answers 503 like a submission would: an idle-looking answer would draw
/// work to it.
pub fn runtime_load(shared: &Shared, tenant: &str) -> Result<RuntimeLoad, ApiError> {
    if shared.jobs.is_shutting_down() {
        return Err(ApiError::shutting_down());
    }
    let Some(model) = shared.model.get().filter(|_| shared.ready()) else {
        return Err(ApiError::unavailable("the model is loading"));
    };
    let queue = shared.jobs.load(tenant);
    let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    Ok(RuntimeLoad {
        queued: count(queue.queued),
        queue_capacity: count(shared.config.queue_size),
        running: count(queue.running),
        running_jobs: queue.running_jobs,
        loaded_loras: shared.warm.loras_of(tenant),
        queued_loras: queue.queued_loras,
        seconds_per_job: queue.seconds_per_job,
        trainings: TrainingLoad {
            running: shared.device.holder() == Some(Holder::Training),
            queued: count(shared.trainings.depth()),
        },
        device: device_name(model.device),
        device_memory: shared.warm.memory(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_loras_follow_the_cache_and_their_tenant() {
        let warm = Warm::default();
        let mut owners = LoraOwners::default();
        let (a, b) = (PathBuf::from("/s/alice/a"), PathBuf::from("/s/bob/b"));
        owners.record(
            a.clone(),
            "alice",
            "loras/a/pytorch_lora_weights.safetensors",
        );
        owners.record(
            a.clone(),
            "alice",
            "loras/a/pytorch_lora_weights.safetensors",
        );
        owners.record(b.clone(), "bob", "loras/b");
        owners.publish([a.as_path(), b.as_path()].into_iter(), &warm);
        assert_eq!(
            warm.loras_of("alice"),
            ["loras/a/pytorch_lora_weights.safetensors"]
        );
        assert_eq!(warm.loras_of("bob"), ["loras/b"]);
        // Evicted from the cache: no longer loaded, and no longer remembered.
        owners.publish([b.as_path()].into_iter(), &warm);
        assert!(warm.loras_of("alice").is_empty());
        assert_eq!(owners.by_file.len(), 1);
        assert_eq!(device_name(Device::Cuda(1)), "cuda:1");
    }
}
