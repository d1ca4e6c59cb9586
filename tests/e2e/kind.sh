#!/usr/bin/env bash
# End to end on a throw-away kind cluster: build both images, load them, install the chart
# with a tiny model and a C2PA signing certificate, run a text-to-image ImageGeneration, a LoraTraining and an inpainting
# with the trained LoRA, wait for each to succeed, fetch the image through the runtime's HTTP
# API (signed: it carries a C2PA manifest), run `helm test`, and delete the cluster.
#
#   tests/e2e/kind.sh            (KEEP_CLUSTER=1 to keep the cluster for a look afterwards)
#
# Needs docker, kind, kubectl, helm (v3.8+ or v4) and python3 with venv and pip; downloads
# PyTorch (CPU) to build the tiny model. .github/workflows/e2e-kind.yml runs it on a hosted
# runner.
set -euo pipefail

cat >&2 <<'NOTE'
tests/e2e/kind.sh needs a Docker engine and kind. It is not run in this repository's CI
(.ci/run), which has neither, and has not been run there: the workflow
.github/workflows/e2e-kind.yml runs it on a GitHub-hosted runner.
NOTE

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cluster="${KIND_CLUSTER:-imagegen-e2e}"
namespace=imagegen-system
release=imagegen
work="$(mktemp -d)"
wait_timeout="${E2E_TIMEOUT:-20m}"

for tool in docker kind kubectl helm python3 curl openssl; do
    command -v "$tool" >/dev/null 2>&1 || { echo "kind.sh: $tool is not installed" >&2; exit 1; }
done
docker info >/dev/null 2>&1 || { echo "kind.sh: no Docker engine answers" >&2; exit 1; }

step() { printf '\n== %s (%s)\n' "$*" "$(date -u +%H:%M:%S)" >&2; }

diagnose() {
    step "diagnostics"
    kubectl get all,pvc,imagegenerations,loratrainings,diffusionmodels -A -o wide || true
    kubectl -n "$namespace" describe pods || true
    kubectl -n "$namespace" logs -l app.kubernetes.io/component=operator --tail=200 --all-containers || true
    kubectl -n "$namespace" logs -l app.kubernetes.io/component=runtime --tail=200 --all-containers || true
    kubectl -n "$namespace" get events --sort-by=.lastTimestamp | tail -50 || true
}
cleanup() {
    status=$?
    [ "$status" -eq 0 ] || diagnose
    if [ -n "${port_forward:-}" ]; then kill "$port_forward" 2>/dev/null || true; fi
    if [ "${KEEP_CLUSTER:-0}" = 1 ]; then
        echo "kind.sh: keeping cluster $cluster (kind delete cluster --name $cluster)" >&2
    else
        kind delete cluster --name "$cluster" >/dev/null 2>&1 || true
    fi
    rm -rf "$work"
    exit "$status"
}
trap cleanup EXIT

step "cluster"
kind create cluster --name "$cluster" --wait 180s
kubectl config use-context "kind-$cluster"
node="$(kubectl get nodes -o jsonpath='{.items[0].metadata.name}')"
# DiffusionModels ask for at least one unit of an extended resource (a GPU on real
# clusters): advertise slots of a stand-in resource on the CPU-only node.
kubectl patch node "$node" --subresource=status --type=json \
    -p '[{"op":"add","path":"/status/capacity/imagegen.dev~1cpu-slot","value":"4"}]'

step "images"
docker build -f "$root/docker/operator.Dockerfile" -t imagegen-operator:e2e "$root"
docker build -f "$root/docker/runtime.Dockerfile" -t imagegen:e2e-cpu \
    --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu \
    --build-arg BASE_IMAGE=debian:bookworm-slim "$root"
kind load docker-image --name "$cluster" imagegen-operator:e2e imagegen:e2e-cpu

step "tiny model and photos"
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install --quiet --index-url https://download.pytorch.org/whl/cpu torch==2.11.0
grep -Ev '^(torch|peft|accelerate)([=<> ]|$)' "$root/scripts/requirements.txt" > "$work/requirements.txt"
"$work/venv/bin/pip" install --quiet -r "$work/requirements.txt"
"$work/venv/bin/python" "$root/tests/e2e/make_tiny_model.py" "$work/seed"

step "store claim, seeded"
kubectl create namespace "$namespace"
kubectl -n "$namespace" apply -f - <<YAML
apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: imagegen-e2e-store
spec:
  accessModes: [ReadWriteOnce]
  resources:
    requests:
      storage: 1Gi
---
apiVersion: v1
kind: Pod
metadata:
  name: store-seed
spec:
  securityContext:
    runAsUser: 65532
    runAsGroup: 65532
    fsGroup: 65532
  containers:
    - name: seed
      image: busybox:1.37
      command: ["sleep", "3600"]
      volumeMounts:
        - name: store
          mountPath: /store
  volumes:
    - name: store
      persistentVolumeClaim:
        claimName: imagegen-e2e-store
