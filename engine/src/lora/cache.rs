//! Loaded LoRAs kept between requests, least recently used out first.

use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::SystemTime;

use tch::nn::VarStore;

use crate::error::{Error, Result};
use crate::stable_diffusion::StableDiffusion;

use super::file::{lora_file, Lora};

/// Loaded LoRAs of one model, by file path and modification time, within a byte budget:
/// the least recently used go first. (A LoRA is resolved against the model it was loaded
/// for: keep one cache per loaded model.)
pub struct LoraCache {
    budget: usize,
    entries: Vec<CacheEntry>,
    clock: u64,
}

struct CacheEntry {
    path: PathBuf,
    modified: SystemTime,
    lenient: bool,
    lora: Rc<Lora>,
    bytes: usize,
    last_used: u64,
}

impl LoraCache {
    pub fn new(budget_bytes: usize) -> Self {
        LoraCache {
            budget: budget_bytes,
            entries: Vec::new(),
            clock: 0,
        }
    }

    /// The LoRA at `path` (file or diffusers folder), loaded for `model` unless cached with
    /// the file's current modification time.
    pub fn get(&mut self, path: &Path, model: &StableDiffusion, lenient: bool) -> Result<Rc<Lora>> {
        self.get_or_load(path, model, lenient).map(|(lora, _)| lora)
    }

    /// As [`LoraCache::get`], and whether it was a hit (true) or had to be loaded (false).
    pub fn get_or_load(
        &mut self,
        path: &Path,
        model: &StableDiffusion,
        lenient: bool,
    ) -> Result<(Rc<Lora>, bool)> {
        let file = lora_file(path);
        let io = |source| Error::Io {
            path: file.clone(),
            source,
        };
        let canonical = file.canonicalize().map_err(io)?;
        let modified = std::fs::metadata(&canonical)
            .and_then(|m| m.modified())
            .map_err(io)?;
        self.clock += 1;
        let now = self.clock;
        if let Some(entry) = self
            .entries
            .iter_mut()
            .find(|e| e.path == canonical && e.modified == modified && e.lenient == lenient)
        {
            entry.last_used = now;
            return Ok((entry.lora.clone(), true));
        }
        // A changed file replaces its stale entry.
        self.entries.retain(|e| e.path != canonical);
        let lora = Rc::new(Lora::load(&canonical, model, lenient)?);
        let bytes = lora.bytes();
        self.entries.push(CacheEntry {
            path: canonical,
            modified,
            lenient,
            lora: lora.clone(),
            bytes,
            last_used: now,
        });
        while self.bytes() > self.budget {
            let oldest = self
                .entries
                .iter()
                .enumerate()
                .min_by_key(|(_, e)| e.last_used)
                .map(|(i, _)| i)
                .expect("over budget means not empty");
            self.entries.swap_remove(oldest);
        }
        Ok((lora, false))
    }

    /// The key a LoRA at `path` is cached under (its file's canonical path); what
    /// [`LoraCache::files`] lists.
    pub fn key(path: &Path) -> std::io::Result<PathBuf> {
        lora_file(path).canonicalize()
    }

    /// The cached LoRAs' keys.
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        self.entries.iter().map(|e| e.path.as_path())
    }

    /// Bytes of the cached LoRAs' tensors.
    pub fn bytes(&self) -> usize {
        self.entries.iter().map(|e| e.bytes).sum()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Bytes of every tensor of a VarStore.
pub fn var_store_bytes(vars: &VarStore) -> usize {
    vars.variables()
        .values()
        .map(|t| t.numel() * t.kind().elt_size_in_bytes())
        .sum()
}
