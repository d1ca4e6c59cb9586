#!/usr/bin/env bash
# A walk through imagegen's HTTP API with curl (and jq): upload a photo, generate
# synchronously and asynchronously, follow a job's status and its Server-Sent Events, fetch
# an image, train a LoRA, and use the OpenAI-compatible endpoints.
#
#   IMAGEGEN_URL=http://127.0.0.1:8080 IMAGEGEN_TOKEN=... examples/http/curl.sh [PHOTO.png]
#
# Against a local runtime: `imagegen serve --model <DIR|HUB_ID> --tokens-file tokens.txt`
# (tokens.txt holds `tenant:token` lines). Against a cluster: `kubectl port-forward
# svc/<model> 8080:80` and a token of the model's `<model>-runtime-auth` Secret or of the
# chart's runtime.auth.tokens. Not run by the test suite (it needs a served model).
set -euo pipefail
base="${IMAGEGEN_URL:-http://127.0.0.1:8080}"
token="${IMAGEGEN_TOKEN:?set IMAGEGEN_TOKEN to a token the runtime accepts}"
photo="${1:-}"
auth=(-H "Authorization: Bearer $token")
json=(-H "Content-Type: application/json")
step() { printf '\n== %s\n' "$*" >&2; }

step "health and readiness (no token needed)"
curl -fsS "$base/healthz" && echo
curl -fsS "$base/readyz" && echo

step "style presets"
curl -fsS "${auth[@]}" "$base/v1/styles" | jq -r '.[].id' | head -5

step "text-to-image, synchronous: 200 with the finished job"
job="$(curl -fsS "${auth[@]}" "${json[@]}" "$base/v1/generations" -d '{
    "prompt": "a friendly red fox wearing round glasses, head and shoulders",
    "negativePrompt": "text, watermark",
    "style": "portrait",
    "width": 512, "height": 512, "steps": 25, "guidanceScale": 7.0,
    "scheduler": "dpmpp-2m-karras", "seed": 1234, "count": 2
}')"
echo "$job" | jq '{id, state, images: [.result.images[] | {url, seed, sha256}], withheld: .result.withheld}'

step "fetch the first image (PNG; .jpg or .webp in the URL, or an Accept header, converts)"
url="$(echo "$job" | jq -r '.result.images[0].url')"
case "$url" in /*) url="$base$url" ;; esac
curl -fsS "${auth[@]}" "$url" -o fox.png && echo "wrote fox.png"

step "asynchronous: 202, a Location, and a job id of our choosing (re-sending it is idempotent)"
curl -fsS -D headers.txt -o accepted.json "${auth[@]}" "${json[@]}" -H "Prefer: respond-async" \
    "$base/v1/generations" -d '{
    "prompt": "an isometric illustration of a cozy reading nook",
    "steps": 30, "seed": 7, "jobId": "nook-0001"
}'
grep -i '^location:' headers.txt
id="$(jq -r .id accepted.json)"

step "its progress as Server-Sent Events (queued, progress..., succeeded)"
curl -fsS -N --max-time 600 "${auth[@]}" "$base/v1/jobs/$id/events" |
    while IFS= read -r line; do
        echo "$line"
        case "$line" in "event: succeeded" | "event: failed" | "event: cancelled") break ;; esac
    done || true

step "the job's status"
curl -fsS "${auth[@]}" "$base/v1/jobs/$id" | jq '{id, state, progress, timings: .result.timings}'

step "base64 in the response instead of a URL"
curl -fsS "${auth[@]}" "${json[@]}" "$base/v1/generations" -d '{
    "prompt": "a watercolor lighthouse", "steps": 20, "seed": 3, "responseFormat": "b64Json"
}' | jq -r '.result.images[0].b64Json' | base64 -d > lighthouse.png && echo "wrote lighthouse.png"

if [ -n "$photo" ]; then
    step "upload a photo: an id to refer to it by"
    upload="$(curl -fsS "${auth[@]}" -H "Content-Type: image/png" --data-binary "@$photo" \
        "$base/v1/uploads")"
    echo "$upload" | jq .
    upload_id="$(echo "$upload" | jq -r .id)"

    step "image-to-image from the upload"
    curl -fsS "${auth[@]}" "${json[@]}" "$base/v1/generations" -d "{
        \"mode\": \"ImageToImage\", \"strategy\": \"sdedit\", \"strength\": 0.6,
        \"prompt\": \"the same scene as a pencil sketch\", \"seed\": 5,
        \"image\": {\"uploadId\": \"$upload_id\"}
    }" | jq '.result.images[0].url'

    step "inpainting with a mask found from a text prompt"
    curl -fsS "${auth[@]}" "${json[@]}" "$base/v1/generations" -d "{
        \"mode\": \"Inpaint\", \"prompt\": \"a green knitted sweater\", \"seed\": 9,
        \"image\": {\"uploadId\": \"$upload_id\"}, \"maskPrompt\": \"shirt\"
    }" | jq '.result.images[0].url'

    step "train a LoRA from the upload (asynchronous), then list LoRAs"
    curl -fsS "${auth[@]}" "${json[@]}" -H "Prefer: respond-async" "$base/v1/trainings" -d "{
        \"name\": \"me\", \"images\": [{\"uploadId\": \"$upload_id\"}],
        \"instancePrompt\": \"a photo of sks person\", \"steps\": 400, \"rank\": 8
    }" | jq '{id, kind, state}'
    curl -fsS "${auth[@]}" "$base/v1/loras" | jq .
fi

step "OpenAI-compatible: images.generations"
curl -fsS "${auth[@]}" "${json[@]}" "$base/v1/images/generations" -d '{
    "prompt": "a paper boat on a pond", "n": 1, "size": "512x512", "response_format": "url"
}' | jq .

if [ -n "$photo" ]; then
    step "OpenAI-compatible: images.edits (transparent pixels of the mask are repainted)"
    curl -fsS "${auth[@]}" "$base/v1/images/edits" -F "image=@$photo" -F "mask=@$photo" \
        -F prompt="a sunny sky" -F n=1 -F size=512x512 -F response_format=b64_json |
        jq '.data | length'
fi

step "errors are JSON: {error: {code, message, field}}"
curl -sS "${auth[@]}" "${json[@]}" "$base/v1/generations" -d '{"prompt": "x", "steps": 0}' | jq .
