{{/*
Helpers of the loyalty chart. Every name is prefixed "loyalty."; helpers that work on one
service take a dict with "root" (the chart's top context) and "name" (the service).
*/}}

{{/* The chart name, or nameOverride. */}}
{{- define "loyalty.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The prefix of every resource name: fullnameOverride, else "<release>-<chart>" (the
release name alone when it already contains the chart name). */}}
{{- define "loyalty.fullname" -}}
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

{{/* "<fullname>-<component>", the name of a component's resources; takes root and name. */}}
{{- define "loyalty.componentName" -}}
{{- printf "%s-%s" (include "loyalty.fullname" .root) .name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The chart label value: name and version. */}}
{{- define "loyalty.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels that select a component's pods; takes root and component. */}}
{{- define "loyalty.selectorLabels" -}}
app.kubernetes.io/name: {{ include "loyalty.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Every resource's labels; takes root and component. */}}
{{- define "loyalty.labels" -}}
helm.sh/chart: {{ include "loyalty.chart" .root }}
{{ include "loyalty.selectorLabels" . }}
app.kubernetes.io/part-of: {{ include "loyalty.name" .root }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Labels shared by every pod of the release, whatever its component. */}}
{{- define "loyalty.releaseSelectorLabels" -}}
app.kubernetes.io/name: {{ include "loyalty.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The image reference; a digest wins over the tag, and "latest" is refused. */}}
{{- define "loyalty.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag | toString }}
{{- if eq $tag "latest" }}
{{- fail "image.tag: \"latest\" is not deployable; name a version (or set image.digest)" }}
{{- end }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{/* One service's settings: serviceDefaults overlaid with its entry under services, as
YAML (read it back with fromYaml); takes root and name. */}}
{{- define "loyalty.serviceValues" -}}
{{- $own := index .root.Values.services .name }}
{{- toYaml (mergeOverwrite (deepCopy .root.Values.serviceDefaults) (deepCopy $own)) }}
{{- end }}

{{/* The names of the enabled services, as a JSON list (read it back with fromJsonArray). */}}
{{- define "loyalty.enabledServices" -}}
{{- $enabled := list }}
{{- range $name := keys .Values.services | sortAlpha }}
{{- $svc := include "loyalty.serviceValues" (dict "root" $ "name" $name) | fromYaml }}
{{- if $svc.enabled }}
{{- $enabled = append $enabled $name }}
{{- end }}
{{- end }}
{{- toJson $enabled }}
{{- end }}

{{/* The environment-variable group of a service: LOYALTY_<SERVICE>. */}}
{{- define "loyalty.envGroup" -}}
{{- printf "LOYALTY_%s" (upper .) }}
{{- end }}

{{/* Where peers dial a service: its Service name and gRPC port; takes root and name. */}}
{{- define "loyalty.address" -}}
{{- $svc := index .root.Values.services .name }}
{{- printf "%s:%v" (include "loyalty.componentName" .) $svc.port }}
{{- end }}

{{/* The ServiceAccount a service runs as; takes root and name. */}}
{{- define "loyalty.serviceAccountName" -}}
{{- $svc := include "loyalty.serviceValues" . | fromYaml }}
{{- if $svc.serviceAccount.create }}
{{- default (include "loyalty.componentName" .) $svc.serviceAccount.name }}
{{- else }}
{{- default "default" $svc.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The Secret the services read their credentials from. */}}
{{- define "loyalty.secretName" -}}
{{- default (include "loyalty.fullname" .) .Values.secrets.existingSecret }}
{{- end }}

{{/* The SQLAlchemy URL of a service's database; takes root and name. */}}
{{- define "loyalty.databaseUrl" -}}
{{- $values := .root.Values }}
{{- $database := printf "%s_%s" $values.databaseNamePrefix .name }}
{{- if $values.postgresql.enabled }}
{{- $password := required "postgresql.auth.password is required when postgresql.enabled" $values.postgresql.auth.password }}
{{- printf "postgresql+asyncpg://%s:%s@%s:5432/%s" (urlquery $values.postgresql.auth.username) (urlquery $password) (include "loyalty.componentName" (dict "root" .root "name" "postgresql")) $database }}
{{- else }}
{{- $db := $values.externalDatabase }}
{{- $credentials := urlquery $db.username }}
{{- if $db.password }}
{{- $credentials = printf "%s:%s" $credentials (urlquery $db.password) }}
{{- end }}
{{- printf "postgresql+asyncpg://%s@%s:%v/%s" $credentials $db.host $db.port $database }}
{{- with $db.options }}?{{ . }}{{ end }}
{{- end }}
{{- end }}

{{/* The Redis URL of the event bus. */}}
{{- define "loyalty.redisUrl" -}}
{{- if .Values.redis.enabled }}
{{- printf "redis://%s:6379/0" (include "loyalty.componentName" (dict "root" . "name" "redis")) }}
{{- else }}
{{- $redis := .Values.externalRedis }}
{{- $auth := "" }}
{{- if $redis.password }}
{{- $auth = printf ":%s@" (urlquery $redis.password) }}
{{- end }}
{{- printf "%s://%s%s:%v/%v" (ternary "rediss" "redis" $redis.tls) $auth $redis.host $redis.port $redis.database }}
{{- end }}
{{- end }}

{{/* Secret data: every enabled service's database URL (all the migration Jobs need). */}}
{{- define "loyalty.databaseUrlsData" -}}
{{- range $name := include "loyalty.enabledServices" . | fromJsonArray }}
{{ $name }}-database-url: {{ include "loyalty.databaseUrl" (dict "root" $ "name" $name) | b64enc | quote }}
{{- end }}
{{- end }}

{{/* The data of the chart-managed Secret: every enabled service's database URL, the Redis
URL, the API-key pepper and the provider tokens. */}}
{{- define "loyalty.secretData" -}}
{{ include "loyalty.databaseUrlsData" . | trim }}
redis-url: {{ include "loyalty.redisUrl" . | b64enc | quote }}
{{- with .Values.secrets.apiKeyPepper }}
api-key-pepper: {{ . | b64enc | quote }}
{{- end }}
{{- with .Values.secrets.adminToken }}
admin-token: {{ . | b64enc | quote }}
{{- end }}
{{- range $provider, $token := .Values.secrets.providerTokens }}
provider-token-{{ $provider }}: {{ $token | toString | b64enc | quote }}
{{- end }}
{{- end }}

{{/* A service's credentials as env entries read from a Secret; takes root, name and
secret (the Secret's name). Each service sees its own database only. */}}
{{- define "loyalty.secretEnv" -}}
- name: {{ include "loyalty.envGroup" .name }}__DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ .secret }}
      key: {{ .name }}-database-url
- name: LOYALTY_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ .secret }}
      key: redis-url
{{- if eq .name "gateway" }}
- name: LOYALTY_API_KEY_PEPPER
  valueFrom:
    secretKeyRef:
      name: {{ .secret }}
      key: api-key-pepper
      optional: true
- name: LOYALTY_ADMIN_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ .secret }}
      key: admin-token
      optional: true
{{- end }}
{{- if eq .name "notifications" }}
{{- range $provider := keys .root.Values.secrets.providerTokens | sortAlpha }}
- name: LOYALTY_PROVIDER_TOKENS__{{ upper $provider | replace "-" "_" }}
  valueFrom:
    secretKeyRef:
      name: {{ $.secret }}
      key: provider-token-{{ $provider }}
{{- end }}
{{- end }}
{{- end }}

{{/* The pod's name as this replica's consumer name in its Redis consumer groups. */}}
{{- define "loyalty.instanceNameEnv" -}}
- name: LOYALTY_INSTANCE_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
{{- end }}

{{/* The writable scratch space of a read-only container. */}}
{{- define "loyalty.tmpVolume" -}}
- name: tmp
  emptyDir:
    sizeLimit: 64Mi
{{- end }}

{{/* Hook phases of the migration Jobs and what they need: before the Deployments change,
except on the first install of a bundled PostgreSQL, which only exists afterwards. */}}
{{- define "loyalty.migrationHooks" -}}
{{- if .Values.postgresql.enabled -}}
post-install,pre-upgrade
{{- else -}}
pre-install,pre-upgrade
{{- end }}
{{- end }}
