#!/usr/bin/env bash
# End to end on a real Kubernetes control plane on this machine, without a container engine:
#
#   tests/e2e/local.sh [EXTRA_MANIFEST_DIR ...]
#
# scripts/cluster runs etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok
# (two fake nodes, one with nvidia.com/gpu). The pod runner (tests/cluster/podrunner, a
# stand-in for a kubelet and a container runtime, test tooling only) runs the containers of
# pods bound to those nodes as local processes, each pod in its own network namespace on a
# bridge (10.244.0.0/16, the host at 10.244.0.1) and its own mount namespace. The chart is
# installed with helm; the operator runs on this host with its ServiceAccount's token, so
# what it may do is what the chart's RBAC grants.
#
# Every step prints one line per object it checks, and the last line is
# `e2e: N passed, M failed`. In each EXTRA_MANIFEST_DIR, a file whose name starts with
# `invalid-` must be refused by the API server; every other object must reach Succeeded
# (ImageGeneration, LoraTraining) or Ready (DiffusionModel).
#
# Needs what .ci/run installs (scripts/setup.sh, the Rust build, scripts/cluster's Go build);
# keeps its state in $IMAGEGEN_CACHE/e2e-local and stops every process it started, by pid,
# also when it fails.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
. "$root/scripts/env.sh"
extra_dirs=("$@")
for dir in "${extra_dirs[@]}"; do
    [ -d "$dir" ] || { echo "e2e: $dir is not a folder" >&2; exit 2; }
done

work="$IMAGEGEN_CACHE/e2e-local"
export IMAGEGEN_CLUSTER_DIR="$work/cluster"
release=imagegen
namespace=default
wait_timeout="${E2E_TIMEOUT:-300}"
passed=0
failed=0
pids=()
started=$(date +%s)

log() { printf 'e2e: %s\n' "$*"; }
step() { printf '\ne2e: == %s (%ss)\n' "$*" "$(( $(date +%s) - started ))"; }
pass() { passed=$((passed + 1)); log "ok: $*"; }
fail() { failed=$((failed + 1)); log "FAILED: $*"; }
# Runs "$@" (its standard output dropped); passes or fails the check named by the first
# argument.
check() {
    local what="$1"
    shift
    if "$@" >/dev/null; then pass "$what"; else fail "$what"; fi
}

