{{- define "smtp-gateway.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "smtp-gateway.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains (include "smtp-gateway.name" .) .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "smtp-gateway.name" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "smtp-gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "smtp-gateway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "smtp-gateway.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "smtp-gateway.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "smtp-gateway.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "smtp-gateway.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "smtp-gateway.tlsSecret" -}}
{{- default (printf "%s-tls" (include "smtp-gateway.fullname" .)) .Values.tls.existingSecret }}
{{- end }}

{{/* Rules across values that the schema cannot state: refused at install, naming the values. */}}
{{- define "smtp-gateway.validate" -}}
{{- range $name, $l := .Values.listeners }}
{{- if $l.enabled }}
{{- if and $l.proxyProtocol (empty $.Values.gateway.proxyNetworks) }}
{{- fail (printf "listeners.%s.proxyProtocol: true needs gateway.proxyNetworks (the load balancers' addresses): every connection would be refused" $name) }}
{{- end }}
{{- if and (ne $l.tls "none") (not $.Values.tls.enabled) }}
{{- fail (printf "listeners.%s.tls: %s needs tls.enabled: true (a certificate to serve)" $name $l.tls) }}
{{- end }}
{{- end }}
{{- end }}
{{- if and .Values.autoscaling.enabled (gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) }}
{{- fail (printf "autoscaling.minReplicas (%d) is above autoscaling.maxReplicas (%d)" (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) }}
{{- end }}
{{- end }}

{{/* gateway.yaml: what needs a restart to change (hence the checksum annotation). */}}
{{- define "smtp-gateway.config" -}}
{{- include "smtp-gateway.validate" . }}
{{- $listeners := list }}
{{- range $name, $l := .Values.listeners }}
{{- if $l.enabled }}
{{- range $i, $address := $.Values.gateway.listenAddresses }}
{{- $entry := dict "name" (ternary $name (printf "%s-%d" $name $i) (eq $i 0)) "address" $address "port" $l.containerPort "tls" $l.tls "require_tls" (default false $l.requireTls) "proxy_protocol" (default false $l.proxyProtocol) }}
{{- if ne $l.tls "none" }}
{{- $_ := set $entry "cert_file" "/etc/smtp-gateway/tls/tls.crt" }}
{{- $_ := set $entry "key_file" "/etc/smtp-gateway/tls/tls.key" }}
{{- end }}
{{- $listeners = append $listeners $entry }}
{{- end }}
{{- end }}
{{- end }}
{{- $backend := dict "url" .Values.gateway.backend.url "tls" (default "none" .Values.gateway.backend.tls) }}
{{- if .Values.gateway.backend.serverName }}
{{- $_ := set $backend "server_name" .Values.gateway.backend.serverName }}
{{- end }}
{{- if .Values.gateway.backend.maxSessions }}
{{- $_ := set $backend "max_sessions" (int .Values.gateway.backend.maxSessions) }}
{{- end }}
{{- $cfg := dict
  "hostname" .Values.gateway.hostname
  "listeners" $listeners
  "local_domains" .Values.gateway.localDomains
  "trusted_networks" (default list .Values.gateway.trustedNetworks)
  "proxy_networks" (default list .Values.gateway.proxyNetworks)
  "backend" $backend
  "metrics" (dict "listen" (printf "0.0.0.0:%d" (int .Values.metrics.port)) "multiproc_dir" "/run/smtp-gateway/metrics")
  "logging" (dict "level" .Values.gateway.logging.level "format" .Values.gateway.logging.format)
  "dns" (dict "nameservers" (default list .Values.gateway.dnsNameservers))
  "policy" "/etc/smtp-gateway/policy/policy.yaml"
  "drain_timeout" .Values.gateway.drainTimeout
  "workers" (int (default 1 .Values.gateway.workers))
}}
{{- if .Values.gateway.limits }}
{{- $_ := set $cfg "limits" .Values.gateway.limits }}
{{- end }}
{{- toYaml (mustMergeOverwrite $cfg (deepCopy .Values.gateway.extraConfig)) }}
{{- end }}
