//! The Kubernetes operator for imagegen's custom resources. It builds on the API types of
//! `imagegen-crds`; its controllers are not written yet.

pub use imagegen_crds as api;
