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

{{/* Labels of every object: (dict "context" $ "component" "server"); the component
     (server, worker, migrate, test) is left out for objects shared by all of them. */}}
{{- define "reasoning-agent.labels" -}}
helm.sh/chart: {{ include "reasoning-agent.chart" .context }}
{{ include "reasoning-agent.selectorLabels" . }}
app.kubernetes.io/version: {{ .context.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .context.Release.Service }}
app.kubernetes.io/part-of: {{ include "reasoning-agent.name" .context }}
{{- end }}

{{/* The labels a selector picks pods by: (dict "context" $ "component" "server"). */}}
{{- define "reasoning-agent.selectorLabels" -}}
app.kubernetes.io/name: {{ include "reasoning-agent.name" .context }}
app.kubernetes.io/instance: {{ .context.Release.Name }}
{{- with .component }}
app.kubernetes.io/component: {{ . }}
{{- end }}
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

{{/* The Secret with the OpenAI key: the user's, or the chart's. */}}
{{- define "reasoning-agent.keysSecret" -}}
{{- .Values.existingSecret | default (include "reasoning-agent.fullname" .) }}
{{- end }}

{{/* The Secret with the API keys: the user's, or the one the chart makes (api-keys-secret.yaml). */}}
{{- define "reasoning-agent.apiKeysSecret" -}}
{{- .Values.existingSecret | default (printf "%s-api-keys" (include "reasoning-agent.fullname" .)) }}
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

{{/* Where the database URL comes from (a secretKeyRef): (dict "context" $ "hook" true) for
     the migration Job, whose hook runs before the release's own Secret exists. */}}
{{- define "reasoning-agent.databaseUrlRef" -}}
{{- $ := .context }}
{{- if $.Values.database.existingSecret }}
name: {{ $.Values.database.existingSecret }}
key: {{ $.Values.database.existingSecretKey }}
{{- else }}
name: {{ include "reasoning-agent.fullname" $ }}{{ if .hook }}-migrate{{ end }}
key: database-url
{{- end }}
{{- end }}

{{/* Settings that cannot work together stop the render with a message that says what to do. */}}
{{- define "reasoning-agent.validate" -}}
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
{{- range $name, $value := .Values.config.otel }}
{{- if or (contains "HEADERS" $name) (regexMatch "(?i)(bearer|basic |token|password|secret|api[-_]?key|authorization)|://[^/]*@" $value) }}
{{- fail (printf "config.otel.%s looks like a credential and would sit in the ConfigMap in clear: set it in secrets.otel" $name) }}
{{- end }}
{{- end }}
{{- if regexMatch "://[^/]*@" .Values.config.openaiBaseUrl }}
{{- fail "config.openaiBaseUrl holds credentials and would sit in the ConfigMap in clear: set secrets.openaiBaseUrl instead" }}
{{- end }}
{{- if and .Values.podDisruptionBudget.enabled (not (include "reasoning-agent.externalDatabase" .)) }}
{{- fail "podDisruptionBudget needs an external database (database.url): with SQLite there is one pod" }}
{{- end }}
{{- if and .Values.oidc.enabled (not (include "reasoning-agent.oidcIssuer" .)) }}
{{- fail "oidc.enabled needs oidc.issuer, or oidc.kubernetes to trust the cluster's own service-account tokens" }}
{{- end }}
{{- end }}

{{/* The environment the HTTP pods and the worker pods share: secrets, database and Redis. */}}
{{- define "reasoning-agent.sharedEnv" -}}
{{- $external := include "reasoning-agent.externalDatabase" . }}
{{- $root := . }}
{{- with .Values.secrets.openaiBaseUrl }}
- name: OPENAI_BASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "reasoning-agent.fullname" $root }}
      key: openai-base-url
{{- end }}
{{- range $name, $_ := .Values.secrets.otel }}
- name: {{ $name }}
  valueFrom:
    secretKeyRef:
      name: {{ include "reasoning-agent.fullname" $root }}
      key: {{ $name }}
{{- end }}
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
      {{- include "reasoning-agent.databaseUrlRef" (dict "context" .) | trim | nindent 6 }}
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

