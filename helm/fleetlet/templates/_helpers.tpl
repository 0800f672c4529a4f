{{/* Names and labels shared by every object of the release. */}}
{{- define "fleetlet.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "fleetlet.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Selector labels of one component: include with (dict "root" $ "component" "controller"). */}}
{{- define "fleetlet.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* A component's image: include with (dict "root" $ "component" "controller"). By digest
     when <component>.imageDigest is set, else by tag (image.tag, default appVersion). */}}
{{- define "fleetlet.image" -}}
{{- $c := index .root.Values .component -}}
{{- if $c.imageDigest -}}
{{- printf "%s/%s@%s" .root.Values.image.registry $c.image $c.imageDigest -}}
{{- else -}}
{{- printf "%s/%s:%s" .root.Values.image.registry $c.image (default .root.Chart.AppVersion .root.Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* A component's ServiceAccount: serviceAccount.names.<component>, else
     <fullname>-<component>. With serviceAccount.create=false the names are required. */}}
{{- define "fleetlet.serviceAccount" -}}
{{- $named := index .root.Values.serviceAccount.names .component -}}
{{- if .root.Values.serviceAccount.create -}}
{{- default (printf "%s-%s" (include "fleetlet.fullname" .root) .component) $named -}}
{{- else -}}
{{- required (printf "serviceAccount.names.%s is required when serviceAccount.create is false" .component) $named -}}
{{- end -}}
{{- end -}}

{{/* The ConfigMap recording devices' NATS identities, named after the release. */}}
{{- define "fleetlet.identitiesConfigMap" -}}
{{- printf "%s-nats-identities" (include "fleetlet.fullname" .) -}}
{{- end -}}

{{/* Where both Deployments' pods run: priorityClassName, then <component>'s spread
     constraints, node selector, tolerations and affinity. Include with
     (dict "root" $ "component" "controller"). */}}
{{- define "fleetlet.podScheduling" -}}
{{- $c := index .root.Values .component -}}
{{- with .root.Values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with $c.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $c.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $c.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $c.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* NATS connection settings, as environment variables. Include with
     (dict "root" $ "component" "controller"): each component may have its own credentials
     (<component>.natsCredentialsSecretName), else the shared nats.credentials. */}}
{{- define "fleetlet.natsSecret" -}}
{{- default .root.Values.nats.credentials.secretName (index .root.Values .component).natsCredentialsSecretName -}}
{{- end -}}

{{- define "fleetlet.natsEnv" -}}
{{- $v := .root.Values -}}
- name: FLEETLET_NATS_URL
  value: {{ $v.nats.url | quote }}
{{- if include "fleetlet.natsSecret" . }}
- name: FLEETLET_NATS_CREDS
  value: /etc/fleetlet/nats/{{ $v.nats.credentials.key }}
{{- end }}
{{- if $v.nats.tls.caSecretName }}
- name: FLEETLET_NATS_CA
  value: /etc/fleetlet/nats-ca/{{ $v.nats.tls.caKey }}
{{- end }}
- name: POD_NAMESPACE
  valueFrom: { fieldRef: { fieldPath: metadata.namespace } }
- name: POD_NAME
  valueFrom: { fieldRef: { fieldPath: metadata.name } }
{{- end -}}

{{- define "fleetlet.natsVolumeMounts" -}}
{{- if include "fleetlet.natsSecret" . }}
- { name: nats-creds, mountPath: /etc/fleetlet/nats, readOnly: true }
{{- end }}
{{- if .root.Values.nats.tls.caSecretName }}
- { name: nats-ca, mountPath: /etc/fleetlet/nats-ca, readOnly: true }
{{- end }}
{{- end -}}

{{- define "fleetlet.natsVolumes" -}}
{{- $v := .root.Values -}}
{{- with include "fleetlet.natsSecret" . }}
- name: nats-creds
  secret:
    secretName: {{ . }}
    items: [{ key: {{ $v.nats.credentials.key | quote }}, path: {{ $v.nats.credentials.key | quote }} }]
{{- end }}
{{- if $v.nats.tls.caSecretName }}
- name: nats-ca
  secret:
    secretName: {{ $v.nats.tls.caSecretName }}
    items: [{ key: {{ $v.nats.tls.caKey | quote }}, path: {{ $v.nats.tls.caKey | quote }} }]
{{- end }}
{{- end -}}

{{/* Probes on the metrics port. */}}
{{- define "fleetlet.probes" -}}
startupProbe:
  httpGet: { path: /healthz, port: metrics }
  periodSeconds: 2
  failureThreshold: 60
livenessProbe:
  httpGet: { path: /healthz, port: metrics }
  periodSeconds: 10
  failureThreshold: 3
readinessProbe:
  httpGet: { path: /readyz, port: metrics }
  periodSeconds: 5
{{- end -}}
