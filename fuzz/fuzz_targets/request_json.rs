//! Generation request bodies: parsed as the service parses them, then checked against the
//! default limits (sizes, counts, prompt lengths, style ids, webhook URLs). A body is
//! accepted or refused with a field named, never a panic.
#![no_main]

use imagegen_crds::api::GenerationRequest;
use imagegen_engine::styles::StyleBook;
use imagegen_runtime::server::config::Limits;
use imagegen_runtime::server::limits::check_limits;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(request) = serde_json::from_slice::<GenerationRequest>(data) else {
        return;
    };
    let styles = StyleBook::builtin();
    let hosts = ["hooks.example".to_string()];
    let _ = check_limits(&Limits::default(), &styles, &hosts, &request);
    // What was read is written back as JSON (job records, CR statuses).
    serde_json::to_vec(&request).expect("a parsed request serializes");
});
