//! Loads safetensors weights into a VarStore whose paths are diffusers' state-dict keys.
//! Only safetensors are read: pickle checkpoints are refused, never unpickled.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::{Mmap, UncheckedAdvice};
use safetensors::{Dtype, SafeTensors};
use tch::{nn::VarStore, Kind, Tensor};

use crate::error::{read_json, Error, Result};

/// Tensors that checkpoints carry but the model computes itself.
const IGNORED_SUFFIXES: [&str; 1] = ["position_ids"];

/// The weight files of one component folder: `{stem}.{variant}.safetensors` when a variant
/// is asked for and present, else `{stem}.safetensors`, else the shards listed in
/// `{stem}.safetensors.index[.{variant}].json`.
pub fn weight_files(dir: &Path, stem: &str, variant: Option<&str>) -> Result<Vec<PathBuf>> {
    let mut candidates = Vec::new();
    if let Some(v) = variant {
        candidates.push(format!("{stem}.{v}.safetensors"));
    }
    candidates.push(format!("{stem}.safetensors"));
    for name in &candidates {
        let path = dir.join(name);
        if path.is_file() {
            return Ok(vec![path]);
        }
    }
    let mut indexes = Vec::new();
    if let Some(v) = variant {
        indexes.push(format!("{stem}.safetensors.index.{v}.json"));
    }
    indexes.push(format!("{stem}.safetensors.index.json"));
    for name in &indexes {
        let path = dir.join(name);
        if path.is_file() {
            return shard_files(&path);
        }
    }
    // Only pickles (or nothing) here: say which.
    let pickle = std::fs::read_dir(dir)
        .map_err(|source| Error::Io {
            path: dir.to_path_buf(),
            source,
        })?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .find(|p| {
            matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("bin" | "ckpt" | "pt" | "pth" | "pkl")
            )
        });
    match pickle {
        Some(path) => Err(Error::PickleRefused { path }),
        None => Err(Error::NoWeights {
            dir: dir.to_path_buf(),
            component: stem.to_string(),
        }),
    }
}

#[derive(serde::Deserialize)]
struct ShardIndex {
    weight_map: HashMap<String, String>,
}

fn shard_files(index_path: &Path) -> Result<Vec<PathBuf>> {
    let index: ShardIndex = read_json(index_path)?;
    let dir = index_path.parent().unwrap_or(Path::new("."));
    let mut files: Vec<PathBuf> = index
        .weight_map
        .values()
        .collect::<HashSet<_>>()
        .into_iter()
        .map(|f| dir.join(f))
        .collect();
    files.sort();
    if let Some(pickle) = files
        .iter()
        .find(|f| f.extension().and_then(|e| e.to_str()) != Some("safetensors"))
    {
        return Err(Error::PickleRefused {
            path: pickle.clone(),
        });
    }
    Ok(files)
}

fn kind_of(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F64 => Kind::Double,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        _ => return None,
    })
}

/// Memory-mapped safetensors files, indexed by tensor name.
struct MappedFiles {
    maps: Vec<(String, Mmap)>,
}

