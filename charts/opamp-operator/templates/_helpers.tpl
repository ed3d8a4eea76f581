{{/* The chart name, overridable with nameOverride. */}}
{{- define "opamp-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The full name of the release's objects: fullnameOverride, else <release>-<name>, else <release>
when it already contains the name. Trimmed to 57 characters so that the "-peers", "-api" and
"-metrics" Services stay within the 63 characters of a DNS label.
*/}}
{{- define "opamp-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 57 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 57 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 57 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* chart: <name>-<version>, for the helm.sh/chart label. */}}
{{- define "opamp-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object. */}}
{{- define "opamp-operator.labels" -}}
helm.sh/chart: {{ include "opamp-operator.chart" . }}
{{ include "opamp-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Labels that select the operator's pods (immutable in the Deployment: never change them). */}}
{{- define "opamp-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "opamp-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The ServiceAccount the pods run as. */}}
{{- define "opamp-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "opamp-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The operator image. */}}
{{- define "opamp-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion | toString) }}
{{- end }}

{{/* Where the TLS Secret is mounted. */}}
{{- define "opamp-operator.tlsDir" -}}
/etc/opamp/tls
{{- end }}

{{/* Where the projected peer token is mounted (the default of --peer-token-file). */}}
{{- define "opamp-operator.peerTokenDir" -}}
/var/run/secrets/opamp.dev/peers
{{- end }}

{{/* The leader-election Lease: the operator's fixed name (controller/leader.rs). */}}
{{- define "opamp-operator.leaseName" -}}
opamp-operator
{{- end }}

{{/*
What the operator does in the namespaces it manages: in a ClusterRole when it manages all of
them, in a Role of each managed namespace when `namespaces` is set.
*/}}
{{- define "opamp-operator.namespacedRules" -}}
# Caches of the custom resources (list, then watch).
- apiGroups: [opamp.dev]
  resources: [agentconfigs, capabilityslots]
  verbs: [list, watch]
# Status, written with server-side apply (a PATCH of the status subresource).
- apiGroups: [opamp.dev]
  resources: [agentconfigs/status, capabilityslots/status]
  verbs: [patch]
# ConfigMaps and Secrets: watched by their metadata only (list, watch), except agent tokens
# (Secrets of type opamp.dev/agent-token, listed in full through a field selector); the ones
# AgentConfigs (configMapKeyRef, secretKeyRef) and CapabilitySlots (signing and dispatch
# tokens) reference are read one by one (get).
- apiGroups: [""]
  resources: [configmaps, secrets]
  verbs: [get, list, watch]
# Revisions of AgentConfigs (ControllerRevisions labelled app.kubernetes.io/managed-by=
# opamp-operator, owned by their AgentConfig): every replica watches them, the leader creates,
# renumbers (patch) and prunes (delete) them.
- apiGroups: [apps]
  resources: [controllerrevisions]
  verbs: [list, watch, create, patch, delete]
# Events about AgentConfigs, CapabilitySlots and Namespaces, in their namespaces (kube-runtime's
# Recorder creates an Event, then patches it when the same event repeats).
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create, patch]
{{- end }}

{{/*
The aggregated API's Service (and the stem of its certificate's objects): <fullname> cut to 48
characters so that "<…>-aggregated-api" stays within the 63 characters of a DNS label.
*/}}
{{- define "opamp-operator.aggregatedApiName" -}}
{{- printf "%s-aggregated-api" (include "opamp-operator.fullname" . | trunc 48 | trimSuffix "-") }}
{{- end }}

{{/* The Secret holding the aggregated API's serving certificate (tls.crt, tls.key, ca.crt). */}}
{{- define "opamp-operator.aggregatedApiSecretName" -}}
{{- if .Values.aggregatedApi.certManager.enabled }}
{{- printf "%s-cert-manager-tls" (include "opamp-operator.aggregatedApiName" .) }}
{{- else }}
{{- printf "%s-tls" (include "opamp-operator.aggregatedApiName" .) }}
{{- end }}
{{- end }}

{{/* Where the aggregated API's serving certificate is mounted. */}}
{{- define "opamp-operator.aggregatedApiTlsDir" -}}
/etc/opamp/aggregated-api
{{- end }}
