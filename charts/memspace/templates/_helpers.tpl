{{/* Shared names, labels and values of the memspace chart. */}}

{{/* Namespace of the shards, their index Secrets, the admin token and the spaces' PVCs. */}}
{{- define "memspace.serverNamespace" -}}
{{- .Values.serverNamespace | default .Release.Namespace -}}
{{- end }}

{{/* Name of the operator's Deployment (and of its RBAC objects, see rbac-operator.yaml). */}}
{{- define "memspace.operatorName" -}}
{{- printf "%s-operator" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end }}

{{/* Labels of everything the chart makes; `component` is passed as .component. */}}
{{- define "memspace.labels" -}}
app.kubernetes.io/name: memspace
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/component: {{ .component }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
{{- end }}

{{/* What the operator's Deployment selects: its pods. */}}
{{- define "memspace.operatorSelector" -}}
app.kubernetes.io/name: memspace
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/* What selects the shard pods and Services (the operator's labels, naming.shard_labels). */}}
{{- define "memspace.shardSelector" -}}
app.kubernetes.io/name: memspace
app.kubernetes.io/component: shard
{{- end }}

{{/* An image reference from {repository, tag, digest}, with the chart's appVersion as the tag. */}}
{{- define "memspace.imageRef" -}}
{{- $image := .image -}}
{{- if $image.digest -}}
{{- printf "%s@%s" $image.repository $image.digest -}}
{{- else -}}
{{- printf "%s:%s" $image.repository ($image.tag | default .root.Chart.AppVersion) -}}
{{- end -}}
{{- end }}

{{/* The operator's image. */}}
{{- define "memspace.operatorImage" -}}
{{- include "memspace.imageRef" (dict "image" .Values.image "root" .) -}}
{{- end }}

{{/* The shards' image: server.image, else the operator's. */}}
{{- define "memspace.serverImage" -}}
{{- if .Values.server.image.repository -}}
{{- include "memspace.imageRef" (dict "image" .Values.server.image "root" .) -}}
{{- else -}}
{{- include "memspace.operatorImage" . -}}
{{- end -}}
{{- end }}

{{/*
The admin token: the value already in the cluster (so upgrades keep it), else a new random one.
Rendered once per release render and shared by every copy of the Secret.
*/}}
{{- define "memspace.adminToken" -}}
{{- $existing := lookup "v1" "Secret" (include "memspace.serverNamespace" .) .Values.adminToken.secretName -}}
{{- if and $existing $existing.data (hasKey $existing.data "token") -}}
{{- index $existing.data "token" | b64dec -}}
{{- else -}}
{{- randAlphaNum 48 -}}
{{- end -}}
{{- end }}

{{/* The metrics token: the value already in the cluster, else a new random one. */}}
{{- define "memspace.metricsToken" -}}
{{- $existing := lookup "v1" "Secret" (include "memspace.serverNamespace" .) .Values.metrics.auth.secretName -}}
{{- if and $existing $existing.data (hasKey $existing.data "token") -}}
{{- index $existing.data "token" | b64dec -}}
{{- else -}}
{{- randAlphaNum 48 -}}
{{- end -}}
{{- end }}

{{/* The restricted Pod Security container context: no root, no privilege, no capabilities. */}}
{{- define "memspace.containerSecurityContext" -}}
runAsNonRoot: true
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end }}
