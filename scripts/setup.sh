#!/usr/bin/env bash
# Installs what imagegen needs to build and test, into caches outside the clone:
# a Python venv with PyTorch 2.11.0 (whose libtorch tch 0.24 links against) and the
# reference libraries the parity tests compare with. Idempotent: a second run is quick.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
. "$here/env.sh"

# requirements.txt: PyTorch and the reference libraries (the parity fixtures are keyed by
# it); requirements-services.txt: stand-ins for services the tests talk to.
requirements=("$here/requirements.txt" "$here/requirements-services.txt")
stamp="$IMAGEGEN_VENV/.imagegen-requirements"
if [ -x "$IMAGEGEN_VENV/bin/python" ] && [ -f "$stamp" ] && cat "${requirements[@]}" | cmp -s - "$stamp"; then
    echo "setup: venv up to date at $IMAGEGEN_VENV" >&2
else
    echo "setup: creating venv at $IMAGEGEN_VENV (PyTorch is a large download)" >&2
    mkdir -p "$(dirname "$IMAGEGEN_VENV")"
    python3 -m venv "$IMAGEGEN_VENV"
    "$IMAGEGEN_VENV/bin/pip" install --quiet --upgrade pip
    "$IMAGEGEN_VENV/bin/pip" install --quiet -r "$here/requirements.txt" -r "$here/requirements-services.txt"
    cat "${requirements[@]}" > "$stamp"
fi

if ! command -v cargo >/dev/null; then
    echo "setup: cargo not found: install Rust (https://rustup.rs) first" >&2
    exit 1
fi

# The real clients the service is tested with, besides the Python SDK in the venv: the
# OpenAI Node SDK (tests/clients/node, as its lock file pins it) and Spring AI's
# OpenAiImageModel (examples/spring-ai, compiled with its classpath written beside it).
# Their package caches live beside the venv.
root="$(cd "$here/.." && pwd)"
for tool in npm mvn java; do
    if ! command -v "$tool" >/dev/null; then
        echo "setup: $tool not found: install Node.js 20+ and a JDK 17+ with Maven" >&2
        exit 1
    fi
done
node_dir="$root/tests/clients/node"
node_stamp="$node_dir/node_modules/.imagegen-lock"
if [ -f "$node_stamp" ] && cmp -s "$node_dir/package-lock.json" "$node_stamp"; then
    echo "setup: Node clients up to date" >&2
else
    npm_config_cache="$IMAGEGEN_CACHE/npm" npm ci --prefix "$node_dir" --no-audit --no-fund --loglevel=error >&2
    cp "$node_dir/package-lock.json" "$node_stamp"
fi
mvn -q -B -Dstyle.color=never -Dmaven.repo.local="$IMAGEGEN_CACHE/m2" -f "$root/examples/spring-ai/pom.xml" compile >&2
