{{/* The pod template shared by the StatefulSet (embedded) and the Deployment (postgres). */}}
{{- define "ballast.podTemplate" -}}
metadata:
  labels:
    {{- include "ballast.labels" . | nindent 4 }}
    {{- with .Values.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    # A changed ballast.toml rolls the pods.
    checksum/config: {{ include "ballast.config" . | sha256sum }}
    {{- with .Values.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  serviceAccountName: {{ include "ballast.serviceAccountName" . }}
  automountServiceAccountToken: false
  enableServiceLinks: false
  terminationGracePeriodSeconds: {{ .Values.terminationGracePeriodSeconds }}
  {{- with .Values.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  {{- with .Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    runAsNonRoot: true
    runAsUser: 65532
    runAsGroup: 65532
    fsGroup: 65532
    fsGroupChangePolicy: OnRootMismatch
    seccompProfile:
      type: RuntimeDefault
  containers:
    - name: ballast
      image: {{ include "ballast.image" . | quote }}
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      args: ["serve", "--config", "/etc/ballast/ballast.toml"]
      ports:
        - name: http
          containerPort: 8080
          protocol: TCP
        - name: admin
          containerPort: 8081
          protocol: TCP
      env:
        {{- include "ballast.env" . | nindent 8 }}
      # Up while the process serves HTTP, whatever the storage or database does: an
      # outage must not restart every pod. The startup probe covers log recovery.
      startupProbe:
        httpGet: {path: /livez, port: http}
        periodSeconds: {{ .Values.probes.startup.periodSeconds }}
        timeoutSeconds: {{ .Values.probes.startup.timeoutSeconds }}
        failureThreshold: {{ .Values.probes.startup.failureThreshold }}
      livenessProbe:
        httpGet: {path: /livez, port: http}
        periodSeconds: {{ .Values.probes.liveness.periodSeconds }}
        timeoutSeconds: {{ .Values.probes.liveness.timeoutSeconds }}
        failureThreshold: {{ .Values.probes.liveness.failureThreshold }}
      # 503 while events cannot be accepted: storage failed or full, database
      # unreachable, shutting down.
      readinessProbe:
        httpGet: {path: /readyz, port: http}
        periodSeconds: {{ .Values.probes.readiness.periodSeconds }}
        timeoutSeconds: {{ .Values.probes.readiness.timeoutSeconds }}
        failureThreshold: {{ .Values.probes.readiness.failureThreshold }}
      lifecycle:
        # The image has no shell: the kubelet's own sleep (Kubernetes 1.30+) keeps the
        # pod serving while it leaves the Services' endpoints, then SIGTERM drains.
        preStop:
          sleep:
            seconds: {{ .Values.preStopSleepSeconds }}
      resources:
        {{- toYaml .Values.resources | nindent 8 }}
      securityContext:
        runAsNonRoot: true
        runAsUser: 65532
        runAsGroup: 65532
        readOnlyRootFilesystem: true
        allowPrivilegeEscalation: false
        privileged: false
        capabilities:
          drop: [ALL]
        seccompProfile:
          type: RuntimeDefault
      volumeMounts:
        - name: config
          mountPath: /etc/ballast
          readOnly: true
        - name: data
          mountPath: /var/lib/ballast
        - name: tmp
          mountPath: /tmp
  volumes:
    - name: config
      configMap:
        name: {{ include "ballast.fullname" . }}
    - name: tmp
      emptyDir:
        sizeLimit: {{ .Values.emptyDirSizeLimit }}
    {{- if eq .Values.storage.backend "postgres" }}
    # Events live in PostgreSQL; the data directory keeps this replica's dead letters,
    # retry state and alert outbox (docs/KUBERNETES.md: scaling down).
    - name: data
      emptyDir:
        sizeLimit: {{ .Values.emptyDirSizeLimit }}
    {{- end }}
  {{- with .Values.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- if and (eq .Values.storage.backend "postgres") .Values.topologySpread.enabled }}
  topologySpreadConstraints:
    - topologyKey: topology.kubernetes.io/zone
      maxSkew: {{ .Values.topologySpread.maxSkew }}
      whenUnsatisfiable: {{ .Values.topologySpread.whenUnsatisfiable }}
      nodeTaintsPolicy: Honor
      labelSelector:
        matchLabels:
          {{- include "ballast.selectorLabels" . | nindent 10 }}
      matchLabelKeys: [pod-template-hash]
    - topologyKey: kubernetes.io/hostname
      maxSkew: {{ .Values.topologySpread.maxSkew }}
      whenUnsatisfiable: {{ .Values.topologySpread.whenUnsatisfiable }}
      nodeTaintsPolicy: Honor
      labelSelector:
        matchLabels:
          {{- include "ballast.selectorLabels" . | nindent 10 }}
      matchLabelKeys: [pod-template-hash]
  {{- end }}
{{- end -}}
