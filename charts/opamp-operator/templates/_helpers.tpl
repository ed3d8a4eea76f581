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

{{/* The leader-election Lease: the operator's fixed name (controller/leader.rs). */}}
{{- define "opamp-operator.leaseName" -}}
opamp-operator
{{- end }}
