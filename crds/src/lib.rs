//! imagegen's API types: the body of a generation request, shared by the runtime's CLI and
//! HTTP service and (as the spec of an ImageGeneration) by the custom resources.

pub mod generation;

pub use generation::{GenerationParams, Mode, Outpaint, Strategy};
