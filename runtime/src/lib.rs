//! The `imagegen` binary's library half: the HTTP service, the object store, the model hub,
//! and the trainer's progress and checkpoint plumbing, over `imagegen-engine`. The command
//! line (`main.rs`) and the service tests use it.

pub mod hub;
pub mod server;
pub mod store;
pub mod train_progress;