cleanup() {
    local status=$?
    step "teardown"
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -9 "$pid" 2>/dev/null || true
    done
    "$root/scripts/cluster" down >/dev/null 2>&1 || log "scripts/cluster down failed"
    [ "$status" -eq 0 ] || fail "the script stopped early (exit $status)"
    echo "e2e: $passed passed, $failed failed"
    if [ "$failed" -gt 0 ]; then exit 1; fi
    exit 0
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Polls "$@" every second until it succeeds or $2 seconds pass; $1 names what is awaited.
wait_for() {
    local what="$1" seconds="$2"
    shift 2
    local deadline=$(( $(date +%s) + seconds ))
    until "$@" >/dev/null 2>&1; do
        if [ "$(date +%s)" -ge "$deadline" ]; then
            log "timed out after ${seconds}s waiting for $what"
            return 1
        fi
        sleep 1
    done
}

# ---------------------------------------------------------------------------------------
step "tools and binaries"
tools_bin="$("$root/scripts/k8s-tools.sh")" || exit 1
export PATH="$tools_bin:$PATH"
export HELM_CACHE_HOME="$work/helm/cache" HELM_CONFIG_HOME="$work/helm/config" \
    HELM_DATA_HOME="$work/helm/data"
(cd "$root" && cargo build --release --quiet -p imagegen-runtime -p imagegen-operator --bins) ||
    exit 1
imagegen="$CARGO_TARGET_DIR/release/imagegen"
operator="$CARGO_TARGET_DIR/release/imagegen-operator"
"$root/scripts/cluster" build >/dev/null || exit 1
log "helm $(helm version --short), kubectl $(kubectl version --client -o json |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["clientVersion"]["gitVersion"])')"

# ---------------------------------------------------------------------------------------
step "control plane"
"$root/scripts/cluster" down >/dev/null 2>&1 || true
rm -rf "$work"
mkdir -p "$work/bin" "$work/seed"
eval "$("$root/scripts/cluster" up 2>&1 | grep '^export KUBECONFIG=')" || exit 1
check "the API server answers as $(kubectl version -o json 2>/dev/null |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["serverVersion"]["gitVersion"])')" \
    kubectl get --raw /readyz
check "node gpu-node is Ready and advertises nvidia.com/gpu" \
    test "$(kubectl get node gpu-node -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}/{.status.allocatable.nvidia\.com/gpu}')" = "True/4"

# The runtime image's command, `imagegen`, is the binary built here.
ln -sf "$imagegen" "$work/bin/imagegen"
"$root/scripts/cluster" runner --path "$work/bin" || exit 1
volumes="$IMAGEGEN_CLUSTER_DIR/volumes"
# The host as the pods see it: what they call (the operator's progress endpoint) listens here.
host_ip=10.244.0.1

# ---------------------------------------------------------------------------------------
step "helm install"
# The store: a claim bound to a volume of the pod runner's, seeded with the tiny model.
"$IMAGEGEN_VENV/bin/python" "$root/tests/e2e/make_tiny_model.py" "$work/seed" >/dev/null || exit 1
store="$volumes/$namespace/imagegen-e2e-store"
mkdir -p "$store/models" "$store/tenants/$namespace/uploads"
cp -r "$work/seed/models/tiny-sd1" "$store/models/"
cp -r "$work/seed/uploads/e2e" "$store/tenants/$namespace/uploads/"
kubectl apply -f - >/dev/null <<YAML || exit 1
apiVersion: v1
kind: PersistentVolume
metadata:
  name: imagegen-e2e-store
spec:
  capacity: {storage: 1Gi}
  accessModes: [ReadWriteMany]
  persistentVolumeReclaimPolicy: Retain
  storageClassName: ""
  hostPath: {path: "$store"}
  claimRef: {namespace: $namespace, name: imagegen-e2e-store}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: imagegen-e2e-store
  namespace: $namespace
spec:
  accessModes: [ReadWriteMany]
  storageClassName: ""
  volumeName: imagegen-e2e-store
  resources:
    requests: {storage: 1Gi}
YAML
if helm install "$release" "$root/charts/imagegen" --namespace "$namespace" \
    -f "$root/tests/e2e/values-local.yaml" --wait --timeout 2m >"$work/helm.log" 2>&1; then
    pass "helm install $release (chart $(helm list -n "$namespace" -o json |
        python3 -c 'import json, sys; print(json.load(sys.stdin)[0]["chart"])'))"
else
    cat "$work/helm.log"
    fail "helm install"
    exit 1
fi
for crd in diffusionmodels imagegenerations loratrainings; do
    check "CRD $crd.imagegen.dev is Established (its schema and every CEL rule compiled)" \
        kubectl wait --for=condition=Established "crd/$crd.imagegen.dev" --timeout=30s
done

# ---------------------------------------------------------------------------------------
step "admission"
# Refused by the API server, with the message naming the field: each file's `# expect:` line.
refuse() {
    local file="$1" out expect
    expect="$(sed -n 's/^# expect: //p' "$file")"
    if out="$(kubectl apply -n "$namespace" -f "$file" 2>&1)"; then
        kubectl delete -n "$namespace" -f "$file" --wait=false >/dev/null 2>&1
        log "$(basename "$file") was admitted: $out"
        return 1
    fi
    out="$(printf '%s\n' "$out" | grep -v '^Warning: ')"
    log "$(basename "$file"): $out"
    [ -z "$expect" ] || printf '%s' "$out" | grep -qF -- "$expect"
}
for file in "$root"/tests/e2e/admission/invalid-*.yaml; do
    check "refused: $(basename "$file")" refuse "$file"
