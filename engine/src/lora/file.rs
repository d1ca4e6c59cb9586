//! A LoRA file read for a model: its keys matched to our modules (diffusers, peft and kohya names),
//! its alphas, and each module's A and B tensors.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::SafeTensors;
use tch::{nn::VarStore, Kind, Tensor};

use super::sgm::sgm_to_diffusers;
use crate::error::{Error, Result};
use crate::stable_diffusion::StableDiffusion;

/// The file a user names: a `.safetensors` file, or a folder holding diffusers'
/// `pytorch_lora_weights.safetensors`.
pub const DIFFUSERS_LORA_FILE: &str = imagegen_crds::api::LORA_FILE;

/// How many unmatched keys an error or warning lists.
const SHOWN_KEYS: usize = 5;

/// The network a LoRA module changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Component {
    Unet,
    TextEncoder,
    /// SDXL's second text encoder.
    TextEncoder2,
}

impl Component {
    /// The key prefix of this component's modules in diffusers' layout.
    pub(crate) fn prefix(self) -> &'static str {
        match self {
            Component::Unet => "unet",
            Component::TextEncoder => "text_encoder",
            Component::TextEncoder2 => "text_encoder_2",
        }
    }

    /// The key prefix of this component's modules in kohya's layout (followed by `_`).
    pub(crate) fn kohya_prefix(self) -> &'static str {
        match self {
            Component::Unet => "lora_unet",
            Component::TextEncoder => "lora_te",
            Component::TextEncoder2 => "lora_te2",
        }
    }

    /// Every component, in the order modules are listed.
    pub(crate) const ALL: [Component; 3] = [
        Component::Unet,
        Component::TextEncoder,
        Component::TextEncoder2,
    ];

    fn is_text(self) -> bool {
        matches!(self, Component::TextEncoder | Component::TextEncoder2)
    }
}

/// One low-rank delta, resolved against the model it was loaded for.
pub struct LoraModule {
    pub component: Component,
    /// The weight it changes: our VarStore path (diffusers' key), e.g.
    /// `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight`.
    pub target: String,
    /// A (`lora_down`), `[rank, in]` or `[rank, in, kh, kw]`, float32 on the model's device.
    pub down: Tensor,
    /// B (`lora_up`), `[out, rank]` or `[out, rank, 1, 1]`, float32 on the model's device.
    pub up: Tensor,
    /// alpha / rank.
    pub scale: f64,
}

impl LoraModule {
    pub fn rank(&self) -> i64 {
        self.down.size()[0]
    }

    /// `scale × (B @ A)` in the target's shape (float32).
    pub(super) fn delta(&self, shape: &[i64]) -> Result<Tensor> {
        let rank = self.rank();
        let up = self.up.f_reshape([-1, rank])?;
        let down = self.down.f_reshape([rank, -1])?;
        Ok(up.f_matmul(&down)?.f_reshape(shape)? * self.scale)
    }
}

/// A LoRA file, loaded for one model.
pub struct Lora {
    pub path: PathBuf,
    pub modules: Vec<LoraModule>,
}

impl std::fmt::Debug for Lora {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lora")
            .field("path", &self.path)
            .field("modules", &self.modules.len())
            .finish()
    }
}

/// `path` itself, or `path/pytorch_lora_weights.safetensors` for a folder.
pub fn lora_file(path: &Path) -> PathBuf {
    if path.is_dir() {
        path.join(DIFFUSERS_LORA_FILE)
    } else {
        path.to_path_buf()
    }
}

