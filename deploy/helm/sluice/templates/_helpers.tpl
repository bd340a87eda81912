{{/* The image reference. */}}
{{- define "sluice.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* Where proxies reach the certificate service. */}}
{{- define "sluice.caAddress" -}}
{{- if .Values.ca.address -}}
{{ .Values.ca.address }}
{{- else -}}
sluice-ca.{{ .Release.Namespace }}.svc:15012
{{- end -}}
{{- end -}}

{{/* Labels on every object. */}}
{{- define "sluice.labels" -}}
app.kubernetes.io/part-of: sluice
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end -}}

{{/* The projected token and root volumes of a CA client. */}}
{{- define "sluice.caVolumes" -}}
- name: ca-root
  configMap: {name: {{ .Values.ca.rootConfigMap }}}
- name: ca-token
  projected:
    sources:
      - serviceAccountToken: {path: token, audience: {{ .Values.ca.audience }}, expirationSeconds: 3600}
{{- end -}}