impl MappedFiles {
    fn open(files: &[PathBuf]) -> Result<Self> {
        let maps = files
            .iter()
            .map(|path| {
                let io = |source| Error::Io {
                    path: path.clone(),
                    source,
                };
                let file = File::open(path).map_err(io)?;
                // SAFETY: the mapping is read-only and lives only while loading; a file
                // truncated underneath us by another process is outside what we guard.
                let map = unsafe { Mmap::map(&file) }.map_err(io)?;
                Ok((path.display().to_string(), map))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(MappedFiles { maps })
    }

    /// Drops the pages of `bytes` (a tensor of file `index`, already copied into the model)
    /// from this process's resident memory, so that loading peaks at about one copy of the
    /// weights instead of two (the model's tensors plus the mapped file). The mapping is
    /// read-only and private: a later read of these bytes faults them in again from the
    /// file. Best effort: a refused madvise only costs memory.
    fn release(&self, index: usize, bytes: &[u8]) {
        let map = &self.maps[index].1;
        let offset = bytes.as_ptr() as usize - map.as_ptr() as usize;
        // SAFETY: the pages were never written (read-only mapping), so dropping them loses
        // nothing; `bytes` lies within `map` (it is a view safetensors parsed from it).
        let _ =
            unsafe { map.unchecked_advise_range(UncheckedAdvice::DontNeed, offset, bytes.len()) };
    }

    fn parse(&self) -> Result<Vec<(&str, SafeTensors<'_>)>> {
        self.maps
            .iter()
            .map(|(name, map)| {
                SafeTensors::deserialize(map)
                    .map(|st| (name.as_str(), st))
                    .map_err(|e| Error::Safetensors {
                        file: name.clone(),
                        message: e.to_string(),
                    })
            })
            .collect()
    }
}

/// Copies every variable of `vs` from `files`, converting dtype and device as needed.
/// `alias` gives an older name to try when a tensor is absent under the model's own.
/// A missing tensor or a shape mismatch is an error naming the tensor; tensors the model
/// does not use are reported in a warning.
pub fn load_var_store(
    vs: &VarStore,
    files: &[PathBuf],
    alias: fn(&str) -> Option<String>,
) -> Result<()> {
    let mapped = MappedFiles::open(files)?;
    let parsed = mapped.parse()?;
    let mut location: HashMap<String, usize> = HashMap::new();
    for (i, (_, st)) in parsed.iter().enumerate() {
        for name in st.names() {
            location.insert(name.to_string(), i);
        }
    }
    let shown_files = files
        .iter()
        .map(|f| f.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let mut used = HashSet::new();
    let mut variables: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    variables.sort_by(|a, b| a.0.cmp(&b.0));
    tch::no_grad(|| -> Result<()> {
        for (name, mut var) in variables {
            let stored_name = if location.contains_key(&name) {
                name.clone()
            } else {
                alias(&name)
                    .filter(|old| location.contains_key(old))
                    .ok_or_else(|| Error::MissingTensor {
                        file: shown_files.clone(),
                        name: name.clone(),
                    })?
            };
            let file_index = location[&stored_name];
            let (file, st) = &parsed[file_index];
            let view = st.tensor(&stored_name).map_err(|e| Error::Safetensors {
                file: file.to_string(),
                message: e.to_string(),
            })?;
            let found: Vec<i64> = view.shape().iter().map(|d| *d as i64).collect();
            let expected = var.size();
            // Old VAE checkpoints store attention projections as 1×1 convolutions.
            let squeezable = found.len() == 4 && found[2..] == [1, 1] && found[..2] == expected[..];
            if found != expected && !squeezable {
                return Err(Error::ShapeMismatch {
                    file: file.to_string(),
                    name: stored_name,
                    expected,
                    found,
                });
            }
            let kind = kind_of(view.dtype()).ok_or_else(|| Error::Safetensors {
                file: file.to_string(),
                message: format!(
                    "tensor `{stored_name}` has unsupported dtype {:?}",
                    view.dtype()
                ),
            })?;
            let source =
                Tensor::f_from_data_size(view.data(), &found, kind)?.f_reshape(&expected)?;
            var.f_copy_(&source)?;
            mapped.release(file_index, view.data());
            used.insert(stored_name);
        }
        Ok(())
    })?;
    let unused: Vec<&String> = location
        .keys()
        .filter(|k| !used.contains(*k) && !IGNORED_SUFFIXES.iter().any(|s| k.ends_with(s)))
        .collect();
    if !unused.is_empty() {
        tracing::warn!(
            files = %shown_files,
            count = unused.len(),
            first = %unused.iter().take(5).map(|s| s.as_str()).collect::<Vec<_>>().join(", "),
            "checkpoint tensors not used by the model"
        );
    }
    Ok(())
}