{{/* The one pod template of every workload (server, worker, migration Job), so the pod-level
     values (podAnnotations, podLabels, nodeSelector, tolerations, affinity, extraEnv,
     extraVolumes, extraVolumeMounts, security contexts) reach each pod alike. Takes a dict:
       context     the root context ($)
       component   server, worker or migrate (and the container's name, unless containerName)
       args        the container's arguments (a list)
       env         the container's own environment (rendered YAML list items)
       envFrom     true to load the ConfigMap as environment variables
       container   more container fields (ports, probes), rendered YAML
       securityContext, resources   the container's (maps)
       volumeMounts, volumes         more of each (rendered YAML list items)
       spec        more pod spec fields (restartPolicy, terminationGracePeriodSeconds), rendered YAML
       tmpSize     the size of the in-memory /tmp
       hook        true for a Helm hook's pod */}}
{{- define "reasoning-agent.podTemplate" -}}
{{- $ := .context -}}
metadata:
  annotations:
    checksum/config: {{ include (print $.Template.BasePath "/configmap.yaml") $ | sha256sum }}
    checksum/secret: {{ print (include (print $.Template.BasePath "/secret.yaml") $) (include (print $.Template.BasePath "/api-keys-secret.yaml") $) | sha256sum }}
    {{- with $.Values.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  labels:
    {{- include "reasoning-agent.selectorLabels" (dict "context" $ "component" .component) | nindent 4 }}
    {{- with $.Values.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  {{- with .spec }}
  {{- . | nindent 2 }}
  {{- end }}
  {{- if not .hook }}{{/* a hook's pod runs before the chart's ServiceAccount exists */}}
  serviceAccountName: {{ include "reasoning-agent.serviceAccountName" $ }}
  {{- end }}
  automountServiceAccountToken: false
  {{- with $.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml $.Values.podSecurityContext | nindent 4 }}
  containers:
    - name: {{ .containerName | default .component }}
      image: {{ include "reasoning-agent.image" $ | quote }}
      imagePullPolicy: {{ $.Values.image.pullPolicy }}
      args: {{ toJson .args }}
      {{- if .envFrom }}
      envFrom:
        - configMapRef:
            name: {{ include "reasoning-agent.fullname" $ }}
      {{- end }}
      env:
        {{- with .env }}
        {{- . | nindent 8 }}
        {{- end }}
        {{- with $.Values.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with .container }}
      {{- . | nindent 6 }}
      {{- end }}
      securityContext:
        {{- toYaml .securityContext | nindent 8 }}
      resources:
        {{- toYaml .resources | nindent 8 }}
      volumeMounts:
        - name: tmp
          mountPath: /tmp
        {{- with .volumeMounts }}
        {{- . | nindent 8 }}
        {{- end }}
        {{- with $.Values.extraVolumeMounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
  volumes:
    - name: tmp
      emptyDir:
        medium: Memory
        sizeLimit: {{ .tmpSize | default "64Mi" }}
    {{- with .volumes }}
    {{- . | nindent 4 }}
    {{- end }}
    {{- with $.Values.extraVolumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $.Values.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $.Values.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $.Values.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}

{{/* Longer than the server's shutdown delay, then LLM_TIMEOUT_S and the background drain
     (10 s), so requests and jobs in flight can finish after SIGTERM. */}}
{{- define "reasoning-agent.gracePeriod" -}}
terminationGracePeriodSeconds: {{ add (int .Values.config.llmTimeoutS) 25 (int .Values.shutdownDelaySeconds) }}
{{- end }}

{{/* The issuer bearer tokens come from: the given one, or the cluster's own in Kubernetes mode. */}}
{{- define "reasoning-agent.oidcIssuer" -}}
{{- if .Values.oidc.issuer }}{{ .Values.oidc.issuer }}
{{- else if .Values.oidc.kubernetes }}https://kubernetes.default.svc.cluster.local
{{- end }}
{{- end }}

{{/* "true" when the server reads the cluster's token-signing keys through the API server. */}}
{{- define "reasoning-agent.oidcKubernetes" -}}
{{- if and .Values.oidc.enabled .Values.oidc.kubernetes }}true{{ end }}
{{- end }}
