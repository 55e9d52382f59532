{{/* Chart name, truncated to the 63 characters of a DNS label. */}}
{{- define "ingestor.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name: the release name, plus the chart name unless it already contains it. */}}
{{- define "ingestor.fullname" -}}
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

{{- define "ingestor.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels: immutable on a Deployment, so only name and instance. */}}
{{- define "ingestor.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ingestor.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Standard labels on every object. */}}
{{- define "ingestor.labels" -}}
helm.sh/chart: {{ include "ingestor.chart" . }}
{{ include "ingestor.selectorLabels" . }}
app.kubernetes.io/version: {{ include "ingestor.version" . | quote }}
app.kubernetes.io/component: worker
app.kubernetes.io/part-of: {{ .Values.partOf }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "ingestor.version" -}}
{{- default .Chart.AppVersion .Values.image.tag | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "ingestor.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{- define "ingestor.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "ingestor.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "ingestor.stripeSecretName" -}}
{{- default (printf "%s-stripe" (include "ingestor.fullname" .)) .Values.stripe.existingSecret }}
{{- end }}

{{- define "ingestor.webhookSecretName" -}}
{{- default (printf "%s-stripe-webhook" (include "ingestor.fullname" .)) .Values.webhook.existingSecret }}
{{- end }}

{{- define "ingestor.saslSecretName" -}}
{{- default (printf "%s-kafka-sasl" (include "ingestor.fullname" .)) .Values.kafka.sasl.existingSecret }}
{{- end }}

{{/* Label matchers for this release's series in Prometheus (KEDA budget gate). */}}
{{- define "ingestor.promSelector" -}}
{{- default (printf "namespace=%q,job=%q" .Release.Namespace (include "ingestor.fullname" .)) .Values.autoscaling.keda.budgetGate.selector }}
{{- end }}
