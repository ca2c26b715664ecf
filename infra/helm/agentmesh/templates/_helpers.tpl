{{/* Labels Helm adds to every object it owns (beside the app.kubernetes.io/name and part-of the manifests carry). */}}
{{- define "agentmesh.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end -}}

{{/*
An image reference: (list $ "worker") -> <registry>/agentmesh/worker@<digest>, or :<tag>.
A digest in images.digests wins over the tag; production should set every digest
(release.yml's promotion pull request has them).
*/}}
{{- define "agentmesh.image" -}}
{{- $root := index . 0 -}}
{{- $name := index . 1 -}}
{{- $images := $root.Values.images -}}
{{- $prefix := "" -}}
{{- with $images.registry }}{{ $prefix = printf "%s/" (trimSuffix "/" .) }}{{ end -}}
{{- $repo := printf "%s%s/%s" $prefix $images.repository $name -}}
{{- $digest := index ($images.digests | default dict) $name -}}
{{- if $digest -}}
{{ printf "%s@%s" $repo $digest }}
{{- else -}}
{{ printf "%s:%s" $repo ($images.tag | default $root.Chart.AppVersion) }}
{{- end -}}
{{- end -}}

{{/* A value that must be set, with the command that sets it. */}}
{{- define "agentmesh.required" -}}
{{- required (printf "%s is not set: render the identity values with `python infra/render.py --home <mesh home> helm` and pass them with -f" (index . 0)) (index . 1) -}}
{{- end -}}

{{/*
The edge's identity provider (edge.oidc) as settings of the config map, the ones set only:
MESH_EDGE_ISSUER, MESH_EDGE_AUDIENCE, MESH_EDGE_JWKS_URL. .Values.config wins over them.
*/}}
{{- define "agentmesh.edgeConfig" -}}
{{- $out := dict -}}
{{- $oidc := (.Values.edge | default dict).oidc | default dict -}}
{{- with $oidc.issuer }}{{ $_ := set $out "MESH_EDGE_ISSUER" (toString .) }}{{ end -}}
{{- with $oidc.audience }}{{ $_ := set $out "MESH_EDGE_AUDIENCE" (toString .) }}{{ end -}}
{{- with $oidc.jwksUrl }}{{ $_ := set $out "MESH_EDGE_JWKS_URL" (toString .) }}{{ end -}}
{{- toYaml $out -}}
{{- end -}}

{{/*
The A2A gateway's identity provider and public URL (a2a.oidc, a2a.publicUrl) as settings of the
config map, the ones set only: MESH_A2A_ISSUER, MESH_A2A_AUDIENCE, MESH_A2A_JWKS_URL,
MESH_A2A_PUBLIC_URL. .Values.config wins over them.
*/}}
{{- define "agentmesh.a2aConfig" -}}
{{- $out := dict -}}
{{- $a2a := .Values.a2a | default dict -}}
{{- $oidc := $a2a.oidc | default dict -}}
{{- with $oidc.issuer }}{{ $_ := set $out "MESH_A2A_ISSUER" (toString .) }}{{ end -}}
{{- with $oidc.audience }}{{ $_ := set $out "MESH_A2A_AUDIENCE" (toString .) }}{{ end -}}
{{- with $oidc.jwksUrl }}{{ $_ := set $out "MESH_A2A_JWKS_URL" (toString .) }}{{ end -}}
{{- with $a2a.publicUrl }}{{ $_ := set $out "MESH_A2A_PUBLIC_URL" (toString .) }}{{ end -}}
{{- toYaml $out -}}
{{- end -}}
