#!/usr/bin/env bash
# The test suite: sets up (first run only), generates the parity fixtures with
# diffusers/transformers (cached until the generator changes), then runs every Rust test.
# Extra arguments go to `cargo test` (e.g. scripts/test.sh --test pipeline_parity).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
"$here/setup.sh"
. "$here/env.sh"

# Fixtures are keyed by the generator's content, so a changed script regenerates them.
key="$(cat "$root"/tests/fixtures/*.py "$here/requirements.txt" | sha256sum | cut -c1-16)"
export IMAGEGEN_FIXTURES="${IMAGEGEN_FIXTURES:-$IMAGEGEN_CACHE/fixtures/$key}"
if [ ! -f "$IMAGEGEN_FIXTURES/index.json" ]; then
    echo "test: generating parity fixtures in $IMAGEGEN_FIXTURES" >&2
    rm -rf "$IMAGEGEN_FIXTURES"
    "$IMAGEGEN_VENV/bin/python" "$root/tests/fixtures/make_fixtures.py" --out "$IMAGEGEN_FIXTURES"
    # Keep only the newest few fixture sets.
    ls -1dt "$IMAGEGEN_CACHE"/fixtures/*/ 2>/dev/null | tail -n +4 | xargs -r rm -rf
fi

# The Helm chart rendered with each of its CI values files, for operator/tests/chart.rs.
export IMAGEGEN_RENDERED_CHART="${IMAGEGEN_RENDERED_CHART:-$IMAGEGEN_CACHE/rendered-chart}"
"$here/chart-check.sh"

cd "$root"
# Parity tests load models of real size: two at a time fit this machine's memory.
cargo test --release --workspace --no-fail-fast -- --test-threads="${IMAGEGEN_TEST_THREADS:-2}" "$@"
