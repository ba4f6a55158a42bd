{{/* The chart's name, or nameOverride. */}}
{{- define "edge-proxy.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's full name (63 characters at most: a DNS label). */}}
{{- define "edge-proxy.fullname" -}}
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

{{- define "edge-proxy.selectorLabels" -}}
app.kubernetes.io/name: {{ include "edge-proxy.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "edge-proxy.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "edge-proxy.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "edge-proxy.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "edge-proxy.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "edge-proxy.secretName" -}}
{{- default (printf "%s-config" (include "edge-proxy.fullname" .)) .Values.existingSecret }}
{{- end }}

{{/* The alert groups of files/alerts.yaml, with additionalRules appended to the first group. */}}
{{- define "edge-proxy.alertGroups" -}}
{{- $groups := (.Files.Get "files/alerts.yaml" | fromYaml).groups }}
{{- $first := first $groups }}
{{- $rules := concat $first.rules .Values.prometheusRule.additionalRules }}
{{- $merged := prepend (rest $groups) (merge (dict "rules" $rules) $first) }}
{{- toYaml $merged }}
{{- end }}