done
# Every example, adapted to the model `tiny`, passes the API server's validation.
for file in "$root"/examples/*.yaml; do
    check "admitted (server dry run): examples/$(basename "$file")" sh -c \
        "sed 's/name: sd15$/name: tiny/' '$file' |
         kubectl apply -n '$namespace' --dry-run=server -f - >/dev/null"
done

# ---------------------------------------------------------------------------------------
step "operator"
# The operator's ServiceAccount from the chart, and a token for it: RBAC is the chart's.
sa="$(kubectl get deployment -n "$namespace" -l app.kubernetes.io/component=operator \
    -o jsonpath='{.items[0].spec.template.spec.serviceAccountName}')"
token="$(kubectl create token "$sa" -n "$namespace" --duration=2h)" || exit 1
server="$(kubectl config view --minify -o jsonpath='{.clusters[0].cluster.server}')"
kubectl config view --raw --minify -o jsonpath='{.clusters[0].cluster.certificate-authority-data}' |
    base64 -d >"$work/ca.crt"
cat >"$work/operator.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters: [{name: local, cluster: {server: "$server", certificate-authority: "$work/ca.crt"}}]
users: [{name: operator, user: {token: "$token"}}]
contexts: [{name: operator, context: {cluster: local, user: operator, namespace: $namespace}}]
current-context: operator
EOF
# The chart's settings for the operator, as its (scaled to zero) Deployment carries them.
kubectl get deployment -n "$namespace" -l app.kubernetes.io/component=operator -o json |
    python3 -c '
import json, shlex, sys
container = json.load(sys.stdin)["items"][0]["spec"]["template"]["spec"]["containers"][0]
for env in container.get("env", []):
    if "value" in env:
        print("export %s=%s" % (env["name"], shlex.quote(env["value"])))' >"$work/operator.env"
operator_port=$(python3 -c "import socket; s = socket.socket(); s.bind(('$host_ip', 0)); print(s.getsockname()[1])")
start_operator() { # name
    (
        . "$work/operator.env"
        export KUBECONFIG="$work/operator.kubeconfig" POD_NAMESPACE="$namespace" POD_NAME="$1"
        export IMAGEGEN_OPERATOR_LISTEN="$host_ip:$operator_port"
        export IMAGEGEN_OPERATOR_URL="http://$host_ip:$operator_port"
        export IMAGEGEN_LOG_FORMAT=text RUST_LOG="${RUST_LOG:-info}"
        exec "$operator"
    ) >"$work/$1.log" 2>&1 &
    pids+=($!)
    log "operator $1 pid ${pids[-1]}, log $work/$1.log"
}
start_operator operator-a
check "operator-a took the leader Lease" wait_for "the Lease" 60 sh -c \
    "kubectl get lease -n '$namespace' imagegen-operator -o jsonpath='{.spec.holderIdentity}' | grep -qx operator-a"

# ---------------------------------------------------------------------------------------
step "models"
kubectl apply -n "$namespace" -f - >/dev/null <<YAML || exit 1
apiVersion: imagegen.dev/v1alpha1
kind: DiffusionModel
metadata:
  name: tiny
spec:
  source:
    path: /store/models/tiny-sd1
  family: sd15
  dtype: f32
  replicas: {min: 1, max: 1}
  resources:
    gpus: 1
    gpuResourceName: nvidia.com/gpu
  nodeSelector:
    nvidia.com/gpu.present: "true"
YAML
check "DiffusionModel tiny: Deployment created" wait_for "the Deployment" 60 \
    kubectl get deployment -n "$namespace" tiny
check "DiffusionModel tiny: Service created" kubectl get service -n "$namespace" tiny
check "DiffusionModel tiny: Ready" \
    kubectl wait -n "$namespace" dmodel/tiny --for=condition=Ready --timeout="${wait_timeout}s"
ready_addresses() {
    kubectl get endpointslices -n "$namespace" -l kubernetes.io/service-name=tiny \
        -o jsonpath='{range .items[*].endpoints[?(@.conditions.ready==true)]}{.addresses[0]}{"\n"}{end}'
}
check "DiffusionModel tiny: its EndpointSlice lists a ready address ($(ready_addresses | head -n1))" \
    test -n "$(ready_addresses)"
kubectl get dmodel -n "$namespace" tiny >"$work/dmodel.txt"
sed 's/^/e2e:   /' "$work/dmodel.txt"
check "kubectl get dmodel prints the printer columns" \
    grep -qE '^NAME +FAMILY +READY' "$work/dmodel.txt"

# ---------------------------------------------------------------------------------------
step "generations"
generate() { # name, manifest on stdin
    kubectl apply -n "$namespace" -f - >/dev/null || return 1
    kubectl wait -n "$namespace" "imagegeneration/$1" --for=jsonpath='{.status.phase}'=Succeeded \
        --timeout="${wait_timeout}s" >/dev/null || {
        kubectl get -n "$namespace" "imagegeneration/$1" -o yaml | sed 's/^/e2e:   /'
        return 1
    }
    local url sha pod path got
    url="$(kubectl get -n "$namespace" "imagegeneration/$1" -o jsonpath='{.status.images[0].url}')"
    sha="$(kubectl get -n "$namespace" "imagegeneration/$1" -o jsonpath='{.status.images[0].sha256}')"
    pod="$(kubectl get -n "$namespace" "imagegeneration/$1" -o jsonpath='{.status.runtimePod.address}')"
    # The image is fetched from the pod that made it; its URL names the Service.
    path="/${url#*://*/}"
    curl -fsS -H "Authorization: Bearer $(runtime_token)" "http://$pod$path" -o "$work/$1.png" ||
        return 1
    got="$(sha256sum "$work/$1.png" | cut -d' ' -f1)"
    log "$1: $url from $pod: sha256 $got"
    [ "$got" = "$sha" ]
}
runtime_token() {
    kubectl get secret -n "$namespace" tiny-runtime-auth -o jsonpath='{.data.tokens}' |
        base64 -d | grep -v '^#' | grep "^$namespace:" | head -n1 | cut -d: -f2-
}
check "ImageGeneration text-to-image: Succeeded, and the image has the sha256 of its status" \
    generate e2e-apple <"$root/tests/e2e/manifests/generation.yaml"

