{{/* Chart name, or nameOverride. */}}
{{- define "imagegen.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Base of object names: the release name when it already contains the chart name (release
"imagegen" gives "imagegen-operator"), otherwise "<release>-<chart>".
*/}}
{{- define "imagegen.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "imagegen.operatorName" -}}
{{- printf "%s-operator" (include "imagegen.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "imagegen.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object of the release. */}}
{{- define "imagegen.labels" -}}
helm.sh/chart: {{ include "imagegen.chart" . }}
app.kubernetes.io/name: {{ include "imagegen.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: imagegen
{{- end }}

{{/*
Selector of the operator pods. The component label keeps it apart from the runtime pods,
which the operator labels app.kubernetes.io/name=imagegen, app.kubernetes.io/component=runtime.
*/}}
{{- define "imagegen.operatorSelectorLabels" -}}
app.kubernetes.io/name: {{ include "imagegen.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "imagegen.operatorLabels" -}}
{{ include "imagegen.labels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "imagegen.operatorServiceAccountName" -}}
{{- if .Values.operator.serviceAccount.create }}
{{- default (include "imagegen.operatorName" .) .Values.operator.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.operator.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "imagegen.operatorImage" -}}
{{- $tag := default .Chart.AppVersion .Values.operator.image.tag }}
{{- printf "%s:%s" .Values.operator.image.repository $tag }}
{{- end }}

{{/* The runtime image: the CPU variant carries the "-cpu" tag suffix. */}}
{{- define "imagegen.runtimeImage" -}}
{{- $tag := .Values.runtime.image.tag }}
{{- if not $tag }}
{{- $tag = ternary .Chart.AppVersion (printf "%s-cpu" .Chart.AppVersion) .Values.gpu.enabled }}
{{- end }}
{{- printf "%s:%s" .Values.runtime.image.repository $tag }}
{{- end }}

{{/* The store as the runtime reads it (IMAGEGEN_STORE). */}}
{{- define "imagegen.storeUrl" -}}
{{- if eq .Values.store.type "s3" }}
{{- $prefix := trimAll "/" .Values.store.s3.prefix }}
{{- if $prefix }}
{{- printf "s3://%s/%s" .Values.store.s3.bucket $prefix }}
{{- else }}
{{- printf "s3://%s" .Values.store.s3.bucket }}
{{- end }}
{{- else }}
{{- print "file:///store" }}
{{- end }}
{{- end }}

{{- define "imagegen.storeClaimName" -}}
{{- default (printf "%s-store" (include "imagegen.fullname" .)) .Values.store.local.existingClaim }}
{{- end }}

{{/*
An existing Secret that holds the runtime pods' environment: store.s3.credentials.existingSecret
or runtime.auth.existingSecret (the operator passes one Secret, IMAGEGEN_STORE_SECRET, so when
both are set they must name the same one).
*/}}
{{- define "imagegen.existingEnvSecret" -}}
{{- $s3 := "" }}
{{- if eq .Values.store.type "s3" }}
{{- $s3 = .Values.store.s3.credentials.existingSecret }}
{{- end }}
{{- default $s3 .Values.runtime.auth.existingSecret }}
{{- end }}

{{/* Whether the chart renders the runtime environment Secret. */}}
{{- define "imagegen.createRuntimeEnvSecret" -}}
{{- if and (not (include "imagegen.existingEnvSecret" .)) (or (eq .Values.store.type "s3") .Values.runtime.auth.tokens) }}true{{ end }}
{{- end }}

{{/* The Secret whose keys become the runtime pods' environment (IMAGEGEN_STORE_SECRET). */}}
{{- define "imagegen.runtimeEnvSecretName" -}}
{{- if include "imagegen.existingEnvSecret" . }}
{{- include "imagegen.existingEnvSecret" . }}
{{- else if include "imagegen.createRuntimeEnvSecret" . }}
{{- printf "%s-runtime-env" (include "imagegen.fullname" .) }}
{{- end }}
{{- end }}

{{/* Base URL training pods report progress to: the operator Service. */}}
{{- define "imagegen.operatorUrl" -}}
{{- printf "http://%s.%s.svc:%d" (include "imagegen.operatorName" .) .Release.Namespace (int .Values.operator.service.port) }}
{{- end }}

{{/* Namespaces the NetworkPolicy goes to: listed, or the release's and the models'. */}}
{{- define "imagegen.runtimeNamespaces" -}}
{{- $namespaces := list }}
{{- if .Values.networkPolicy.namespaces }}
{{- $namespaces = .Values.networkPolicy.namespaces }}
{{- else }}
{{- $namespaces = list .Release.Namespace }}
{{- range .Values.models }}
{{- $namespaces = append $namespaces (default $.Release.Namespace .namespace) }}
{{- end }}
{{- end }}
{{- $namespaces | uniq | toJson }}
{{- end }}

{{/* Values that cannot be wired: fail with the reason instead of ignoring them. */}}
{{- define "imagegen.validate" -}}
{{- $s3Secret := .Values.store.s3.credentials.existingSecret }}
{{- $authSecret := .Values.runtime.auth.existingSecret }}
{{- if and (eq .Values.store.type "s3") $s3Secret $authSecret (ne $s3Secret $authSecret) }}
{{- fail "store.s3.credentials.existingSecret and runtime.auth.existingSecret differ, but runtime pods get one Secret's keys as their environment: put AWS_* and IMAGEGEN_TOKENS in one Secret and name it in both" }}
{{- end }}
{{- if and (include "imagegen.existingEnvSecret" .) (or .Values.store.s3.endpoint .Values.store.s3.region .Values.store.s3.credentials.accessKeyId .Values.store.s3.credentials.secretAccessKey .Values.runtime.auth.tokens) }}
{{- fail (printf "the existing Secret %s is the whole runtime environment: put AWS_ENDPOINT, AWS_REGION, credentials and IMAGEGEN_TOKENS in it rather than in values" (include "imagegen.existingEnvSecret" .)) }}
{{- end }}
{{- if and (eq .Values.store.type "s3") (or .Values.store.s3.credentials.accessKeyId .Values.store.s3.credentials.secretAccessKey) (not (and .Values.store.s3.credentials.accessKeyId .Values.store.s3.credentials.secretAccessKey)) }}
{{- fail "store.s3.credentials: give both accessKeyId and secretAccessKey, or neither" }}
{{- end }}
{{- end }}

{{/* `tenant:token,tenant2:token2`, as IMAGEGEN_TOKENS reads them. */}}
{{- define "imagegen.tokens" -}}
{{- $pairs := list }}
{{- range . }}
{{- $pairs = append $pairs (printf "%s:%s" .tenant .token) }}
{{- end }}
{{- join "," $pairs }}
{{- end }}

{{/* imagePullSecrets as the comma list IMAGEGEN_IMAGE_PULL_SECRETS takes. */}}
{{- define "imagegen.pullSecretNames" -}}
{{- $names := list }}
{{- range .Values.imagePullSecrets }}
{{- $names = append $names .name }}
{{- end }}
{{- join "," $names }}
{{- end }}
