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

{{/* The gateway's pods, and only they (not the helm test pod, not the scanners): what
the scanners' NetworkPolicies let in. */}}
{{- define "smtp-gateway.gatewayPodLabels" -}}
{{ include "smtp-gateway.selectorLabels" . }}
app.kubernetes.io/component: gateway
{{- end }}

{{/* A scanner's objects: call with (dict "root" $ "scanner" "clamav"). Its own
app.kubernetes.io/name, so that no selector of the gateway's (Deployment, Service,
PodDisruptionBudget, NetworkPolicy) takes in a scanner pod. */}}
{{- define "smtp-gateway.scannerName" -}}
{{- printf "%s-%s" (include "smtp-gateway.fullname" .root | trunc 55 | trimSuffix "-") .scanner }}
{{- end }}

{{- define "smtp-gateway.scannerSelectorLabels" -}}
app.kubernetes.io/name: {{ printf "%s-%s" (include "smtp-gateway.name" .root | trunc 55 | trimSuffix "-") .scanner }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- end }}

{{- define "smtp-gateway.scannerLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
{{ include "smtp-gateway.scannerSelectorLabels" . }}
app.kubernetes.io/component: {{ .scanner }}
app.kubernetes.io/part-of: {{ include "smtp-gateway.name" .root }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
{{- end }}

{{/* Where the gateway reaches a scanner: scanners.<name>.endpoint, else the Service the
chart deploys for it (by its namespace-qualified name, resolved by the cluster DNS). */}}
{{- define "smtp-gateway.scannerEndpoint" -}}
{{- $s := index .root.Values.scanners .scanner }}
{{- if $s.endpoint }}
{{- $s.endpoint }}
{{- else }}
{{- $scheme := ternary "http" "tcp" (eq .scanner "rspamd") }}
{{- printf "%s://%s.%s.svc:%d" $scheme (include "smtp-gateway.scannerName" .) .root.Release.Namespace (int $s.deploy.port) }}
{{- end }}
{{- end }}

{{/* The policy as policy.content and policy.extends make it (or the default preset). */}}
{{- define "smtp-gateway.sitePolicy" -}}
{{- if .Values.policy.content }}
{{- if and .Values.policy.extends (not (regexMatch "(?m)^extends:" .Values.policy.content)) -}}
extends: {{ .Values.policy.extends }}
{{ end }}
{{- .Values.policy.content }}
{{- else }}
{{- .Files.Get "files/default-policy.yaml" }}
{{- end }}
{{- end }}

{{/* The checks the chart writes over that policy: each enabled scanner's enabled and
endpoint, nothing else. Empty when no scanner is enabled. */}}
{{- define "smtp-gateway.scannerChecks" -}}
{{- $checks := dict }}
{{- range $name := list "clamav" "rspamd" }}
{{- $s := index $.Values.scanners $name }}
{{- if $s.enabled }}
{{- if and (not $s.endpoint) (not $s.deploy.enabled) }}
{{- fail (printf "scanners.%s.enabled: true needs scanners.%s.endpoint, or scanners.%s.deploy.enabled: true (the chart's own)" $name $name $name) }}
{{- end }}
{{- $_ := set $checks $name (dict "enabled" true "endpoint" (include "smtp-gateway.scannerEndpoint" (dict "root" $ "scanner" $name))) }}
{{- end }}
{{- end }}
{{- if $checks }}
{{- if hasKey .Values.policy.files "site-policy.yaml" }}
{{- fail "policy.files: site-policy.yaml is the chart's name for policy.content when scanners are enabled: rename that file" }}
{{- end }}
{{- toYaml (dict "checks" $checks) }}
{{- end }}
{{- end }}

{{/* What every deployed scanner has besides its Deployment: a Service, a NetworkPolicy
that lets only the gateway's pods reach its port, a PodDisruptionBudget with more than
one replica. Call with (dict "root" $ "scanner" "clamav"). */}}
{{- define "smtp-gateway.scannerAccess" -}}
{{- $s := index .root.Values.scanners .scanner }}
apiVersion: v1
kind: Service
metadata:
  name: {{ include "smtp-gateway.scannerName" . }}
  labels:
    {{- include "smtp-gateway.scannerLabels" . | nindent 4 }}
spec:
  type: ClusterIP
  selector:
    {{- include "smtp-gateway.scannerSelectorLabels" . | nindent 4 }}
  ports:
    - name: {{ .scanner }}
      port: {{ $s.deploy.port }}
      targetPort: {{ .scanner }}
      protocol: TCP
{{- if .root.Values.networkPolicy.enabled }}
---
# Only the gateway's pods reach the scanner (kubelet probes are not subject to it).
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: {{ include "smtp-gateway.scannerName" . }}
  labels:
    {{- include "smtp-gateway.scannerLabels" . | nindent 4 }}
spec:
  podSelector:
    matchLabels:
      {{- include "smtp-gateway.scannerSelectorLabels" . | nindent 6 }}
  policyTypes: [Ingress]
  ingress:
    - from:
        - podSelector:
            matchLabels:
              {{- include "smtp-gateway.gatewayPodLabels" .root | nindent 14 }}
      ports:
        - port: {{ $s.deploy.port }}
          protocol: TCP
{{- end }}
{{- if and .root.Values.podDisruptionBudget.enabled (gt (int $s.deploy.replicas) 1) }}
---
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "smtp-gateway.scannerName" . }}
  labels:
    {{- include "smtp-gateway.scannerLabels" . | nindent 4 }}
spec:
  maxUnavailable: 1
  selector:
    matchLabels:
      {{- include "smtp-gateway.scannerSelectorLabels" . | nindent 6 }}
{{- end }}
{{- end }}