fn lora_error(path: &Path, message: impl Into<String>) -> Error {
    Error::Lora {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// Our LoRA-able modules (2-D and 4-D `.weight`s) of one component: by dotted path, and by
/// the path with `.` replaced by `_` (kohya's names). Maps to the module path.
struct ModuleIndex {
    dotted: HashMap<String, Vec<i64>>,
    flat: HashMap<String, String>,
}

impl ModuleIndex {
    fn new(vars: &VarStore, component: Component) -> Self {
        let mut dotted = HashMap::new();
        let mut flat = HashMap::new();
        for (name, var) in vars.variables() {
            let Some(module) = name.strip_suffix(".weight") else {
                continue;
            };
            let size = var.size();
            if !matches!(size.len(), 2 | 4) {
                continue;
            }
            flat.insert(module.replace('.', "_"), module.to_string());
            // transformers 5 saves CLIPTextModel without `text_model.`: accept both.
            if component.is_text() {
                if let Some(short) = module.strip_prefix("text_model.") {
                    flat.insert(short.replace('.', "_"), module.to_string());
                }
            }
            dotted.insert(module.to_string(), size);
        }
        ModuleIndex { dotted, flat }
    }

    fn dotted(&self, component: Component, path: &str) -> Option<String> {
        if self.dotted.contains_key(path) {
            return Some(path.to_string());
        }
        let long = format!("text_model.{path}");
        (component.is_text() && self.dotted.contains_key(&long)).then_some(long)
    }
}

/// What one key of the file is.
enum Part {
    Down,
    Up,
    Alpha,
}

/// Splits a key into (component, module path in the file's spelling, kohya?, part).
fn classify(key: &str) -> Option<(Component, String, bool, Part)> {
    for (prefix, component) in [
        ("lora_unet_", Component::Unet),
        ("lora_te_", Component::TextEncoder),
        // kohya's SDXL files number the two text encoders.
        ("lora_te1_", Component::TextEncoder),
        ("lora_te2_", Component::TextEncoder2),
    ] {
        if let Some(rest) = key.strip_prefix(prefix) {
            let (flat, suffix) = rest.split_once('.')?;
            let part = match suffix {
                "lora_down.weight" => Part::Down,
                "lora_up.weight" => Part::Up,
                "alpha" => Part::Alpha,
                _ => return None,
            };
            return Some((component, flat.to_string(), true, part));
        }
    }
    let (component, rest) = if let Some(rest) = key.strip_prefix("unet.") {
        (Component::Unet, rest)
    } else if let Some(rest) = key.strip_prefix("text_encoder.") {
        (Component::TextEncoder, rest)
    } else if let Some(rest) = key.strip_prefix("text_encoder_2.") {
        (Component::TextEncoder2, rest)
    } else {
        return None;
    };
    const SUFFIXES: [(&str, Part); 9] = [
        (".lora_A.weight", Part::Down),
        (".lora_B.weight", Part::Up),
        (".lora.down.weight", Part::Down),
        (".lora.up.weight", Part::Up),
        (".lora_linear_layer.down.weight", Part::Down),
        (".lora_linear_layer.up.weight", Part::Up),
        ("_lora.down.weight", Part::Down),
        ("_lora.up.weight", Part::Up),
        (".alpha", Part::Alpha),
    ];
    for (suffix, part) in SUFFIXES {
        if let Some(module) = rest.strip_suffix(suffix) {
            // diffusers' attention-processor names: `attn1.processor.to_q_lora.down`.
            let module = match module.split_once(".processor.") {
                Some((attn, "to_out")) => format!("{attn}.to_out.0"),
                Some((attn, proj)) => format!("{attn}.{proj}"),
                None if suffix.starts_with('_') => return None,
                None => module.to_string(),
            };
            return Some((component, module, false, part));
        }
    }
    None
}

#[derive(Default)]
struct Pieces {
    down: Option<Tensor>,
    up: Option<Tensor>,
    alpha: Option<f64>,
}

/// alpha from diffusers' adapter metadata for one component: `lora_alpha`, and
/// `alpha_pattern` entries that match the module path (peft matches a key as a suffix at a
/// `.` boundary).
struct MetadataAlpha {
    default: Option<f64>,
    patterns: Vec<(String, f64)>,
}

impl MetadataAlpha {
    fn read(json: Option<&serde_json::Value>, component: Component) -> Self {
        let prefix = component.prefix();
        let get = |key: &str| json.and_then(|j| j.get(format!("{prefix}.{key}")));
        let default = get("lora_alpha").and_then(serde_json::Value::as_f64);
        let patterns = get("alpha_pattern")
            .and_then(serde_json::Value::as_object)
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_f64()?)))
                    .collect()
            })
            .unwrap_or_default();
        MetadataAlpha { default, patterns }
    }

    fn alpha(&self, module: &str) -> Option<f64> {
        let matched = self
            .patterns
            .iter()
            .find(|(k, _)| module == k || module.ends_with(&format!(".{k}")));
        matched.map(|(_, a)| *a).or(self.default)
    }
}

fn tensor_of(st: &SafeTensors<'_>, key: &str, path: &Path) -> Result<Tensor> {
    let view = st
        .tensor(key)
        .map_err(|e| lora_error(path, e.to_string()))?;
    let kind = match view.dtype() {
        safetensors::Dtype::F32 => Kind::Float,
        safetensors::Dtype::F16 => Kind::Half,
        safetensors::Dtype::BF16 => Kind::BFloat16,
        safetensors::Dtype::F64 => Kind::Double,
        other => {
            return Err(lora_error(
                path,
                format!("tensor `{key}` has unsupported dtype {other:?}"),
            ))
        }
    };
    let shape: Vec<i64> = view.shape().iter().map(|d| *d as i64).collect();
    Ok(Tensor::f_from_data_size(view.data(), &shape, kind)?.f_to_kind(Kind::Float)?)
}

