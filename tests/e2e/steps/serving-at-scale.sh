# The serving-at-scale step of tests/e2e/local.sh (sourced by it, with its helpers): three
# tenants, each with a model that starts at zero replicas, LoRAs trained while it runs none,
# a cold start, a burst of generations (half with LoRAs) spread over several replicas, a
# runtime process killed in the middle of jobs, and a scale-down after the quiet window.
# Every image must be made exactly once: the runtimes' metrics and the store count them.
#
# E2E_SCALE_GENERATIONS sets the generations per tenant (default 20: 60 in all).

step "serving at scale"
per_tenant="${E2E_SCALE_GENERATIONS:-20}"
scale_tenants=(e2e-scale-a e2e-scale-b e2e-scale-c)
declare -A scale_max=([e2e-scale-a]=3 [e2e-scale-b]=2 [e2e-scale-c]=1)
declare -A scale_loras=([e2e-scale-a]="lora-1 lora-2" [e2e-scale-b]="lora-1" [e2e-scale-c]="lora-1")
tenant_store_of() { echo "$volumes/$1/imagegen-e2e-store"; }

for ns in "${scale_tenants[@]}"; do
    kubectl create namespace "$ns" >/dev/null || exit 1
    dir="$(tenant_store_of "$ns")"
    mkdir -p "$dir/models" "$dir/tenants/$ns/uploads"
    cp -r "$work/seed/models/tiny-sd1" "$work/seed/models/tiny-clipseg" "$dir/models/"
    cp -r "$work/seed/uploads/e2e" "$dir/tenants/$ns/uploads/"
    store_claim "$ns" ReadWriteMany "$dir" || exit 1
    kubectl apply -n "$ns" -f - >/dev/null <<YAML || exit 1
apiVersion: imagegen.dev/v1alpha1
kind: DiffusionModel
metadata:
  name: tiny
spec:
  source: {path: /store/models/tiny-sd1}
  family: sd15
  dtype: f32
  replicas:
    min: 0
    max: ${scale_max[$ns]}
    queuePerReplica: 2
    scaleDownAfterSeconds: 600
  resources: {gpus: 1, gpuResourceName: nvidia.com/gpu}
  nodeSelector: {nvidia.com/gpu.present: "true"}
YAML
done
deployment_replicas() { kubectl get -n "$1" deployment/tiny -o jsonpath='{.spec.replicas}'; }
for ns in "${scale_tenants[@]}"; do
    check "$ns/tiny (min 0): a Deployment of 0 replicas, Ready False ScaledToZero" wait_for \
        "$ns's Deployment" 60 sh -c "test \"\$(kubectl get -n $ns deployment/tiny \
        -o jsonpath='{.spec.replicas}')/\$(kubectl get -n $ns dmodel/tiny \
        -o jsonpath='{.status.conditions[?(@.type==\"Ready\")].reason}')\" = 0/ScaledToZero"
done
check "the model's scale subresource has its pods' selector (status.selector, for an HPA)" \
    test -n "$(kubectl get -n e2e-scale-a dmodel/tiny -o jsonpath='{.status.selector}')"

# LoRAs, trained while the models run no replica: a training is a Job with its own GPU.
for ns in "${scale_tenants[@]}"; do
    for lora in ${scale_loras[$ns]}; do
        kubectl apply -n "$ns" -f - >/dev/null <<YAML || exit 1
apiVersion: imagegen.dev/v1alpha1
kind: LoraTraining
metadata:
  name: $lora
