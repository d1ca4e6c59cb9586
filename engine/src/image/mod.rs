//! Images in and out of the pipelines: decoding uploads within limits, tensors and resizing,
//! masks, Canny edges, and PNG files with their metadata.

pub mod canny;
pub mod canvas;
pub mod fit;
pub mod input;
pub mod mask;
pub mod output;
pub mod processor;
