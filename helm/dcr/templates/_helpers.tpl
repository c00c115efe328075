{{- /*
  dcr.labels: the recommended labels on everything this release renders.
*/}}
{{- define "dcr.labels" -}}
app.kubernetes.io/name: dcr
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: jupyterhub
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end }}

{{- /*
  dcr.claimName: the PersistentVolumeClaim of one dataset version, exactly as DCRKubeSpawner derives it
  from its default synthetic_claim_template "dcr-synthetic-{provider}-{dataset}-{version_short}" ('_' in
  names becomes '-', version_short is the first 12 hex digits). The hub configuration sets that template
  explicitly, so the two cannot drift apart. Argument: the dataset key "<provider>/<dataset>" and its entry.
*/}}
{{- define "dcr.claimName" -}}
{{- $parts := splitList "/" .ref -}}
{{- $hex := trimPrefix "sha256:" .spec.version -}}
{{- printf "dcr-synthetic-%s-%s-%s" (index $parts 0 | replace "_" "-") (index $parts 1 | replace "_" "-") (trunc 12 $hex) -}}
{{- end }}

{{- /* The claim template as DCRKubeSpawner reads it (kept beside dcr.claimName, which implements it). */}}
{{- define "dcr.claimTemplate" -}}
dcr-synthetic-{provider}-{dataset}-{version_short}
{{- end }}