spec:
  modelRef: {name: tiny}
  images: [{path: uploads/e2e/01.png}, {path: uploads/e2e/02.png}]
  instancePrompt: a photo of sks person
  steps: 2
  rank: 4
  resolution: 64
  seed: ${#lora}
YAML
    done
done
for ns in "${scale_tenants[@]}"; do
    for lora in ${scale_loras[$ns]}; do
        check "$ns: LoraTraining $lora Succeeded while the model ran no replica" \
            kubectl wait -n "$ns" "loratraining/$lora" --for=jsonpath='{.status.phase}'=Succeeded \
            --timeout="${wait_timeout}s"
    done
    check "$ns: the training started no replica" test "$(deployment_replicas "$ns")" = 0
done

generation() { # namespace, name, seed, lora (or ""), steps, size
    local loras=""
    [ -z "$4" ] || loras="  loras: [{name: $4, weight: 0.8}]"
    cat <<YAML
---
apiVersion: imagegen.dev/v1alpha1
kind: ImageGeneration
metadata:
  name: $2
  namespace: $1
  labels: {e2e.imagegen.dev/batch: "${2%-*}"}
spec:
  modelRef: {name: tiny}
  prompt: a photo of sks person in a garden, number $3
$loras
  width: ${6:-96}
  height: ${6:-96}
  steps: ${5:-8}
  seed: $3
YAML
}
succeeds_in() { # namespace, kind/name
    kubectl wait -n "$1" "$2" --for=jsonpath='{.status.phase}'=Succeeded \
        --timeout="${wait_timeout}s" >/dev/null
}

# Cold start: one generation per tenant, timed from apply to its image.
declare -A cold_started
for ns in "${scale_tenants[@]}"; do
    generation "$ns" first-0 100 "" | kubectl apply -f - >/dev/null || exit 1
    cold_started[$ns]=$(date +%s.%N)
done
for ns in "${scale_tenants[@]}"; do
    if succeeds_in "$ns" imagegeneration/first-0; then
        took="$(python3 -c "print(f'{$(date +%s.%N) - ${cold_started[$ns]}:.1f}')")"
        pass "$ns: scaled from zero for its first generation, image ${took}s after apply"
    else
        fail "$ns: the first generation of a model at zero Succeeded"
    fi
    reported="$(kubectl get -n "$ns" dmodel/tiny -o jsonpath='{.status.autoscaling.lastColdStartSeconds}')"
    check "$ns: status.autoscaling reports the cold start (${reported}s to the first ready replica)" \
        test -n "$reported"
    check "$ns: events ScaledFromZero and ColdStartFinished on the model" sh -c \
        "kubectl get events -n $ns --field-selector involvedObject.kind=DiffusionModel \
         -o jsonpath='{.items[*].reason}' | grep -q ScaledFromZero &&
         kubectl get events -n $ns --field-selector involvedObject.kind=DiffusionModel \
         -o jsonpath='{.items[*].reason}' | grep -q ColdStartFinished"
done

# The burst: the rest at once, every other one with a LoRA of its tenant.
burst_started=$(date +%s)
for ns in "${scale_tenants[@]}"; do
    read -ra loras <<<"${scale_loras[$ns]}"
    for i in $(seq 1 $((per_tenant - 1))); do
        lora=""
        [ $((i % 2)) -eq 1 ] && lora="${loras[$(( (i / 2) % ${#loras[@]} ))]}"
        generation "$ns" "burst-$i" "$i" "$lora"
    done | kubectl apply -f - >/dev/null || exit 1
done
for ns in "${scale_tenants[@]}"; do
    check "$ns: the model scaled up to replicas.max ${scale_max[$ns]} for the burst" wait_for \
        "$ns at ${scale_max[$ns]} replicas" 60 sh -c "test \"\$(kubectl get -n $ns \
        deployment/tiny -o jsonpath='{.spec.replicas}')\" = ${scale_max[$ns]}"
done
for ns in "${scale_tenants[@]}"; do
    check "$ns: all $per_tenant generations Succeeded" kubectl wait -n "$ns" imagegeneration \
        --all --for=jsonpath='{.status.phase}'=Succeeded --timeout="${wait_timeout}s"
done
log "the burst of $(( ${#scale_tenants[@]} * (per_tenant - 1) )) took $(( $(date +%s) - burst_started ))s"
for ns in "${scale_tenants[@]}"; do
    kubectl get imagegenerations -n "$ns" -o json >"$work/scale-$ns.json"
done
python3 "$root/tests/e2e/scale_report.py" "$work"/scale-e2e-scale-*.json >"$work/scale-report.txt"
sed '$d; s/^/e2e:   /' "$work/scale-report.txt"
report="$(tail -n1 "$work/scale-report.txt")"
report_field() { printf '%s' "$report" | python3 -c "import json, sys; r = json.load(sys.stdin); print($1)"; }
check "e2e-scale-a's generations ran on its 3 replicas" \
    test "$(report_field 'len(r["e2e-scale-a"]["pods"])')" = 3
check "some LoRA generations went to a pod with the LoRA warm" \
    test "$(report_field 'r["all"]["lora_warm"]')" -gt 0

# Exactly once: the runtimes ran each job once (their metrics, over the model's pods) and
# stored each image once (the store's files), against the images the statuses list.
runtime_counter() { # namespace, metric line prefix: summed over the model's ready pods
    local total=0 address value
    for address in $(kubectl get endpointslices -n "$1" -l kubernetes.io/service-name=tiny \
        -o jsonpath='{range .items[*].endpoints[?(@.conditions.ready==true)]}{.addresses[0]}{"\n"}{end}'); do
        value="$(curl -fsS "http://$address:8080/metrics" | sed -n "s/^$2 //p" | head -n1)"
        total=$((total + ${value:-0}))
    done
    echo "$total"
}
stored_images() { find "$(tenant_store_of "$1")/tenants/$1/images" -name '*.png' 2>/dev/null | wc -l; }
status_images() { report_field "r['$1']['images']"; }
for ns in "${scale_tenants[@]}"; do
    ran="$(runtime_counter "$ns" 'imagegen_jobs_total{state="succeeded"}')"
    check "$ns: the runtimes ran $per_tenant jobs, one per generation (their metrics: $ran)" \
        test "$ran" = "$per_tenant"
    check "$ns: the store holds each image once ($(stored_images "$ns") files, $(status_images "$ns") in the statuses)" \
        test "$(stored_images "$ns")" = "$(status_images "$ns")"
    hits="$(runtime_counter "$ns" imagegen_lora_cache_hits_total)"
    misses="$(runtime_counter "$ns" imagegen_lora_cache_misses_total)"
    log "$ns: LoRA cache over its pods: $hits hits, $misses loads"
done

# A runtime process killed in the middle of jobs: its generations finish on another pod,
# once each.
ns=e2e-scale-a
for i in 1 2 3 4 5 6; do
    generation "$ns" "slow-$i" "$((200 + i))" "" 40 256
done | kubectl apply -f - >/dev/null || exit 1
running_on() { # a pod holding a running slow generation
    kubectl get imagegenerations -n "$ns" -l e2e.imagegen.dev/batch=slow \
        -o jsonpath='{range .items[?(@.status.phase=="Running")]}{.status.runtimePod.name}{"\n"}{end}' | head -n1
}
wait_for "a slow generation to run" 120 sh -c "test -n \"\$(kubectl get imagegenerations -n $ns \
    -l e2e.imagegen.dev/batch=slow -o jsonpath='{.items[?(@.status.phase==\"Running\")].metadata.name}')\""
victim_pod="$(running_on)"
victims="$(kubectl get imagegenerations -n "$ns" -l e2e.imagegen.dev/batch=slow -o json | python3 -c "
import json, sys
for g in json.load(sys.stdin)['items']:
    s = g.get('status', {})
    if (s.get('runtimePod') or {}).get('name') == '$victim_pod' and s.get('phase') not in ('Succeeded', 'Failed'):
        print(g['metadata']['name'])")"
container="$(kubectl get pod -n "$ns" "$victim_pod" -o jsonpath='{.status.containerStatuses[0].containerID}')"
victim_pid="${container#podrunner://}"
if [ -n "$victim_pod" ] && [ -n "$victims" ] && kill -9 -- "-$victim_pid" 2>/dev/null; then
    pass "killed the runtime of pod $victim_pod (pid $victim_pid) holding $(echo $victims | wc -w) unfinished generations: $(echo $victims)"
else
    fail "killed a runtime process in the middle of jobs (pod '$victim_pod', pid '$victim_pid', generations '$victims')"
fi
check "$ns: every slow generation Succeeded" kubectl wait -n "$ns" imagegeneration \
    -l e2e.imagegen.dev/batch=slow --for=jsonpath='{.status.phase}'=Succeeded --timeout="${wait_timeout}s"
for name in $victims; do
    moved="$(kubectl get -n "$ns" "imagegeneration/$name" -o jsonpath='{.status.runtimePod.name}')"
    check "$name: submitted twice (once lost with its pod), finished on $moved, not $victim_pod" \
        test "$(kubectl get -n "$ns" "imagegeneration/$name" \
        -o jsonpath='{.metadata.annotations.imagegen\.dev/submissions}')/$([ "$moved" != "$victim_pod" ] && echo other)" = 2/other
done
kubectl get imagegenerations -n "$ns" -o json >"$work/scale-$ns.json"
report="$(python3 "$root/tests/e2e/scale_report.py" "$work/scale-$ns.json" | tail -n1)"
check "$ns: after the kill, the store still holds each image once ($(stored_images "$ns") files, $(status_images "$ns") in the statuses)" \
    test "$(stored_images "$ns")" = "$(status_images "$ns")"

# Scale down after the quiet window: e2e-scale-c's, set to 10 s now that its queue is empty.
kubectl patch -n e2e-scale-c dmodel/tiny --type=merge \
    -p '{"spec": {"replicas": {"scaleDownAfterSeconds": 10}}}' >/dev/null
quiet_from=$(date +%s)
if wait_for "e2e-scale-c back at zero" 120 sh -c \
    "test \"\$(kubectl get -n e2e-scale-c deployment/tiny -o jsonpath='{.spec.replicas}')\" = 0"; then
    pass "e2e-scale-c scaled back to zero $(( $(date +%s) - quiet_from ))s after its window was set to 10 s"
else
    fail "e2e-scale-c scaled back to zero after its quiet window"
fi
check "e2e-scale-c: a ScaledDown event" sh -c "kubectl get events -n e2e-scale-c \
    --field-selector involvedObject.kind=DiffusionModel -o jsonpath='{.items[*].reason}' | grep -q ScaledDown"
check "e2e-scale-c: its pods are gone" wait_for "e2e-scale-c's pods to go" 60 sh -c \
    "test -z \"\$(kubectl get pods -n e2e-scale-c -l imagegen.dev/model=tiny \
    --field-selector=status.phase=Running -o name)\""
