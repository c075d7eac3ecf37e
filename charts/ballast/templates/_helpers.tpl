{{/* Names and labels. */}}
{{- define "ballast.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "ballast.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "ballast.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ballast.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "ballast.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "ballast.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "ballast.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "ballast.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "ballast.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{- define "ballast.postgres" -}}
{{- eq .Values.storage.backend "postgres" -}}
{{- end -}}

{{/* The Secret with the admin token, write keys and secrets.config keys. */}}
{{- define "ballast.secretName" -}}
{{- default (printf "%s-secrets" (include "ballast.fullname" .)) .Values.secrets.existingSecret -}}
{{- end -}}

{{/* The Secret with the database URL. */}}
{{- define "ballast.postgresSecretName" -}}
{{- default (printf "%s-postgres" (include "ballast.fullname" .)) .Values.storage.postgres.existingSecret -}}
{{- end -}}

{{/* Fails rendering on values that cannot work. */}}
{{- define "ballast.validate" -}}
{{- $pg := eq .Values.storage.backend "postgres" -}}
{{- if and $pg (not .Values.storage.postgres.existingSecret) (not .Values.storage.postgres.url) -}}
{{- fail "storage.backend=postgres needs storage.postgres.existingSecret (a Secret with the database URL) or, only for trying it out, storage.postgres.url" -}}
{{- end -}}
{{- if and (not $pg) (gt (int .Values.replicaCount) 1) -}}
{{- fail "replicaCount > 1 needs storage.backend=postgres: the embedded store runs exactly one pod (its log is on its own volume)" -}}
{{- end -}}
{{- if and (not $pg) .Values.autoscaling.enabled -}}
{{- fail "autoscaling needs storage.backend=postgres: the embedded store runs exactly one pod" -}}
{{- end -}}
{{- if lt (int .Values.terminationGracePeriodSeconds) (add (int .Values.preStopSleepSeconds) (int .Values.shutdownDelaySeconds) (int .Values.shutdownTimeoutSeconds) 6) -}}
{{- fail "terminationGracePeriodSeconds must be at least preStopSleepSeconds + shutdownDelaySeconds + shutdownTimeoutSeconds + 6 (ballast ends its shutdown at most 6 s after its timeout), or the kubelet kills ballast before it has drained" -}}
{{- end -}}
{{- range (.Values.config.sources | default list) -}}
{{- if not (regexMatch "^[-._a-zA-Z0-9]+$" (toString .id)) -}}
{{- fail (printf "config.sources: id %q: use letters, digits, '-', '_' or '.' (its write key is the Secret key write-key-<id>)" (toString .id)) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
The ballast.toml the pod runs with: .Values.config, then what the chart owns (listen
addresses, data directory, shutdown timeout, store). Rendered as TOML by
ballast.toml.table (Helm's numbers are floats: whole ones are written as integers).
*/}}
{{- define "ballast.config" -}}
{{- $c := deepCopy (.Values.config | default dict) -}}
{{- $server := get $c "server" | default dict -}}
{{- $_ := set $server "listen" (printf "0.0.0.0:%d" 8080) -}}
{{- $_ := set $server "admin_listen" (printf "0.0.0.0:%d" 8081) -}}
{{- $_ := set $server "data_dir" "/var/lib/ballast" -}}
{{- $_ := set $server "shutdown_timeout" (printf "%ds" (int .Values.shutdownTimeoutSeconds)) -}}
{{- $_ := set $server "shutdown_delay" (printf "%ds" (int .Values.shutdownDelaySeconds)) -}}
{{- $_ := set $server "metrics_require_token" .Values.metrics.requireToken -}}
{{- $_ := set $c "server" $server -}}
{{- $storage := get $c "storage" | default dict -}}
{{- $_ := set $storage "backend" .Values.storage.backend -}}
{{- $_ := set $storage "max_bytes" .Values.storage.maxBytes -}}
{{- if eq .Values.storage.backend "postgres" }}
{{- $_ := set $storage "partitions" (int .Values.storage.partitions) -}}
{{- end }}
{{- $_ := set $c "storage" $storage -}}
{{- include "ballast.toml.document" $c -}}
{{- end -}}

{{- define "ballast.toml.document" -}}
# Rendered by the ballast Helm chart from .Values.config; secrets come from the
# environment (BALLAST_* variables from Secrets), not from this file.
{{- range $key, $value := . }}
{{- if kindIs "map" $value }}

[{{ $key }}]
{{- range $k, $v := $value }}
{{- if not (kindIs "invalid" $v) }}
{{ toJson $k }} = {{ include "ballast.toml.value" $v }}
{{- end }}
{{- end }}
{{- else if kindIs "slice" $value }}
{{- range $item := $value }}

[[{{ $key }}]]
{{- range $k, $v := $item }}
{{- if not (kindIs "invalid" $v) }}
{{ toJson $k }} = {{ include "ballast.toml.value" $v }}
{{- end }}
{{- end }}
{{- end }}
{{- else if not (kindIs "invalid" $value) }}
{{- fail (printf "config.%s: ballast.toml has sections (server, storage, recovery, alerts) and lists (sources, destinations), no top-level setting %q" $key $key) }}
{{- end }}
{{- end }}
{{ end -}}

{{- define "ballast.toml.value" -}}
{{- if kindIs "map" . -}}
{ {{- $first := true -}}
{{- range $k, $v := . -}}
{{- if not (kindIs "invalid" $v) -}}
{{- if not $first }}, {{ else }} {{ end -}}
{{- $first = false -}}
{{ toJson $k }} = {{ include "ballast.toml.value" $v }}
{{- end -}}
{{- end }} }
{{- else if kindIs "slice" . -}}
[{{- range $i, $v := . -}}{{- if $i }}, {{ end -}}{{ include "ballast.toml.value" $v }}{{- end -}}]
{{- else if kindIs "string" . -}}
{{ toJson . }}
{{- else if kindIs "bool" . -}}
{{ . }}
{{- else if or (kindIs "float64" .) (kindIs "float32" .) -}}
{{- if eq (float64 .) (floor .) -}}{{ int64 . }}{{- else -}}{{ . }}{{- end -}}
{{- else -}}
{{ . }}
{{- end -}}
{{- end -}}

{{/* Environment: secrets by reference, never as plain values. */}}
{{- define "ballast.env" -}}
{{- $secret := include "ballast.secretName" . -}}
- name: BALLAST_SERVER__ADMIN_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ .Values.secrets.adminTokenKey }}
{{- range $i, $s := (.Values.config.sources | default list) }}
{{- if not (hasKey $s "write_key") }}
- name: BALLAST_SOURCES__{{ $i }}__WRITE_KEY
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: write-key-{{ $s.id }}
{{- end }}
{{- end }}
{{- range $path, $key := .Values.secrets.config }}
- name: BALLAST_{{ $path | upper | replace "." "__" }}
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ $key }}
{{- end }}
{{- if eq .Values.storage.backend "postgres" }}
- name: BALLAST_STORAGE__POSTGRES_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "ballast.postgresSecretName" . }}
      key: {{ .Values.storage.postgres.secretKey }}
{{- end }}
{{- end -}}
