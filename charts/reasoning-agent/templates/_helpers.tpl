{{/* The chart name. */}}
{{- define "reasoning-agent.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The full name: release-chart, unless the release name already holds the chart name. */}}
{{- define "reasoning-agent.fullname" -}}
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

{{- define "reasoning-agent.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "reasoning-agent.labels" -}}
helm.sh/chart: {{ include "reasoning-agent.chart" . }}
{{ include "reasoning-agent.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "reasoning-agent.selectorLabels" -}}
app.kubernetes.io/name: {{ include "reasoning-agent.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "reasoning-agent.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "reasoning-agent.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "reasoning-agent.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/* The Secret with the API keys and OpenAI key: the user's, or the chart's. */}}
{{- define "reasoning-agent.keysSecret" -}}
{{- .Values.existingSecret | default (include "reasoning-agent.fullname" .) }}
{{- end }}

{{- define "reasoning-agent.apiKeysKey" -}}
{{- if .Values.existingSecret }}{{ .Values.existingSecretKeys.apiKeys }}{{ else }}api-keys{{ end }}
{{- end }}

{{- define "reasoning-agent.openaiKeyKey" -}}
{{- if .Values.existingSecret }}{{ .Values.existingSecretKeys.openaiApiKey }}{{ else }}openai-api-key{{ end }}
{{- end }}

{{/* True (non-empty) when the database is external, i.e. not the SQLite file on /data. */}}
{{- define "reasoning-agent.externalDatabase" -}}
{{- if or .Values.database.url .Values.database.existingSecret }}true{{ end }}
{{- end }}

{{/* The bundled Redis's name, as the redis subchart computes it. */}}
{{- define "reasoning-agent.redisFullname" -}}
{{- if .Values.redis.fullnameOverride }}
{{- .Values.redis.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains "redis" .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-redis" .Release.Name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/* Where the database URL comes from (a secretKeyRef), for the app and the migration Job. */}}
{{- define "reasoning-agent.databaseUrlRef" -}}
{{- if .Values.database.existingSecret }}
name: {{ .Values.database.existingSecret }}
key: {{ .Values.database.existingSecretKey }}
{{- else }}
name: {{ include "reasoning-agent.fullname" . }}
key: database-url
{{- end }}
{{- end }}

{{/* Settings that cannot work together stop the render with a message that says what to do. */}}
{{- define "reasoning-agent.validate" -}}
{{- if and (not .Values.existingSecret) (not .Values.secrets.apiKeys) }}
{{- fail "set secrets.apiKeys (name:key entries) or existingSecret: the service refuses to start without an API key" }}
{{- end }}
{{- if not (include "reasoning-agent.externalDatabase" .) }}
{{- if gt (int .Values.replicaCount) 1 }}
{{- fail "replicaCount > 1 needs an external database: set database.url (PostgreSQL) or database.existingSecret; SQLite on a ReadWriteOnce volume allows one pod" }}
{{- end }}
{{- if .Values.autoscaling.enabled }}
{{- fail "autoscaling needs an external database: set database.url (PostgreSQL) or database.existingSecret; SQLite on a ReadWriteOnce volume allows one pod" }}
{{- end }}
{{- end }}
{{- if and (gt (int .Values.config.workers) 1) (not .Values.redis.enabled) (not .Values.externalRedis.url) (not .Values.externalRedis.existingSecret) }}
{{- fail "config.workers > 1 needs Redis for shared limits: keep redis.enabled or set externalRedis.url" }}
{{- end }}
{{- if and .Values.redis.enabled (or .Values.externalRedis.url .Values.externalRedis.existingSecret) }}
{{- fail "externalRedis replaces the bundled Redis: set redis.enabled=false with it" }}
{{- end }}
{{- end }}

{{/* The environment the HTTP pods and the worker pods share: secrets, database and Redis. */}}
{{- define "reasoning-agent.sharedEnv" -}}
{{- $external := include "reasoning-agent.externalDatabase" . }}
- name: OPENAI_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "reasoning-agent.keysSecret" . }}
      key: {{ include "reasoning-agent.openaiKeyKey" . }}
      optional: true
{{- if $external }}
- name: DATABASE_URL
  valueFrom:
    secretKeyRef:
      {{- include "reasoning-agent.databaseUrlRef" . | nindent 6 }}
{{- else }}
- name: DATABASE_URL
  value: sqlite:////data/reasoning_agent.db
{{- end }}
{{- if .Values.redis.enabled }}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.auth.existingSecret | default (include "reasoning-agent.redisFullname" .) }}
      key: {{ .Values.redis.auth.existingSecretKey }}
- name: REDIS_URL
  value: redis://:$(REDIS_PASSWORD)@{{ include "reasoning-agent.redisFullname" . }}:6379/0
{{- else if or .Values.externalRedis.url .Values.externalRedis.existingSecret }}
- name: REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.externalRedis.existingSecret | default (include "reasoning-agent.fullname" .) }}
      key: {{ if .Values.externalRedis.existingSecret }}{{ .Values.externalRedis.existingSecretKey }}{{ else }}redis-url{{ end }}
{{- end }}
{{- end }}

{{/* Redis for limits and the task queue: bundled, or external. */}}
{{- define "reasoning-agent.hasRedis" -}}
{{- if or .Values.redis.enabled .Values.externalRedis.url .Values.externalRedis.existingSecret }}true{{ end }}
{{- end }}

{{/* Worker pods run when they can share the database (external) and the queue (Redis). */}}
{{- define "reasoning-agent.workerEnabled" -}}
{{- if and .Values.worker.enabled (include "reasoning-agent.externalDatabase" .) (include "reasoning-agent.hasRedis" .) }}true{{ end }}
{{- end }}

{{/* The HTTP pods: the Service, PDB and NetworkPolicy must not pick worker or hook pods. */}}
{{- define "reasoning-agent.serverSelectorLabels" -}}
{{ include "reasoning-agent.selectorLabels" . }}
app.kubernetes.io/component: server
{{- end }}