YAML
kubectl -n "$namespace" wait pod/store-seed --for=condition=Ready --timeout=180s
# The model by path; the photos where the runtime looks for this namespace's uploads
# (tenant = namespace).
kubectl -n "$namespace" exec store-seed -- mkdir -p /store/models "/store/tenants/$namespace/uploads"
kubectl -n "$namespace" cp "$work/seed/models/tiny-sd1" store-seed:/store/models/tiny-sd1
kubectl -n "$namespace" cp "$work/seed/uploads/e2e" "store-seed:/store/tenants/$namespace/uploads/e2e"
kubectl -n "$namespace" exec store-seed -- ls -R /store
kubectl -n "$namespace" delete pod store-seed --wait=true

step "C2PA signing certificate (runtime.c2pa.existingSecret in values-kind.yaml)"
"$root/scripts/c2pa-test-cert.sh" "$work/c2pa" 2
kubectl -n "$namespace" create secret tls imagegen-c2pa \
    --cert="$work/c2pa/chain.pem" --key="$work/c2pa/key.pem"

step "helm install"
helm install "$release" "$root/charts/imagegen" --namespace "$namespace" \
    -f "$root/tests/e2e/values-kind.yaml" --wait --timeout 5m
kubectl -n "$namespace" rollout status "deployment/$release-operator" --timeout=180s
kubectl -n "$namespace" wait diffusionmodel/tiny --for=condition=Ready --timeout="$wait_timeout"

step "text-to-image and LoRA training"
kubectl -n "$namespace" apply -f "$root/tests/e2e/manifests/generation.yaml"
kubectl -n "$namespace" apply -f "$root/tests/e2e/manifests/lora-training.yaml"
kubectl -n "$namespace" wait imagegeneration/e2e-apple \
    --for=jsonpath='{.status.phase}'=Succeeded --timeout="$wait_timeout"
kubectl -n "$namespace" wait loratraining/e2e-person \
    --for=jsonpath='{.status.phase}'=Succeeded --timeout="$wait_timeout"
kubectl -n "$namespace" get imagegenerations,loratrainings -o wide

step "inpainting with the trained LoRA"
kubectl -n "$namespace" apply -f "$root/tests/e2e/manifests/inpaint-with-lora.yaml"
kubectl -n "$namespace" wait imagegeneration/e2e-inpaint \
    --for=jsonpath='{.status.phase}'=Succeeded --timeout="$wait_timeout"

step "fetch the image through the runtime's HTTP API"
url="$(kubectl -n "$namespace" get imagegeneration/e2e-apple -o jsonpath='{.status.images[0].url}')"
sha="$(kubectl -n "$namespace" get imagegeneration/e2e-apple -o jsonpath='{.status.images[0].sha256}')"
[ -n "$url" ] && [ -n "$sha" ] || { echo "kind.sh: the ImageGeneration reports no image" >&2; exit 1; }
# The operator's token for this namespace's tenant, from the Secret it made for the model.
token="$(kubectl -n "$namespace" get secret tiny-runtime-auth -o jsonpath='{.data.tokens}' |
    base64 -d | grep -v '^#' | grep "^$namespace:" | head -n1 | cut -d: -f2-)"
kubectl -n "$namespace" port-forward svc/tiny 18080:80 >"$work/port-forward.log" 2>&1 &
port_forward=$!
for _ in $(seq 30); do curl -fsS http://127.0.0.1:18080/healthz >/dev/null 2>&1 && break; sleep 1; done
case "$url" in *://*) path="/${url#*://*/}" ;; *) path="$url" ;; esac
curl -fsS -H "Authorization: Bearer $token" "http://127.0.0.1:18080$path" -o "$work/apple.png"
head -c 8 "$work/apple.png" | od -An -tx1 | tr -d ' \n' | grep -q '^89504e470d0a1a0a$' ||
    { echo "kind.sh: $url is not a PNG" >&2; exit 1; }
# Signed: the runtime embeds its C2PA manifest in a PNG `caBX` chunk.
grep -q -a caBX "$work/apple.png" || { echo "kind.sh: $url carries no C2PA manifest" >&2; exit 1; }
got="$(sha256sum "$work/apple.png" | cut -d' ' -f1)"
[ "$got" = "$sha" ] || { echo "kind.sh: sha256 $got, the status says $sha" >&2; exit 1; }
echo "kind.sh: fetched $url ($(wc -c <"$work/apple.png") bytes, sha256 matches)" >&2
kill "$port_forward"; port_forward=

step "helm test"
helm test "$release" --namespace "$namespace" --timeout 10m --logs

step "done: every step passed"