/// What a LoRA file's header says before it meets a model: each key's component, module
/// (kohya's SDXL UNet names mapped to diffusers', for `layers_per_block`) and part, or
/// `None` for a key that is no LoRA tensor; and diffusers' adapter metadata, when the
/// header carries it. [`Lora::load`] reads headers with the same functions.
#[derive(Debug)]
pub struct LoraHeader {
    pub keys: Vec<(String, Option<(Component, String)>)>,
    pub metadata: Option<serde_json::Value>,
}

/// Reads the header of a LoRA file's bytes (untrusted: a clear error, never a panic).
pub fn read_lora_header(bytes: &[u8], layers_per_block: usize) -> Result<LoraHeader> {
    let path = Path::new("<bytes>");
    let st = SafeTensors::deserialize(bytes).map_err(|e| lora_error(path, e.to_string()))?;
    let metadata = adapter_metadata(bytes, path)?;
    let mut names: Vec<&str> = st.names();
    names.sort_unstable();
    let keys = names
        .into_iter()
        .map(|key| {
            let layout = classify(key).map(|(component, module, kohya, _)| {
                let module = match (kohya, component) {
                    (true, Component::Unet) => {
                        sgm_to_diffusers(&module, layers_per_block).unwrap_or(module)
                    }
                    _ => module,
                };
                (component, module)
            });
            (key.to_string(), layout)
        })
        .collect();
    Ok(LoraHeader { keys, metadata })
}

/// diffusers' adapter metadata (`lora_adapter_metadata` in the header's `__metadata__`),
/// when present and JSON.
fn adapter_metadata(bytes: &[u8], path: &Path) -> Result<Option<serde_json::Value>> {
    let (_, header) =
        SafeTensors::read_metadata(bytes).map_err(|e| lora_error(path, e.to_string()))?;
    Ok(header
        .metadata()
        .as_ref()
        .and_then(|m| m.get("lora_adapter_metadata"))
        .and_then(|text| serde_json::from_str(text).ok()))
}

/// The most common value (ties: the first seen), as diffusers picks a LoRA's `lora_alpha`.
fn most_common(values: &[f64]) -> Option<f64> {
    let mut counts: Vec<(f64, usize)> = Vec::new();
    for v in values {
        match counts.iter_mut().find(|(c, _)| c == v) {
            Some(entry) => entry.1 += 1,
            None => counts.push((*v, 1)),
        }
    }
    let best = counts.iter().map(|(_, n)| *n).max()?;
    counts.into_iter().find(|(_, n)| *n == best).map(|(v, _)| v)
}

