#!/usr/bin/env bash
# Checks the Helm chart without a cluster: `helm lint --strict` and `helm template` with every
# values file under charts/imagegen/ci/, and a deliberately misspelt values file that must be
# refused (values.schema.json is strict). The rendered manifests go to a folder
# ($IMAGEGEN_RENDERED_CHART, default $IMAGEGEN_CACHE/rendered-chart), one subfolder per values
# file, where the Rust test operator/tests/chart.rs parses them into typed objects.
#
# helm (v4) and kubectl (v1.35) come from scripts/k8s-tools.sh.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
IMAGEGEN_CACHE="${IMAGEGEN_CACHE:-$HOME/.cache/imagegen}"
chart="$root/charts/imagegen"
out="${IMAGEGEN_RENDERED_CHART:-$IMAGEGEN_CACHE/rendered-chart}"
start=$(date +%s)
tools_bin="$("$here/k8s-tools.sh")"
helm="$tools_bin/helm"
kubectl="$tools_bin/kubectl"
# Keep helm's own caches and config out of $HOME.
tools="$(dirname "$tools_bin")"
export HELM_CACHE_HOME="$tools/helm-cache" HELM_CONFIG_HOME="$tools/helm-config" \
    HELM_DATA_HOME="$tools/helm-data"
echo "chart-check: $("$helm" version --short), kubectl $("$kubectl" version --client -o json |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["clientVersion"]["gitVersion"])')" >&2

rm -rf "$out"
mkdir -p "$out"
# The CI values files, and the kind end-to-end test's (rendered as "e2e-kind").
values_files=("$chart"/ci/*-values.yaml "$root/tests/e2e/values-kind.yaml")
[ -e "${values_files[0]}" ] || { echo "chart-check: no values files in $chart/ci" >&2; exit 1; }
for values in "${values_files[@]}"; do
    name="$(basename "$values" .yaml)"
    name="${name%-values}"
    [ "$name" = values-kind ] && name=e2e-kind
    "$helm" lint --strict "$chart" -f "$values" >"$out/$name.lint.txt" 2>&1 || {
        cat "$out/$name.lint.txt" >&2
        echo "chart-check: helm lint failed with $values" >&2
        exit 1
    }
    mkdir -p "$out/$name"
    # --include-crds: the test compares the rendered definitions with the generated ones.
    "$helm" template imagegen "$chart" --namespace imagegen-system --include-crds \
        -f "$values" --output-dir "$out/$name" >/dev/null
    echo "chart-check: ${values#"$root"/}: lint and template ok" >&2
done

# Values that must be refused: a misspelt key (values.schema.json closes every object), a value
# out of range, a setting the chart cannot honour. Each file's first line names the message.
for bad in "$here"/chart-check/*-values.yaml; do
    expect="$(sed -n '1s/^# expect: //p' "$bad")"
    [ -n "$expect" ] || { echo "chart-check: $bad lacks its '# expect: ' line" >&2; exit 1; }
    # helm lint reports a template's `fail` only as information; such files say `# lint: info`.
    if "$helm" lint --strict "$chart" -f "$bad" >"$out/bad.txt" 2>&1 &&
        ! grep -q '^# lint: info' "$bad"; then
        echo "chart-check: helm lint accepted $(basename "$bad"), which it must refuse" >&2
        exit 1
    fi
    if "$helm" template imagegen "$chart" -f "$bad" >/dev/null 2>>"$out/bad.txt"; then
        echo "chart-check: helm template accepted $(basename "$bad"), which it must refuse" >&2
        exit 1
    fi
    grep -qF -- "$expect" "$out/bad.txt" || {
        cat "$out/bad.txt" >&2
        echo "chart-check: $(basename "$bad") failed, but without \"$expect\"" >&2
        exit 1
    }
    echo "chart-check: $(basename "$bad") refused, as it must be" >&2
done
rm -f "$out/bad.txt"

echo "chart-check: rendered manifests in $out ($(( $(date +%s) - start ))s)" >&2
