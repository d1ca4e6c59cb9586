//! imagegen engine (in progress): noise schedulers.

pub mod schedulers;