impl Lora {
    /// Reads `path` (a file or a diffusers LoRA folder) for `model`. Keys that are not LoRA
    /// tensors of a module of this model are an error naming them, or with `lenient` a
    /// warning (and skipped). A delta whose shape does not fit its module is always an error.
    pub fn load(path: &Path, model: &StableDiffusion, lenient: bool) -> Result<Lora> {
        let path = lora_file(path);
        if path.extension().and_then(|e| e.to_str()) != Some("safetensors") {
            return Err(match path.extension().and_then(|e| e.to_str()) {
                Some("bin" | "pt" | "pth" | "ckpt" | "pkl") => Error::PickleRefused { path },
                _ => lora_error(&path, "a LoRA must be a .safetensors file"),
            });
        }
        let io = |source| Error::Io {
            path: path.clone(),
            source,
        };
        let file = File::open(&path).map_err(io)?;
        // SAFETY: read-only mapping used only while loading.
        let map = unsafe { Mmap::map(&file) }.map_err(io)?;
        let st = SafeTensors::deserialize(&map).map_err(|e| lora_error(&path, e.to_string()))?;
        let metadata = adapter_metadata(&map, &path)?;

        // A component the model lacks (an SD model's text_encoder_2, a refiner's
        // text_encoder) has no index: its keys match nothing.
        let indexes: Vec<(Component, ModuleIndex)> = Component::ALL
            .into_iter()
            .filter_map(|c| {
                let vars = match c {
                    Component::Unet => &model.unet.vars,
                    text => &model.text_encoder_named(text.prefix())?.vars,
                };
                Some((c, ModuleIndex::new(vars, c)))
            })
            .collect();
        let index_of = |c: Component| indexes.iter().find(|(k, _)| *k == c).map(|(_, i)| i);
        // kohya's SDXL block numbers count layers_per_block + 1 modules per block.
        let layers_per_block = (model.unet.model.config.layers_per_block)
            .first()
            .unwrap_or_default()
            .max(0) as usize;

        let mut unmatched = Vec::new();
        let mut pieces: BTreeMap<(Component, String), Pieces> = BTreeMap::new();
        let mut names: Vec<&str> = st.names();
        names.sort_unstable();
        for key in names {
            let Some((component, module, kohya, part)) = classify(key) else {
                unmatched.push(key.to_string());
                continue;
            };
            let resolved = index_of(component).and_then(|index| {
                if !kohya {
                    index.dotted(component, &module)
                } else if let Some(found) = index.flat.get(&module) {
                    Some(found.clone())
                } else if component == Component::Unet {
                    let diffusers = sgm_to_diffusers(&module, layers_per_block)?;
                    index.flat.get(&diffusers).cloned()
                } else {
                    None
                }
            });
            let Some(resolved) = resolved else {
                unmatched.push(key.to_string());
                continue;
            };
            let entry = pieces.entry((component, resolved)).or_default();
            let tensor = tensor_of(&st, key, &path)?;
            match part {
                Part::Down => entry.down = Some(tensor),
                Part::Up => entry.up = Some(tensor),
                Part::Alpha => entry.alpha = Some(tensor.f_double_value(&[])?),
            }
        }

        let mut modules = Vec::new();
        for component in Component::ALL {
            let meta = MetadataAlpha::read(metadata.as_ref(), component);
            let file_alphas: Vec<f64> = pieces
                .iter()
                .filter(|((c, _), _)| *c == component)
                .filter_map(|(_, p)| p.alpha)
                .collect();
            let common_alpha = most_common(&file_alphas);
            let Some(index) = index_of(component) else {
                continue;
            };
            for ((c, module), p) in pieces.iter_mut().filter(|((c, _), _)| *c == component) {
                let (Some(down), Some(up)) = (p.down.take(), p.up.take()) else {
                    unmatched.push(format!(
                        "{}.{module} (needs both down/A and up/B)",
                        c.prefix()
                    ));
                    continue;
                };
                let shape = &index.dotted[module];
                let rank = down.size()[0];
                let fits = matches!(down.dim(), 2 | 4)
                    && up.dim() == down.dim()
                    && up.size()[1] == rank
                    && up.size()[2..].iter().all(|d| *d == 1)
                    && up.size()[0] == shape[0]
                    && down.size()[1..] == shape[1..];
                if !fits || down.dim() != shape.len() {
                    return Err(lora_error(
                        &path,
                        format!(
                            "{} module `{module}` has weight {shape:?} but the LoRA's down/A is \
                             {:?} and up/B {:?}",
                            c.prefix(),
                            down.size(),
                            up.size()
                        ),
                    ));
                }
                let alpha = if metadata.is_some() {
                    meta.alpha(module)
                } else {
                    None
                }
                .or(p.alpha)
                .or(common_alpha)
                .unwrap_or(rank as f64);
                modules.push(LoraModule {
                    component,
                    target: format!("{module}.weight"),
                    down: down.f_to_device(model.device)?,
                    up: up.f_to_device(model.device)?,
                    scale: alpha / rank as f64,
                });
            }
        }
        if !unmatched.is_empty() {
            let shown = unmatched
                .iter()
                .take(SHOWN_KEYS)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ");
            if !lenient {
                return Err(lora_error(
                    &path,
                    format!(
                        "{} key(s) match no module of the model: {shown}{} (the lenient option \
                         skips them)",
                        unmatched.len(),
                        if unmatched.len() > SHOWN_KEYS {
                            ", ..."
                        } else {
                            ""
                        }
                    ),
                ));
            }
            tracing::warn!(
                path = %path.display(),
                count = unmatched.len(),
                first = %shown,
                "LoRA keys that match no module of the model are skipped"
            );
        }
        if modules.is_empty() {
            return Err(lora_error(&path, "no LoRA module for this model"));
        }
        Ok(Lora { path, modules })
    }

    /// Bytes of the loaded tensors (what the cache counts).
    pub fn bytes(&self) -> usize {
        self.modules
            .iter()
            .map(|m| {
                (m.down.numel() * m.down.kind().elt_size_in_bytes())
                    + (m.up.numel() * m.up.kind().elt_size_in_bytes())
            })
            .sum()
    }
}
