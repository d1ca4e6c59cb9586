//! Switching LoRAs request after request: time of one fuse + unfuse, memory after 100
//! switches, and the cache's byte budget. A test binary of its own, so that the resident
//! set size it reads is not moved by other tests running beside it.

mod common;

use std::time::Instant;

use common::fixtures_dir;
use imagegen_engine::lora;
use imagegen_engine::lora::{var_store_bytes, LoraCache};
use imagegen_engine::StableDiffusion;
use tch::{Device, Kind};

fn lora_path(name: &str) -> std::path::PathBuf {
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures_dir().join("index.json")).unwrap())
            .unwrap();
    fixtures_dir().join(index["lora"]["files"][name].as_str().unwrap())
}

/// The memory measurement needs the process to itself.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Resident set size of this process, from /proc/self/statm (pages × page size).
fn rss_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: usize = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

#[test]
fn switching_is_fast_and_memory_stays_flat() {
    let _alone = ONE_AT_A_TIME.lock().unwrap();
    let model = StableDiffusion::load_dir(
        &fixtures_dir().join("tiny-sd1"),
        "tiny-sd1",
        Device::Cpu,
        Kind::Float,
    )
    .unwrap();
    let files = [
        lora_path("lora-a"),
        lora_path("lora-b"),
        lora_path("lora-a-kohya"),
    ];
    let mut cache = LoraCache::new(64 << 20);
    let weights_bytes =
        || var_store_bytes(&model.unet.vars) + var_store_bytes(&model.text_encoder().vars);
    let base_weights = weights_bytes();

    // Fuse + unfuse of one LoRA (lora-a: UNet and text encoder, 60 modules), cached.
    let lora = cache.get(&files[0], &model, false).unwrap();
    let mut times = Vec::new();
    for _ in 0..21 {
        let started = Instant::now();
        lora::fuse_loras(&model, &[(lora.clone(), 1.0)])
            .unwrap()
            .unfuse();
        times.push(started.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    eprintln!(
        "fuse + unfuse of lora-a: median {:.3} ms (min {:.3}, max {:.3})",
        times[10], times[0], times[20]
    );

    let switch = |cache: &mut LoraCache, i: usize| {
        let lora = cache.get(&files[i % files.len()], &model, false).unwrap();
        let fused = lora::fuse_loras(&model, &[(lora, 0.5 + (i % 3) as f64 * 0.25)]).unwrap();
        drop(fused);
    };
    for i in 0..10 {
        switch(&mut cache, i);
    }
    let rss_before = rss_bytes();
    let cache_before = cache.bytes();
    for i in 0..100 {
        switch(&mut cache, i);
    }
    let rss_after = rss_bytes();
    eprintln!(
        "100 switches: RSS {} -> {} KiB ({:+} KiB); weights {} bytes -> {}; cache {} -> {} bytes ({} LoRAs)",
        rss_before / 1024,
        rss_after / 1024,
        (rss_after as i64 - rss_before as i64) / 1024,
        base_weights,
        weights_bytes(),
        cache_before,
        cache.bytes(),
        cache.len()
    );
    assert_eq!(weights_bytes(), base_weights);
    assert_eq!(cache.bytes(), cache_before);
    assert_eq!(cache.len(), 3);
    assert!(
        rss_after <= rss_before + (4 << 20),
        "RSS grew by {} KiB over 100 switches",
        (rss_after - rss_before) / 1024
    );
}

#[test]
fn the_cache_keeps_the_recently_used_within_its_budget() {
    let _alone = ONE_AT_A_TIME.lock().unwrap();
    let model = StableDiffusion::load_dir(
        &fixtures_dir().join("tiny-sd1"),
        "tiny-sd1",
        Device::Cpu,
        Kind::Float,
    )
    .unwrap();
    let a = lora_path("lora-a");
    let b = lora_path("lora-b");
    let mut probe = LoraCache::new(usize::MAX);
    let a_bytes = probe.get(&a, &model, false).unwrap().bytes();
    let b_bytes = probe.get(&b, &model, false).unwrap().bytes();
    // Room for lora-a and one lora-b, not two lora-b-sized entries more.
    let mut cache = LoraCache::new(a_bytes + b_bytes);
    let first = cache.get(&a, &model, false).unwrap();
    let again = cache.get(&a, &model, false).unwrap();
    assert!(
        std::rc::Rc::ptr_eq(&first, &again),
        "a hit returns the cached LoRA"
    );
    let b_first = cache.get(&b, &model, false).unwrap();
    assert_eq!(cache.len(), 2);
    // The directory form names the same file: a hit.
    let dir = a.parent().unwrap();
    assert!(std::rc::Rc::ptr_eq(
        &first,
        &cache.get(dir, &model, false).unwrap()
    ));
    // A third LoRA evicts the least recently used (lora-b).
    let kohya = lora_path("lora-a-kohya");
    cache.get(&kohya, &model, false).unwrap();
    assert!(cache.bytes() <= a_bytes + b_bytes);
    let b_again = cache.get(&b, &model, false).unwrap();
    assert!(
        !std::rc::Rc::ptr_eq(&b_first, &b_again),
        "lora-b was evicted and reloaded"
    );
}
