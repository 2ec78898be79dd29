{{/* Names and labels shared by every template of the pairvol chart. */}}

{{- define "pairvol.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "pairvol.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "pairvol.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "pairvol.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "pairvol.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/part-of: pairvol
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Operator pods: selector labels (stable across upgrades). */}}
{{- define "pairvol.operatorSelectorLabels" -}}
app.kubernetes.io/name: pairvol-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Agent pods are created by the operator with these labels (docs/configuration.md). */}}
{{- define "pairvol.agentSelectorLabels" -}}
app.kubernetes.io/name: pairvol-agent
{{- end -}}

{{- define "pairvol.operatorServiceAccount" -}}
{{- default (printf "%s-operator" (include "pairvol.fullname" .)) .Values.serviceAccount.name -}}
{{- end -}}

{{/* The namespaces served, as a list; the release namespace when none are given. */}}
{{- define "pairvol.namespaces" -}}
{{- $ns := .Values.watchNamespaces | default (list .Release.Namespace) | uniq -}}
{{- toJson $ns -}}
{{- end -}}

{{- define "pairvol.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{- define "pairvol.agentImage" -}}
{{- $repo := .Values.agent.image.repository | default .Values.image.repository -}}
{{- $tag := .Values.agent.image.tag | default .Values.image.tag | default .Chart.AppVersion -}}
{{- printf "%s:%s" $repo $tag -}}
{{- end -}}

{{- define "pairvol.agentPullPolicy" -}}
{{- .Values.agent.image.pullPolicy | default .Values.image.pullPolicy -}}
{{- end -}}

{{/* Checkpoint interval the stale-checkpoint alert assumes. */}}
{{- define "pairvol.alertCheckpointInterval" -}}
{{- .Values.alerts.checkpointIntervalSeconds | default .Values.volumeDefaults.checkpointIntervalSeconds | int -}}
{{- end -}}

{{/* A Prometheus duration ("15m", "1h30m", "500ms") in whole seconds, for rules that
compare it with time() (fractions kept: "500ms" is 0.5). The values schema allows only these forms. */}}
{{- define "pairvol.durationSeconds" -}}
{{- $ms := 0 -}}
{{- $perUnit := dict "ms" 1 "s" 1000 "m" 60000 "h" 3600000 "d" 86400000 "w" 604800000 "y" 31536000000 -}}
{{- range regexFindAll "[0-9]+(ms|s|m|h|d|w|y)" (toString .) -1 -}}
{{- $unit := regexReplaceAll "^[0-9]+" . "" -}}
{{- $ms = add $ms (mul (regexFind "^[0-9]+" . | atoi) (get $perUnit $unit)) -}}
{{- end -}}
{{- divf $ms 1000 -}}
{{- end -}}
