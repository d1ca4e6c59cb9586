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

# Runtime pods mount an emptyDir at /tmp, which hides whatever the host has there from their
# processes: the binaries, the venv their rpath names, the claims' folders.
for dir in "$IMAGEGEN_CACHE" "$CARGO_TARGET_DIR" "$IMAGEGEN_VENV"; do
    case "$(realpath -m "$dir")/" in
    /tmp/*) echo "e2e: $dir is under /tmp, which runtime pods mount an emptyDir over; use a cache outside /tmp (IMAGEGEN_CACHE)" >&2
        exit 2 ;;
    esac
done
work="$IMAGEGEN_CACHE/e2e-local"
export IMAGEGEN_CLUSTER_DIR="$work/cluster"
release=imagegen
namespace=default
wait_timeout="${E2E_TIMEOUT:-300}"
passed=0
failed=0
pids=()
declare -A operator_pids
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
    if [ "$status" -ne 0 ] || [ "$failed" -gt 0 ]; then
        step "diagnostics"
        kubectl get all,imagegenerations,loratrainings,diffusionmodels -A -o wide 2>&1 | tail -40
        for file in "$work"/operator-*.log "$IMAGEGEN_CLUSTER_DIR/logs/pod-runner.log"; do
            [ -f "$file" ] && { echo "--- $file"; tail -n 30 "$file"; }
        done
    fi
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

# Questions the steps ask of the cluster (in the release namespace).
leader() { kubectl get lease -n "$namespace" imagegen-operator -o jsonpath='{.spec.holderIdentity}'; }
leads() { [ "$(leader 2>/dev/null)" = "$1" ]; }
succeeds() { # kind/name reaches phase Succeeded
    kubectl wait -n "$namespace" "$1" --for=jsonpath='{.status.phase}'=Succeeded \
        --timeout="${wait_timeout}s" >/dev/null
}
submissions() { # of ImageGeneration $1
    kubectl get -n "$namespace" "imagegeneration/$1" \
        -o jsonpath='{.metadata.annotations.imagegen\.dev/submissions}'
}
reconciled() { # field $2 (status, message) of DiffusionModel $1's Reconciled condition
    kubectl get -n "$namespace" "dmodel/$1" \
        -o jsonpath="{.status.conditions[?(@.type==\"Reconciled\")].$2}"
}

# ---------------------------------------------------------------------------------------
step "tools and binaries"
tools_bin="$("$root/scripts/k8s-tools.sh")" || exit 1
export PATH="$tools_bin:$PATH"
export HELM_CACHE_HOME="$work/helm/cache" HELM_CONFIG_HOME="$work/helm/config" \
    HELM_DATA_HOME="$work/helm/data"
# The binaries as scripts/test.sh builds them (`cargo test` builds each package's binaries
# for its integration tests): after it, as in CI, this is a no-op, where a `cargo build`
# would compile again with other dependency features.
(cd "$root" && cargo test --release --workspace --no-run --quiet) || exit 1
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
# Its output is kept: a failed start says why there.
"$root/scripts/cluster" up >"$work/cluster-up.log" 2>&1 || {
    sed 's/^/e2e:   cluster up: /' "$work/cluster-up.log"
    exit 1
}
eval "$(grep '^export KUBECONFIG=' "$work/cluster-up.log")" || exit 1
check "the API server answers as $(kubectl version -o json 2>/dev/null |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["serverVersion"]["gitVersion"])')" \
    kubectl get --raw /readyz
check "node gpu-node is Ready and advertises nvidia.com/gpu" \
    test "$(kubectl get node gpu-node -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}/{.status.allocatable.nvidia\.com/gpu}')" = "True/4"

# The images' commands, `imagegen` and `imagegen-operator` (the uninstall hook), are the
# binaries built here.
ln -sf "$imagegen" "$work/bin/imagegen"
ln -sf "$operator" "$work/bin/imagegen-operator"
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
cp -r "$work/seed/models/tiny-sd1" "$work/seed/models/tiny-clipseg" "$store/models/"
# The runtime pods' environment (runtime.auth.existingSecret in values-local.yaml).
kubectl create secret generic -n "$namespace" e2e-runtime-env \
    --from-literal=IMAGEGEN_TOKENS="backend:$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')" \
    --from-literal=IMAGEGEN_MASK_MODEL=/store/models/tiny-clipseg >/dev/null || exit 1
cp -r "$work/seed/uploads/e2e" "$store/tenants/$namespace/uploads/"
store_claim() { # namespace, access mode, host folder: the claim imagegen-e2e-store there
    kubectl apply -f - >/dev/null <<YAML
apiVersion: v1
kind: PersistentVolume
metadata:
  name: imagegen-e2e-store-$1
spec:
  capacity: {storage: 1Gi}
  accessModes: [$2]
  persistentVolumeReclaimPolicy: Retain
  storageClassName: ""
  hostPath: {path: "$3"}
  claimRef: {namespace: $1, name: imagegen-e2e-store}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: imagegen-e2e-store
  namespace: $1
spec:
  accessModes: [$2]
  storageClassName: ""
  volumeName: imagegen-e2e-store-$1
  resources:
    requests: {storage: 1Gi}
YAML
}
store_claim "$namespace" ReadWriteMany "$store" || exit 1
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
free_port() {
    python3 -c "import socket; s = socket.socket(); s.bind(('$host_ip', 0)); print(s.getsockname()[1])"
}
# Training pods report progress to the first operator's endpoint (every replica serves it).
progress_url="http://$host_ip:$(free_port)"
start_operator() { # name
    local port="${progress_url##*:}"
    [ "$1" = operator-a ] || port="$(free_port)"
    (
        . "$work/operator.env"
        export KUBECONFIG="$work/operator.kubeconfig" POD_NAMESPACE="$namespace" POD_NAME="$1"
        export IMAGEGEN_OPERATOR_LISTEN="$host_ip:$port" IMAGEGEN_OPERATOR_URL="$progress_url"
        export IMAGEGEN_LOG_FORMAT=text RUST_LOG="${RUST_LOG:-info}"
        exec "$operator"
    ) >"$work/$1.log" 2>&1 &
    pids+=($!)
    operator_pids[$1]=$!
    disown "$!" # killed on purpose below: no job-control notice
    log "operator $1 pid $!, port $port, log $work/$1.log"
    check "operator $1 serves /healthz" wait_for "$1's /healthz" 30 \
        curl -fsS "http://$host_ip:$port/healthz"
}
start_operator operator-a
check "operator-a took the leader Lease" wait_for "the Lease" 60 leads operator-a

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
  replicas: {min: 1, max: 2}
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
    succeeds "imagegeneration/$1" || {
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
check "text-to-image with a style, count 2" generate e2e-styled <<YAML
apiVersion: imagegen.dev/v1alpha1
kind: ImageGeneration
metadata:
  name: e2e-styled
spec:
  modelRef: {name: tiny}
  prompt: a fox wearing round glasses
  style: photo
  width: 64
  height: 64
  steps: 4
  seed: 11
  count: 2
YAML
check "e2e-styled has two images, seeds 11 and 12" test "$(kubectl get -n "$namespace" \
    imagegeneration/e2e-styled -o jsonpath='{.status.images[*].seed}')" = "11 12"
check "image-to-image" generate e2e-img2img <<YAML
apiVersion: imagegen.dev/v1alpha1
kind: ImageGeneration
metadata:
  name: e2e-img2img
spec:
  modelRef: {name: tiny}
  mode: ImageToImage
  prompt: a watercolor painting
  image: {path: uploads/e2e/01.png}
  strength: 0.6
  steps: 4
  seed: 5
YAML
check "inpainting with a mask prompt (the tiny CLIPSeg)" generate e2e-mask-prompt <<YAML
apiVersion: imagegen.dev/v1alpha1
kind: ImageGeneration
metadata:
  name: e2e-mask-prompt
spec:
  modelRef: {name: tiny}
  mode: Inpaint
  prompt: a red scarf
  image: {path: uploads/e2e/01.png}
  maskPrompt: the scarf
  steps: 4
  seed: 6
YAML

# ---------------------------------------------------------------------------------------
step "trainings"
# What kubectl shows while it runs (Phase, Progress, Loss), from a watch: every status
# write shows, however short the training.
kubectl apply -n "$namespace" -f "$root/tests/e2e/manifests/lora-training.yaml" >/dev/null
kubectl get -n "$namespace" loratrain/e2e-person --watch --no-headers >"$work/loratrain.watch" 2>&1 &
watcher=$!
pids+=("$watcher")
succeeds loratrain/e2e-person
phase="$(kubectl get -n "$namespace" loratrain/e2e-person -o jsonpath='{.status.phase}')"
sleep 1
kill "$watcher" 2>/dev/null
sed 's/^/e2e:   watch: /' "$work/loratrain.watch"
check "kubectl get loratrain showed it Running" grep -q ' Running ' "$work/loratrain.watch"
# Every status write showed in the watch: the trainer's reports and the reconciler's applies
# together never moved the progress column backwards.
forwards() { awk '$3 ~ /^[0-9]+$/ { if ($3 < last) exit 1; last = $3 }' "$work/loratrain.watch"; }
check "its progress never moved backwards ($(awk '{print $3}' "$work/loratrain.watch" | paste -sd' '))" forwards
check "LoraTraining e2e-person Succeeded" test "$phase" = Succeeded
log "$(kubectl get -n "$namespace" loratrain/e2e-person)"
artifact="$(kubectl get -n "$namespace" loratrain/e2e-person -o jsonpath='{.status.artifact.path}|{.status.artifact.sha256}')"
log "artifact: $artifact"
lora_file="$store/tenants/$namespace/${artifact%%|*}"
check "its artifact is in the store with the sha256 of its status" \
    test "$(sha256sum "$lora_file" 2>/dev/null | cut -d' ' -f1)" = "${artifact##*|}"
check "its Job's pod ran imagegen train and Succeeded" test "$(kubectl get pods -n "$namespace" \
    -l job-name=e2e-person-train -o jsonpath='{.items[0].status.phase}')" = Succeeded
check "inpainting with the trained LoRA" generate e2e-inpaint \
    <"$root/tests/e2e/manifests/inpaint-with-lora.yaml"

# ---------------------------------------------------------------------------------------
step "server-side apply"
rv() { kubectl get -n "$namespace" "$1" -o jsonpath='{.metadata.resourceVersion}'; }
# A change the reconciler does not act on: the model is reconciled again, and the
# Deployment, the Service and the model's status, all unchanged, must not be written. (Once
# its queue, which the last generation just left, reads empty: that is a change.)
queue_empty() {
    test "$(kubectl get -n "$namespace" dmodel/tiny -o jsonpath='{.status.autoscaling.queue}')" = 0
}
wait_for "the model's queue to empty" 30 queue_empty
sleep 2
kubectl annotate -n "$namespace" dmodel/tiny e2e.imagegen.dev/touched="$(date +%s)" >/dev/null
before="$(rv dmodel/tiny) $(rv deployment/tiny) $(rv service/tiny)"
sleep 5
after="$(rv dmodel/tiny) $(rv deployment/tiny) $(rv service/tiny)"
log "resourceVersions (model, Deployment, Service): $before, then $after"
check "reconciling an unchanged model writes nothing (resourceVersions unchanged)" \
    test "$before" = "$after"
managers() { # the field managers of $1 and how they wrote, e.g. imagegen-operator/Apply
    kubectl get -n "$namespace" "$1" --show-managed-fields -o json | python3 -c '
import json, sys
print(" ".join(sorted("%s/%s%s" % (m["manager"], m["operation"],
                                  "/" + m["subresource"] if m.get("subresource") else "")
                      for m in json.load(sys.stdin)["metadata"]["managedFields"])))'
}
for object in deployment/tiny service/tiny dmodel/tiny; do
    log "$object managed by: $(managers "$object")"
done
check "the operator server-side applies the Deployment" \
    sh -c "kubectl get -n '$namespace' deployment/tiny --show-managed-fields -o json |
           grep -q '\"manager\": \"imagegen-operator\"' &&
           test -n \"\$(kubectl get -n '$namespace' deployment/tiny --show-managed-fields \
               -o jsonpath='{.metadata.managedFields[?(@.manager==\"imagegen-operator\")].operation}' |
               grep -x Apply)\""
check "the operator owns the model's status through an Apply on the status subresource" \
    test -n "$(managers dmodel/tiny | tr ' ' '\n' | grep -x 'imagegen-operator/Apply/status')"

# ---------------------------------------------------------------------------------------
step "leader election"
start_operator operator-b
sleep 3
check "operator-b waits as a standby while operator-a leads" leads operator-a
jobs_done() { # the runtimes' finished-job count, from their metrics, over every pod
    local total=0 address count
    for address in $(ready_addresses); do
        count="$(curl -fsS "http://$address:8080/metrics" |
            sed -n 's/^imagegen_jobs_total{state="succeeded"} //p' | head -n1)"
        total=$((total + ${count:-0}))
    done
    echo "$total"
}
done_before="$(jobs_done)"
kubectl apply -n "$namespace" -f - >/dev/null <<YAML
apiVersion: imagegen.dev/v1alpha1
kind: ImageGeneration
metadata:
  name: e2e-failover
spec:
  modelRef: {name: tiny}
  prompt: a lighthouse in a storm
  width: 256
  height: 256
  steps: 40
  seed: 7
YAML
wait_for "e2e-failover to run" 120 sh -c \
    "kubectl get -n '$namespace' imagegeneration/e2e-failover -o jsonpath='{.status.phase}' | grep -qx Running"
leader_pid="${operator_pids[operator-a]}"
kill -9 "$leader_pid"
killed_at=$(date +%s)
log "killed operator-a (pid $leader_pid) while e2e-failover ran"
# The Lease lasts 15 s and is renewed every 5 s: a take-over comes 15-20 s after the kill
# (14-19 s measured). The wait allows twice that for a machine slowed by its neighbours.
if wait_for "operator-b to lead" 40 leads operator-b; then
    pass "operator-b took the Lease over $(( $(date +%s) - killed_at ))s after the kill (duration 15 s)"
else
    fail "operator-b took the Lease over within 40 s of the kill"
fi
check "e2e-failover Succeeded under operator-b" succeeds imagegeneration/e2e-failover
check "e2e-failover was submitted once" test "$(submissions e2e-failover)" = 1
done_after="$(jobs_done)"
log "runtime jobs succeeded: $done_before before, $done_after after"
check "the runtime ran it once" test "$done_after" = "$((done_before + 1))"

# ---------------------------------------------------------------------------------------
step "restart"
# The leader restarted (SIGTERM: it releases the Lease) while a generation and a training
# run: a new operator takes over, and nothing is done twice or lost.
done_before="$(jobs_done)"
kubectl apply -n "$namespace" -f - >/dev/null <<YAML
apiVersion: imagegen.dev/v1alpha1
kind: ImageGeneration
metadata:
  name: e2e-restart
spec:
  modelRef: {name: tiny}
  prompt: a windmill at dawn
  width: 256
  height: 256
  steps: 40
  seed: 8
---
apiVersion: imagegen.dev/v1alpha1
kind: LoraTraining
metadata:
  name: e2e-restart
spec:
  modelRef: {name: tiny}
  images:
    - path: uploads/e2e/01.png
    - path: uploads/e2e/02.png
  instancePrompt: a photo of sks person
  steps: 60
  rank: 4
  resolution: 64
  seed: 3
YAML
wait_for "both to run" 120 sh -c \
    "kubectl get -n '$namespace' imagegeneration/e2e-restart loratrain/e2e-restart \
        -o jsonpath='{.items[*].status.phase}' | grep -qx 'Running Running'"
log "both Running: $(kubectl get -n "$namespace" imagegeneration/e2e-restart loratrain/e2e-restart \
    -o jsonpath='{.items[*].status.progress.percent}') percent"
kill -TERM "${operator_pids[operator-b]}"
restarted_at=$(date +%s)
start_operator operator-c
if wait_for "operator-c to lead" 30 leads operator-c; then
    pass "operator-c leads $(( $(date +%s) - restarted_at ))s after operator-b was stopped"
else
    fail "operator-c took the Lease after operator-b released it"
fi
check "e2e-restart (generation) Succeeded" succeeds imagegeneration/e2e-restart
check "e2e-restart (training) Succeeded" succeeds loratrain/e2e-restart
check "the generation was submitted once" test "$(submissions e2e-restart)" = 1
done_after="$(jobs_done)"
log "runtime jobs succeeded: $done_before before, $done_after after"
check "the runtime ran it once" test "$done_after" = "$((done_before + 1))"
training_runs="$(kubectl get jobs -n "$namespace" -o name | grep -c e2e-restart) Job(s), \
$(kubectl get pods -n "$namespace" -l job-name=e2e-restart-train -o name | wc -l) pod(s)"
log "the training ran in $training_runs"
check "the training ran in one Job with one pod" test "$training_runs" = "1 Job(s), 1 pod(s)"
check "its artifact is recorded with a sha256" test -n "$(kubectl get -n "$namespace" \
    loratrain/e2e-restart -o jsonpath='{.status.artifact.sha256}')"

# ---------------------------------------------------------------------------------------
step "replica count"
# The model's scale subresource (spec.replicas.count): kubectl scale and an HPA scale the
# model, and the Deployment follows within replicas.min..max.
replicas() { kubectl get -n "$namespace" deployment/tiny -o jsonpath='{.spec.replicas}'; }
kubectl scale -n "$namespace" dmodel/tiny --replicas=2 >/dev/null
check "kubectl scale dmodel/tiny --replicas=2 sets spec.replicas.count" test \
    "$(kubectl get -n "$namespace" dmodel/tiny -o jsonpath='{.spec.replicas.count}')" = 2
check "and the Deployment follows" wait_for "replicas 2" 30 sh -c \
    "test \"\$(kubectl get -n '$namespace' deployment/tiny -o jsonpath='{.spec.replicas}')\" = 2"
ready_count_is() { [ "$(ready_addresses | sort -u | wc -l)" = "$1" ]; }
check "both replicas become ready, each with its own address" wait_for "2 ready addresses" \
    "$wait_timeout" ready_count_is 2
log "ready addresses: $(ready_addresses | tr '\n' ' ')"
kubectl scale -n "$namespace" dmodel/tiny --replicas=5 >/dev/null
kubectl scale -n "$namespace" deployment/tiny --replicas=4 >/dev/null
check "a count of 5 is held at max 2, and scaling the Deployment itself is undone" wait_for \
    "replicas 2" 30 sh -c "test \"\$(kubectl get -n '$namespace' deployment/tiny -o jsonpath='{.spec.replicas}')\" = 2"
kubectl scale -n "$namespace" dmodel/tiny --replicas=2 >/dev/null
# An HPA reads the model's scale (and its status.selector) through the same subresource.
kubectl apply -n "$namespace" -f - >/dev/null <<YAML
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: tiny
spec:
  scaleTargetRef: {apiVersion: imagegen.dev/v1alpha1, kind: DiffusionModel, name: tiny}
  minReplicas: 1
  maxReplicas: 2
  metrics:
    - type: Resource
      resource: {name: cpu, target: {type: Utilization, averageUtilization: 80}}
YAML
hpa_got_scale() {
    kubectl get -n "$namespace" hpa/tiny \
        -o jsonpath='{.status.conditions[?(@.type=="AbleToScale")].reason}' | grep -q SucceededGetScale
}
check "a HorizontalPodAutoscaler on the DiffusionModel reads its scale (AbleToScale: SucceededGetScale)" \
    wait_for "the HPA's AbleToScale" 60 hpa_got_scale
kubectl delete -n "$namespace" hpa/tiny >/dev/null
# Generations over two pods: each is polled at the pod that took it, which holds its job.
for i in 1 2 3 4; do
    kubectl apply -n "$namespace" -f - >/dev/null <<YAML
apiVersion: imagegen.dev/v1alpha1
kind: ImageGeneration
metadata:
  name: e2e-spread-$i
spec:
  modelRef: {name: tiny}
  prompt: a small red boat number $i
  width: 64
  height: 64
  steps: 4
  seed: $i
YAML
done
for i in 1 2 3 4; do
    check "e2e-spread-$i Succeeded" succeeds "imagegeneration/e2e-spread-$i"
done
pods_used="$(for i in 1 2 3 4; do kubectl get -n "$namespace" imagegeneration/e2e-spread-$i \
    -o jsonpath='{.status.runtimePod.name}{"\n"}'; done | sort | uniq -c | tr -s ' \n' ' ')"
# Spread by job id (which pod is chance: not a check); each was polled at its own pod.
log "runtime pods of the four generations (count, pod): $pods_used"

# ---------------------------------------------------------------------------------------
step "errors"
# A model whose Deployment the API server refuses (a node selector value that is not a label
# value): the error shows on the model as a condition and an event, not only in the logs.
kubectl apply -n "$namespace" -f - >/dev/null <<YAML
apiVersion: imagegen.dev/v1alpha1
kind: DiffusionModel
metadata:
  name: e2e-refused
spec:
  source: {path: /store/models/tiny-sd1}
  family: sd15
  nodeSelector:
    nvidia.com/gpu.product: "not a label value!"
YAML
reconciled_is() { [ "$(reconciled "$1" status)" = "$2" ]; }
check "the refused Deployment shows on the model as Reconciled=False" wait_for \
    "the Reconciled condition" 60 reconciled_is e2e-refused False
log "e2e-refused: Reconciled $(reconciled e2e-refused status)/$(reconciled e2e-refused message)"
check "and as a ReconcileFailed event" wait_for "the event" 30 sh -c \
    "kubectl get events -n '$namespace' --field-selector reason=ReconcileFailed,involvedObject.name=e2e-refused -o name | grep -q ."
kubectl patch -n "$namespace" dmodel/e2e-refused --type=merge \
    -p '{"spec": {"nodeSelector": {"nvidia.com/gpu.product": "fixed"}}}' >/dev/null
check "once the spec is fixed, Reconciled is True again" wait_for "Reconciled True" 60 \
    reconciled_is e2e-refused True
kubectl delete -n "$namespace" dmodel/e2e-refused --wait=false >/dev/null
# A Secret of the name a model's runtime token would have, made by someone else: the model
# refuses it (whoever made it would know the token) and says so.
kubectl create secret generic -n "$namespace" e2e-adopt-runtime-auth \
    --from-literal=tokens="$namespace:a-token-someone-else-chose" >/dev/null
kubectl apply -n "$namespace" -f - >/dev/null <<YAML
apiVersion: imagegen.dev/v1alpha1
kind: DiffusionModel
metadata:
  name: e2e-adopt
spec:
  source: {path: /store/models/tiny-sd1}
  family: sd15
YAML
refuses_adoption() {
    reconciled e2e-adopt message | grep -q 'is not controlled by DiffusionModel e2e-adopt'
}
check "a model does not adopt a runtime-auth Secret it does not control" wait_for \
    "the Reconciled condition" 60 refuses_adoption
check "and makes no Deployment" sh -c "! kubectl get -n '$namespace' deployment/e2e-adopt 2>/dev/null"
kubectl delete -n "$namespace" dmodel/e2e-adopt secret/e2e-adopt-runtime-auth --wait=false >/dev/null

# ---------------------------------------------------------------------------------------
step "namespaces"
# A model outside the release namespace: its pods get a copy of the runtime environment
# Secret (the original is the release's) and the store claim of their own namespace. This
# one is ReadWriteOnce, as most storage classes offer: several replicas are refused (they
# could not spread over nodes), one serves, and the pods that mount it share a node.
tenant=e2e-tenant-b
kubectl create namespace "$tenant" >/dev/null
tenant_store="$volumes/$tenant/imagegen-e2e-store"
mkdir -p "$tenant_store/models"
cp -r "$work/seed/models/tiny-sd1" "$work/seed/models/tiny-clipseg" "$tenant_store/models/"
store_claim "$tenant" ReadWriteOnce "$tenant_store" || exit 1
kubectl apply -f - >/dev/null <<YAML || exit 1
apiVersion: imagegen.dev/v1alpha1
kind: DiffusionModel
metadata:
  name: tiny
  namespace: $tenant
spec:
  source: {path: /store/models/tiny-sd1}
  family: sd15
  dtype: f32
  replicas: {min: 1, max: 2}
  resources: {gpus: 1, gpuResourceName: nvidia.com/gpu}
  nodeSelector: {nvidia.com/gpu.present: "true"}
YAML
store_refused() {
    kubectl get -n "$tenant" dmodel/tiny \
        -o jsonpath='{.status.conditions[?(@.type=="Reconciled")].message}' |
        grep -q 'replicas.max is 2, but the store claim imagegen-e2e-store is not ReadWriteMany'
}
check "replicas.max 2 on a ReadWriteOnce store claim is refused on the Reconciled condition" \
    wait_for "the Reconciled condition" 60 store_refused
check "and makes no Deployment" sh -c "! kubectl get -n $tenant deployment/tiny 2>/dev/null"
kubectl patch -n "$tenant" dmodel/tiny --type=merge -p '{"spec": {"replicas": {"max": 1}}}' >/dev/null
check "DiffusionModel $tenant/tiny with replicas.max 1: Ready" kubectl wait -n "$tenant" dmodel/tiny \
    --for=condition=Ready --timeout="${wait_timeout}s"
secret_data() { # namespace, name: the Secret's data as sorted JSON
    kubectl get secret -n "$1" "$2" -o json | python3 -c \
        'import json, sys; print(json.dumps(json.load(sys.stdin)["data"], sort_keys=True))'
}
copy_owner() {
    kubectl get secret -n "$tenant" tiny-runtime-env \
        -o jsonpath='{.metadata.ownerReferences[?(@.controller==true)].kind}/{.metadata.ownerReferences[?(@.controller==true)].name}'
}
check "its namespace has a copy of the runtime environment Secret, owned by the model" \
    test "$(copy_owner)" = DiffusionModel/tiny
check "the copy holds what the release's Secret holds" \
    test "$(secret_data "$tenant" tiny-runtime-env)" = "$(secret_data "$namespace" e2e-runtime-env)"
tenant_pods() { # nodes of the pods of $tenant that mount the store, one per line
    kubectl get pods -n "$tenant" -l imagegen.dev/store-claim=imagegen-e2e-store \
        --field-selector=status.phase!=Succeeded,status.phase!=Failed \
        -o jsonpath='{range .items[*]}{.metadata.name} {.spec.nodeName}{"\n"}{end}'
}
tenant_pods | sed 's/^/e2e:   pod on node: /'
namespace="$tenant"
check "ImageGeneration in $tenant: Succeeded, and the image has the sha256 of its status" \
    generate e2e-apple <"$root/tests/e2e/manifests/generation.yaml"
namespace=default
# Rotating the release's Secret reaches the copy at the model's next reconciliation (the
# annotation wakes it now), and the new pod template rolls the replicas.
template_digest() {
    kubectl get deployment -n "$tenant" tiny \
        -o jsonpath='{.spec.template.metadata.annotations.imagegen\.dev/secrets-sha256}'
}
digest_before="$(template_digest)"
kubectl patch secret -n "$namespace" e2e-runtime-env --type=merge \
    -p '{"stringData": {"E2E_ROTATED": "1"}}' >/dev/null
kubectl annotate -n "$tenant" dmodel/tiny e2e.imagegen.dev/touched="$(date +%s)" >/dev/null
copy_rotated() {
    [ "$(secret_data "$tenant" tiny-runtime-env)" = "$(secret_data "$namespace" e2e-runtime-env)" ]
}
check "a rotated Secret reaches the copy" wait_for "the copy" 60 copy_rotated
check "and changes the pod template, so the replicas roll ($digest_before -> $(template_digest))" \
    test -n "$digest_before" -a "$(template_digest)" != "$digest_before"
check "DiffusionModel $tenant/tiny: Ready again after the roll" kubectl rollout status \
    -n "$tenant" deployment/tiny --timeout="${wait_timeout}s"
check "during the roll, old and new pods of the ReadWriteOnce claim shared a node: no Multi-Attach" \
    sh -c "! grep 'Multi-Attach' '$IMAGEGEN_CLUSTER_DIR/logs/pod-runner.log'"
# A namespace without the store claim: the model says why it cannot be served.
kubectl create namespace e2e-tenant-c >/dev/null
kubectl apply -n e2e-tenant-c -f - >/dev/null <<YAML
apiVersion: imagegen.dev/v1alpha1
kind: DiffusionModel
metadata:
  name: tiny
spec:
  source: {path: /store/models/tiny-sd1}
  family: sd15
YAML
claim_missing() {
    kubectl get -n e2e-tenant-c dmodel/tiny \
        -o jsonpath='{.status.conditions[?(@.type=="Reconciled")].message}' |
        grep -q 'store claim imagegen-e2e-store does not exist in namespace e2e-tenant-c'
}
check "a model in a namespace without the store claim says so on its Reconciled condition" \
    wait_for "the Reconciled condition" 60 claim_missing
check "and makes no Deployment" sh -c "! kubectl get -n e2e-tenant-c deployment/tiny 2>/dev/null"
# Their GPUs go back for the serving-at-scale step.
check "namespaces $tenant and e2e-tenant-c, with their models, go away" \
    kubectl delete namespace "$tenant" e2e-tenant-c --timeout=120s

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
step "deletion"
image_file() { # the stored file of generation $1's first image
    local url
    url="$(kubectl get -n "$namespace" "imagegeneration/$1" -o jsonpath='{.status.images[0].url}')"
    find "$store/tenants/$namespace" -name "$(basename "$url")" | head -n1
}
apple="$(image_file e2e-apple)"
check "e2e-apple's image is in the store ($apple)" test -f "$apple"
check "deleting ImageGeneration e2e-apple runs its finalizer" \
    kubectl delete -n "$namespace" imagegeneration/e2e-apple --timeout=60s
check "its finalizer deleted the image from the store" test ! -e "$apple"
# A namespace deleted with objects in it goes away: its generation's finalizer is released.
kubectl create namespace e2e-doomed >/dev/null
kubectl apply -n e2e-doomed -f - >/dev/null <<YAML
apiVersion: imagegen.dev/v1alpha1
kind: ImageGeneration
metadata:
  name: orphan
spec:
  modelRef: {name: nowhere}
  prompt: a generation whose model does not exist
YAML
wait_for "orphan's finalizer" 30 sh -c \
    "kubectl get -n e2e-doomed imagegeneration/orphan -o jsonpath='{.metadata.finalizers}' | grep -q imagegen.dev"
check "a namespace deleted with an ImageGeneration in it goes away" \
    kubectl delete namespace e2e-doomed --timeout=60s
check "deleting DiffusionModel tiny" kubectl delete -n "$namespace" dmodel/tiny --timeout=60s
check "the garbage collector deleted its Deployment" wait_for "the Deployment to go" 60 \
    sh -c "! kubectl get -n '$namespace' deployment/tiny"
check "and its Service" wait_for "the Service to go" 60 \
    sh -c "! kubectl get -n '$namespace' service/tiny"
check "and its pods" wait_for "the pods to go" 60 \
    sh -c "test -z \"\$(kubectl get pods -n '$namespace' -l imagegen.dev/model=tiny -o name)\""

# ---------------------------------------------------------------------------------------
. "$root/tests/e2e/steps/serving-at-scale.sh"

# ---------------------------------------------------------------------------------------
step "uninstall"
# What the chart grants, read while it is installed (the RBAC step compares it with what
# the audit log shows was used).
kubectl get clusterroles,roles -A -l app.kubernetes.io/component=operator -o json >"$work/roles.json"
# Objects that carry the operator's finalizers outlive the release (Helm keeps the CRDs).
ours() { # the operator's finalizers on every ImageGeneration and LoraTraining
    kubectl get imagegenerations,loratrainings -A \
        -o jsonpath='{range .items[*]}{.metadata.namespace}/{.metadata.name} {.metadata.finalizers}{"\n"}{end}' |
        grep 'imagegen.dev/'
}
log "before: $(ours | wc -l) objects carry the operator's finalizers"
leading="$(leader 2>/dev/null)"; leading="${leading:-none}"
if helm uninstall "$release" --namespace "$namespace" --wait --timeout 3m >"$work/uninstall.log" 2>&1; then
    pass "helm uninstall $release (its pre-delete hook ran imagegen-operator release-finalizers)"
else
    cat "$work/uninstall.log"
    fail "helm uninstall $release"
fi
hook_log="$(ls "$IMAGEGEN_CLUSTER_DIR"/pod-runner/pods/"$namespace"_*-uninstall-*/logs/release-finalizers.log 2>/dev/null | head -n1)"
[ -n "$hook_log" ] && sed 's/^/e2e:   hook: /' "$hook_log"
check "the hook took the leader Lease over" leads imagegen-uninstall
check "the replica that led ($leading) stopped reconciling: it lost the Lease and exited" \
    wait_for "$leading to exit" 30 sh -c "! kill -0 '${operator_pids[$leading]:-0}' 2>/dev/null"