# ---------------------------------------------------------------------------------------
step "extra manifests"
for dir in "${extra_dirs[@]}"; do
    for file in "$dir"/*.yaml; do
        [ -e "$file" ] || continue
        case "$(basename "$file")" in
        invalid-*) check "refused: $file" refuse "$file" ;;
        *)
            kind="$(sed -n 's/^kind: //p' "$file" | head -n1)"
            name="$(sed -n 's/^  name: //p' "$file" | head -n1)"
            case "$kind" in
            DiffusionModel) condition="--for=condition=Ready" ;;
            *) condition="--for=jsonpath={.status.phase}=Succeeded" ;;
            esac
            check "$kind $name from $file" sh -c \
                "kubectl apply -n '$namespace' -f '$file' >/dev/null &&
                 kubectl wait -n '$namespace' '$kind/$name' '$condition' --timeout='${wait_timeout}s' >/dev/null"
            ;;
        esac
    done
done

# ---------------------------------------------------------------------------------------
step "RBAC"
audit="$IMAGEGEN_CLUSTER_DIR/logs/audit.log"
denied="$(python3 - "$audit" "system:serviceaccount:$namespace:$sa" <<'PY'
import json, sys
denied = set()
for line in open(sys.argv[1], encoding="utf-8"):
    event = json.loads(line)
    if event.get("user", {}).get("username") == sys.argv[2] and \
            event.get("responseStatus", {}).get("code") == 403:
        denied.add("%s %s" % (event["verb"], event["objectRef"].get("resource")))
print("\n".join(sorted(denied)))
PY
)"
[ -z "$denied" ] || log "the operator was refused: $denied"
check "the audit log shows no 403 for the operator" test -z "$denied"
