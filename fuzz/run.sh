#!/usr/bin/env bash
# Coverage-guided fuzzing of what the service reads from untrusted input (cargo-fuzz,
# libFuzzer): uploaded images, multipart forms, generation request JSON and LoRA
# safetensors headers. Builds the targets and runs each for a bounded time, starting from
# the committed seed corpus (fuzz/corpus/<target>, read only) and a working corpus kept in
# the cache; prints each target's executions, execs/s, coverage and crashes.
#
#   fuzz/run.sh                 # every target, 60 s each
#   SECONDS_PER_TARGET=600 fuzz/run.sh image_decode multipart
#
# No nightly toolchain: RUSTC_BOOTSTRAP=1 lets the stable compiler take cargo-fuzz's -Z
# flags. The targets are built without a sanitizer (-s none): what runs is Rust, where a
# memory error needs `unsafe`; libFuzzer's coverage guidance (sancov) works the same.
# A crash is written to fuzz/artifacts/<target>/ and the script exits non-zero.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
. scripts/env.sh
export PATH="$IMAGEGEN_CACHE/tools/bin:$PATH"
if ! command -v cargo-fuzz >/dev/null; then
    cargo install --locked --root "$IMAGEGEN_CACHE/tools" cargo-fuzz
fi
export RUSTC_BOOTSTRAP=1
seconds="${SECONDS_PER_TARGET:-60}"
targets=("$@")
[ "${#targets[@]}" -gt 0 ] || targets=(image_decode multipart request_json lora_header)
target_dir="$IMAGEGEN_CACHE/fuzz-target"
work="$IMAGEGEN_CACHE/fuzz-corpus"
logs="$(mktemp -d)"
status=0
for target in "${targets[@]}"; do
    mkdir -p "$work/$target"
    echo "== $target (${seconds}s)" >&2
    if ! cargo fuzz run --fuzz-dir fuzz --target-dir "$target_dir" -s none "$target" \
        "$work/$target" "fuzz/corpus/$target" -- \
        -max_total_time="$seconds" -print_final_stats=1 -close_fd_mask=3 \
        >"$logs/$target.log" 2>&1; then
        status=1
        tail -n 40 "$logs/$target.log" >&2
    fi
done
printf '%-14s %12s %9s %8s %8s %8s  %s\n' target execs execs/s cov ft corpus result
for target in "${targets[@]}"; do
    log="$logs/$target.log"
    done_line="$(grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -n 1 || true)"
    execs="$(grep -oE 'stat::number_of_executed_units:[[:space:]]+[0-9]+' "$log" | grep -oE '[0-9]+$' || echo '?')"
    rate="$(grep -oE 'stat::average_exec_per_sec:[[:space:]]+[0-9]+' "$log" | grep -oE '[0-9]+$' || echo '?')"
    cov="$(sed -nE 's/.* cov: ([0-9]+).*/\1/p' <<<"$done_line")"
    ft="$(sed -nE 's/.* ft: ([0-9]+).*/\1/p' <<<"$done_line")"
    corp="$(sed -nE 's/.* corp: ([0-9]+).*/\1/p' <<<"$done_line")"
    result=ok
    grep -qE 'panicked|deadly signal|ERROR: libFuzzer' "$log" && result="CRASH (fuzz/artifacts/$target)"
    printf '%-14s %12s %9s %8s %8s %8s  %s\n' "$target" "$execs" "$rate" "${cov:-?}" "${ft:-?}" "${corp:-?}" "$result"
done
exit "$status"