# Helm deleted the operator's Deployment: its pods (here, the standbys on the host) get
# SIGTERM, as from a kubelet.
for name in "${!operator_pids[@]}"; do
    kill -TERM "${operator_pids[$name]}" 2>/dev/null || true
done
none_ours() { ! ours >/dev/null; }
check "no ImageGeneration or LoraTraining carries the operator's finalizer" none_ours
check "the objects stay ($(kubectl get imagegenerations,loratrainings -A -o name | wc -l) of them)" \
    test -n "$(kubectl get imagegenerations,loratrainings -A -o name)"
check "each says why, with a FinalizerReleased event" sh -c \
    "kubectl get events -A --field-selector reason=FinalizerReleased -o name | grep -q ."
check "with no operator, namespaces with generations, trainings and models in them go away" \
    kubectl delete namespace "${scale_tenants[@]}" --timeout=120s

# ---------------------------------------------------------------------------------------
step "RBAC"
audit="$IMAGEGEN_CLUSTER_DIR/logs/audit.log"
# One pass over the audit log for the operator's requests. RBAC's refusals carry the
# authorizer's decision; other 403s (an event created in a namespace being deleted, refused
# by admission) are listed but are not RBAC's. Then what the chart's roles (read before the
# uninstall) grant that the operator and its uninstall hook did not use in this run.
denied="$(python3 - "$audit" "system:serviceaccount:$namespace:$sa" "$work/roles.json" <<'PY'
import json, sys
denied, other, used = set(), set(), set()
for line in open(sys.argv[1], encoding="utf-8"):
    event = json.loads(line)
    if event.get("user", {}).get("username") != sys.argv[2] or "objectRef" not in event:
        continue
    ref = event["objectRef"]
    resource = ref.get("resource", "") + ("/" + ref["subresource"] if ref.get("subresource") else "")
    used.add((ref.get("apiGroup", ""), resource, event["verb"]))
    if event.get("responseStatus", {}).get("code") == 403:
        what = "%s %s in %s" % (event["verb"], ref.get("resource"), ref.get("namespace", "-"))
        decision = event.get("annotations", {}).get("authorization.k8s.io/decision")
        (denied if decision == "forbid" else other).add(what)
for what in sorted(other):
    print("e2e: 403 from admission, not RBAC: " + what, file=sys.stderr)
unused = sorted(
    "%s %s/%s" % (verb, group or "core", resource)
    for role in json.load(open(sys.argv[3]))["items"]
    for rule in role.get("rules", [])
    for group in rule.get("apiGroups", [])
    for resource in rule.get("resources", [])
    for verb in rule.get("verbs", [])
    if (group, resource, verb) not in used
)
print("e2e: the operator used %d (group, resource, verb) grants; granted but not used in this "
      "run: %s" % (len(used), ", ".join(unused) or "none"), file=sys.stderr)
print("\n".join(sorted(denied)))
PY
)"
[ -z "$denied" ] || log "RBAC refused the operator: $denied"
check "the audit log shows no RBAC refusal (403) for the operator" test -z "$denied"
