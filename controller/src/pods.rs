//! Pods bound to a virtual node, as resources of that device's manifest.
//!
//! Each container becomes a `container` resource; ConfigMap and Secret volumes become
//! `file` resources under a per-pod directory bind-mounted into the containers; `emptyDir`
//! becomes a per-pod host directory. What a device cannot do is refused as a whole, with a
//! reason, never run in part. The translation is pure: ConfigMaps and Secrets come in
//! through a lookup.

use std::collections::BTreeMap;

use fleetlet_protocol::{
    ContainerLimits, ContainerSpec, EnvVar, FileContent, FileSpec, HostPathMount, ManagedResource,
    Owner, OwnerKind, PortMapping, PortProtocol, Probe, ProbeAction, PullPolicy, ResourceId,
    ResourceSpec, RestartPolicy,
};
use k8s_openapi::{
    api::core::v1::{ConfigMap, Container, Pod, Secret},
    apimachinery::pkg::util::intstr::IntOrString,
};
use kube::core::PartialObjectMeta;

/// Where a pod's files and scratch directories live on the device (inside the agent's
/// default `file.allowed_roots`).
pub const POD_ROOT: &str = "/opt/fleetlet/pods";

/// Why a pod cannot run on a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// CamelCase, for the pod condition and the Event.
    pub reason: &'static str,
    pub message: String,
    /// True when it may resolve by itself (a ConfigMap not created yet); such a pod waits
    /// instead of failing.
    pub transient: bool,
}

fn refuse(reason: &'static str, message: impl Into<String>) -> Refusal {
    Refusal {
        reason,
        message: message.into(),
        transient: false,
    }
}

fn wait(reason: &'static str, message: impl Into<String>) -> Refusal {
    Refusal {
        reason,
        message: message.into(),
        transient: true,
    }
}

/// The status patch that says `r` on `pod`: Failed, or Pending with a Ready condition
/// giving the reason while it may resolve by itself. `None` when the pod says it already.
pub fn refusal_status(pod: &Pod, r: &Refusal) -> Option<serde_json::Value> {
    let status = pod.status.as_ref();
    let phase = status.and_then(|s| s.phase.as_deref());
    let message = if r.transient {
        r.message.clone()
    } else {
        format!("{REFUSED_PREFIX}{}", r.message)
    };
    if r.transient {
        let says_it = phase == Some("Pending")
            && status
                .and_then(|s| s.conditions.as_ref())
                .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
                .is_some_and(|c| {
                    c.status == "False"
                        && c.reason.as_deref() == Some(r.reason)
                        && c.message.as_deref() == Some(message.as_str())
                });
        (!says_it).then(|| {
            serde_json::json!({ "status": { "phase": "Pending", "conditions": [{
                "type": "PodScheduled", "status": "True" }, {
                "type": "Ready", "status": "False", "reason": r.reason, "message": message }] } })
        })
    } else {
        let says_it = phase == Some("Failed")
            && status.and_then(|s| s.reason.as_deref()) == Some(r.reason)
            && status.and_then(|s| s.message.as_deref()) == Some(message.as_str());
        (!says_it).then(|| {
            serde_json::json!({ "status": { "phase": "Failed", "reason": r.reason,
                "message": message } })
        })
    }
}

/// ConfigMaps and Secrets of the pod's namespace.
pub trait Lookup {
    fn config_map(&self, namespace: &str, name: &str) -> Option<ConfigMap>;
    fn secret(&self, namespace: &str, name: &str) -> Option<Secret>;
    /// Whether the controller reads ConfigMaps and Secrets in `namespace` (`--pod-namespaces`):
    /// pods elsewhere are refused.
    fn serves(&self, _namespace: &str) -> bool {
        true
    }
}

/// Seals a Secret's bytes to the pod's device (its own key): `Err` (to wait) while the
/// device's key is not known.
pub trait Seal {
    fn seal(&self, bytes: &[u8]) -> Result<String, Refusal>;
}

pub use fleetlet_crds::naming::{DEVICE_LABEL, REFUSED_PREFIX, container_id, pod_tag};

/// The pod's directory on the device.
pub fn pod_dir(namespace: &str, name: &str) -> String {
    format!("{POD_ROOT}/{namespace}_{name}")
}

fn owner(pod: &Pod) -> Owner {
    Owner {
        kind: OwnerKind::Pod,
        namespace: pod.metadata.namespace.clone().unwrap_or_default(),
        name: pod.metadata.name.clone().unwrap_or_default(),
        generation: pod.metadata.generation.unwrap_or(0),
        uid: pod.metadata.uid.clone(),
    }
}

/// A Kubernetes quantity (`128Mi`, `0.5`, `500m`, `1e3`) as a number.
pub fn parse_quantity(s: &str) -> Option<f64> {
    let s = s.trim();
    let suffixes: [(&str, f64); 13] = [
        ("Ki", 1024.0),
        ("Mi", 1024.0 * 1024.0),
        ("Gi", 1024.0 * 1024.0 * 1024.0),
        ("Ti", 1024f64.powi(4)),
        ("Pi", 1024f64.powi(5)),
        ("Ei", 1024f64.powi(6)),
        ("n", 1e-9),
        ("u", 1e-6),
        ("m", 1e-3),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
    ];
    for (suffix, factor) in suffixes {
        if let Some(n) = s.strip_suffix(suffix) {
            return n.parse::<f64>().ok().map(|v| v * factor);
        }
    }
    for (suffix, factor) in [("P", 1e15), ("E", 1e18)] {
        if let Some(n) = s.strip_suffix(suffix) {
            return n.parse::<f64>().ok().map(|v| v * factor);
        }
    }
    s.parse::<f64>().ok().filter(|v| v.is_finite())
}

/// One ConfigMap or Secret, as key → bytes.
struct Source {
    what: String,
    entries: BTreeMap<String, Vec<u8>>,
    /// A Secret's: its bytes travel sealed to the device.
    secret: bool,
}

impl Source {
    /// The bytes of one entry as a file's content.
    fn content(&self, bytes: &[u8], seal: &dyn Seal) -> Result<FileContent, Refusal> {
        if self.secret {
            return Ok(FileContent::Sealed(seal.seal(bytes)?));
        }
        Ok(file_content(bytes))
    }

    /// One entry as an environment variable.
    fn env(&self, name: String, bytes: &[u8], seal: &dyn Seal) -> Result<EnvVar, Refusal> {
        env_var(name, bytes, self.secret, seal)
    }
}

fn env_var(name: String, bytes: &[u8], secret: bool, seal: &dyn Seal) -> Result<EnvVar, Refusal> {
    Ok(if secret {
        EnvVar {
            name,
            value: String::new(),
            sealed_value: Some(seal.seal(bytes)?),
        }
    } else {
        EnvVar {
            name,
            value: String::from_utf8_lossy(bytes).into_owned(),
            sealed_value: None,
        }
    })
}

fn config_map_source(cm: &ConfigMap, name: &str) -> Source {
    let mut entries = BTreeMap::new();
    for (k, v) in cm.data.iter().flatten() {
        entries.insert(k.clone(), v.as_bytes().to_vec());
    }
    for (k, v) in cm.binary_data.iter().flatten() {
        entries.insert(k.clone(), v.0.clone());
    }
    Source {
        what: format!("ConfigMap {name}"),
        entries,
        secret: false,
    }
}

fn secret_source(s: &Secret, name: &str) -> Source {
    let mut entries = BTreeMap::new();
    for (k, v) in s.data.iter().flatten() {
        entries.insert(k.clone(), v.0.clone());
    }
    for (k, v) in s.string_data.iter().flatten() {
        entries.insert(k.clone(), v.as_bytes().to_vec());
    }
    Source {
        what: format!("Secret {name}"),
        entries,
        secret: true,
    }
}

/// Where keyed data comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SourceKind {
    ConfigMap,
    Secret,
}

impl SourceKind {
    fn name(self) -> &'static str {
        match self {
            Self::ConfigMap => "ConfigMap",
            Self::Secret => "Secret",
        }
    }
}

/// The ConfigMap or Secret `name` of `ns`, as key → bytes, if it exists.
fn fetch(lookup: &dyn Lookup, ns: &str, kind: SourceKind, name: &str) -> Option<Source> {
    match kind {
        SourceKind::ConfigMap => lookup
            .config_map(ns, name)
            .map(|c| config_map_source(&c, name)),
        SourceKind::Secret => lookup.secret(ns, name).map(|c| secret_source(&c, name)),
    }
}

fn file_content(bytes: &[u8]) -> FileContent {
    match std::str::from_utf8(bytes) {
        Ok(t) => FileContent::Text(t.to_owned()),
        Err(_) => {
            use base64::Engine;
            FileContent::Base64(base64::engine::general_purpose::STANDARD.encode(bytes))
        }
    }
}

/// A relative path inside a volume: no `..`, not absolute.
fn safe_relative(p: &str) -> bool {
    !p.is_empty()
        && !p.starts_with('/')
        && p.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
}

/// Translates a pod bound to `node` into resources, or says why it cannot run there.
/// Secret contents are sealed with `seal`.
pub fn translate(
    pod: &Pod,
    lookup: &dyn Lookup,
    seal: &dyn Seal,
) -> Result<Vec<ManagedResource>, Refusal> {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let Some(spec) = &pod.spec else {
        return Err(refuse("InvalidPod", "the pod has no spec"));
    };
    if !lookup.serves(&ns) {
        return Err(refuse(
            "NamespaceNotServed",
            format!(
                "pods in namespace {ns} do not run on devices: fleetlet's controller reads ConfigMaps and Secrets only in its --pod-namespaces (chart: controller.podNamespaces)"
            ),
        ));
    }
    check_pod_spec(spec)?;
    let cx = PodContext {
        pod,
        ns: &ns,
        lookup,
        seal,
    };
    let mut files = Files {
        tag: pod_tag(&ns, &name),
        owner: owner(pod),
        next: 0,
        out: Vec::new(),
    };
    let volumes = pod_volumes(&cx, spec, &pod_dir(&ns, &name), &mut files)?;
    let restart = match spec.restart_policy.as_deref() {
        Some("OnFailure") => RestartPolicy::OnFailure,
        Some("Never") => RestartPolicy::Never,
        _ => RestartPolicy::Always,
    };
    let mut out = files.out;
    for (i, c) in spec.containers.iter().enumerate() {
        let id = container_id(&ns, &name, i, &c.name).ok_or_else(|| {
            refuse(
                "InvalidPod",
                format!("container {} has no usable id", c.name),
            )
        })?;
        let spec = container(&cx, c, &volumes, restart)?;
        out.push(ManagedResource {
            id,
            owner: files.owner.clone(),
            spec: ResourceSpec::Container(spec),
        });
    }
    Ok(out)
}

/// What translating one pod reads: the pod, its namespace, the objects it references
/// and the key its Secrets are sealed with.
struct PodContext<'a> {
    pod: &'a Pod,
    ns: &'a str,
    lookup: &'a dyn Lookup,
    seal: &'a dyn Seal,
}

/// The File resources of a pod's volumes, numbered in order.
struct Files {
    tag: String,
    owner: Owner,
    next: usize,
    out: Vec<ManagedResource>,
}

impl Files {
    fn add(
        &mut self,
        path: String,
        content: FileContent,
        mode: Option<i32>,
    ) -> Result<(), Refusal> {
        let id = ResourceId::new(format!("{}-f{}", self.tag, self.next))
            .map_err(|e| refuse("InvalidPod", e.to_string()))?;
        self.next += 1;
        self.out.push(ManagedResource {
            id,
            owner: self.owner.clone(),
            spec: ResourceSpec::File(FileSpec {
                path,
                content,
                mode: mode.and_then(|m| u32::try_from(m).ok()).map(|m| m & 0o7777),
                owner: None,
                group: None,
            }),
        });
        Ok(())
    }
}

/// Pod-level features a device does not offer.
fn check_pod_spec(spec: &k8s_openapi::api::core::v1::PodSpec) -> Result<(), Refusal> {
    if spec.init_containers.as_ref().is_some_and(|c| !c.is_empty()) {
        return Err(refuse(
            "InitContainersUnsupported",
            "init containers are not run on fleetlet devices",
        ));
    }
    if spec.host_network == Some(true) {
        return Err(refuse(
            "HostNetworkUnsupported",
            "hostNetwork pods are not run on fleetlet devices",
        ));
    }
    if let Some(sc) = &spec.security_context {
        for (field, set) in [
            ("runAsUser", sc.run_as_user.is_some()),
            ("runAsGroup", sc.run_as_group.is_some()),
        ] {
            if set {
                return Err(refuse(
                    "RunAsUserUnsupported",
                    format!(
                        "spec.securityContext.{field} is not supported on fleetlet devices yet"
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Where each volume lives on the device: volume name → (host directory, read-only).
/// Volumes every pod gets but a device does not need (the service account token) are
/// absent, and listed in `skipped`.
struct Volumes {
    hosts: BTreeMap<String, (String, bool)>,
    skipped: Vec<String>,
}

/// A ConfigMap or Secret volume: which object, whether optional, which items, file mode.
type KeyedVolume<'a> = (
    SourceKind,
    String,
    Option<bool>,
    Option<&'a [k8s_openapi::api::core::v1::KeyToPath]>,
    Option<i32>,
);

fn keyed_volume(v: &k8s_openapi::api::core::v1::Volume) -> Option<KeyedVolume<'_>> {
    if let Some(cm) = &v.config_map {
        return Some((
            SourceKind::ConfigMap,
            cm.name.clone(),
            cm.optional,
            cm.items.as_deref(),
            cm.default_mode,
        ));
    }
    v.secret.as_ref().map(|sv| {
        (
            SourceKind::Secret,
            sv.secret_name.clone().unwrap_or_default(),
            sv.optional,
            sv.items.as_deref(),
            sv.default_mode.or(Some(0o600)),
        )
    })
}

/// The pod's volumes: ConfigMaps and Secrets become files under `dir`, emptyDirs a
/// directory there, hostPaths stay where they are.
fn pod_volumes(
    cx: &PodContext<'_>,
    spec: &k8s_openapi::api::core::v1::PodSpec,
    dir: &str,
    files: &mut Files,
) -> Result<Volumes, Refusal> {
    let mut volumes = Volumes {
        hosts: BTreeMap::new(),
        skipped: Vec::new(),
    };
    for v in spec.volumes.iter().flatten() {
        let host = format!("{dir}/{}", v.name);
        if let Some((kind, name, optional, items, mode)) = keyed_volume(v) {
            let source = match fetch(cx.lookup, cx.ns, kind, &name) {
                Some(source) => source,
                None if optional == Some(true) => Source {
                    what: String::new(),
                    entries: BTreeMap::new(),
                    secret: false,
                },
                None => {
                    let reason = match kind {
                        SourceKind::ConfigMap => "ConfigMapNotFound",
                        SourceKind::Secret => "SecretNotFound",
                    };
                    return Err(wait(
                        reason,
                        format!("{} {name} (volume {}) does not exist", kind.name(), v.name),
                    ));
                }
            };
            project(files, &host, &source, items, mode, cx.seal)?;
            volumes.hosts.insert(v.name.clone(), (host, true));
        } else if v.empty_dir.is_some() {
            // The marker file makes the agent create the directory.
            files.add(
                format!("{host}/.fleetlet-emptydir"),
                FileContent::Text(String::new()),
                Some(0o644),
            )?;
            volumes.hosts.insert(v.name.clone(), (host, false));
        } else if let Some(hp) = &v.host_path {
            volumes
                .hosts
                .insert(v.name.clone(), (hp.path.clone(), false));
        } else if v.projected.is_some() && v.name.starts_with("kube-api-access-") {
            // The service account token every pod gets: devices do not call the apiserver.
            volumes.skipped.push(v.name.clone());
        } else if v.persistent_volume_claim.is_some() {
            return Err(refuse(
                "PersistentVolumeClaimUnsupported",
                format!(
                    "volume {}: PersistentVolumeClaims are not available on fleetlet devices; use emptyDir or hostPath",
                    v.name
                ),
            ));
        } else {
            return Err(refuse(
                "VolumeTypeUnsupported",
                format!(
                    "volume {}: only configMap, secret, emptyDir and hostPath volumes run on fleetlet devices",
                    v.name
                ),
            ));
        }
    }
    Ok(volumes)
}

/// Files for a ConfigMap/Secret volume: every key, or the listed items.
fn project(
    files: &mut Files,
    host: &str,
    source: &Source,
    items: Option<&[k8s_openapi::api::core::v1::KeyToPath]>,
    default_mode: Option<i32>,
    seal: &dyn Seal,
) -> Result<(), Refusal> {
    let mut wrote = false;
    match items {
        Some(items) if !items.is_empty() => {
            for it in items {
                let Some(bytes) = source.entries.get(&it.key) else {
                    return Err(wait(
                        "KeyNotFound",
                        format!("{} has no key {}", source.what, it.key),
                    ));
                };
                if !safe_relative(&it.path) {
                    return Err(refuse(
                        "InvalidPod",
                        format!("item path {:?} must be relative, without '..'", it.path),
                    ));
                }
                files.add(
                    format!("{host}/{}", it.path),
                    source.content(bytes, seal)?,
                    it.mode.or(default_mode),
                )?;
                wrote = true;
            }
        }
        _ => {
            for (k, bytes) in &source.entries {
                if !safe_relative(k) {
                    continue;
                }
                files.add(
                    format!("{host}/{k}"),
                    source.content(bytes, seal)?,
                    default_mode,
                )?;
                wrote = true;
            }
        }
    }
    if !wrote {
        files.add(
            format!("{host}/.fleetlet-emptydir"),
            FileContent::Text(String::new()),
            Some(0o644),
        )?;
    }
    Ok(())
}

/// A container's environment variable `e`, or `None` (an optional reference that is not
/// there).
fn env_value(
    pod: &Pod,
    ns: &str,
    c: &Container,
    e: &k8s_openapi::api::core::v1::EnvVar,
    lookup: &dyn Lookup,
    seal: &dyn Seal,
) -> Result<Option<EnvVar>, Refusal> {
    let plain = |v: String| {
        Some(EnvVar {
            name: e.name.clone(),
            value: v,
            sealed_value: None,
        })
    };
    let Some(from) = &e.value_from else {
        return Ok(plain(e.value.clone().unwrap_or_default()));
    };
    let key_ref = match (&from.config_map_key_ref, &from.secret_key_ref) {
        (Some(r), _) => Some((SourceKind::ConfigMap, &r.name, &r.key, r.optional)),
        (None, Some(r)) => Some((SourceKind::Secret, &r.name, &r.key, r.optional)),
        (None, None) => None,
    };
    if let Some((kind, name, key, optional)) = key_ref {
        let v = fetch(lookup, ns, kind, name).and_then(|s| s.entries.get(key).cloned());
        return match v {
            Some(b) => Ok(Some(env_var(
                e.name.clone(),
                &b,
                kind == SourceKind::Secret,
                seal,
            )?)),
            None if optional == Some(true) => Ok(None),
            None => Err(wait(
                "CreateContainerConfigError",
                format!(
                    "container {}: env {}: {} {name} key {key} not found",
                    c.name,
                    e.name,
                    kind.name()
                ),
            )),
        };
    }
    if let Some(f) = &from.field_ref {
        let m = &pod.metadata;
        let v = match f.field_path.as_str() {
            "metadata.name" => m.name.clone(),
            "metadata.namespace" => m.namespace.clone(),
            "metadata.uid" => m.uid.clone(),
            "spec.nodeName" => pod.spec.as_ref().and_then(|s| s.node_name.clone()),
            "spec.serviceAccountName" => pod
                .spec
                .as_ref()
                .and_then(|s| s.service_account_name.clone()),
            p if p.starts_with("metadata.labels['") => m.labels.as_ref().and_then(|l| {
                l.get(
                    p.trim_start_matches("metadata.labels['")
                        .trim_end_matches("']"),
                )
                .cloned()
            }),
            other => {
                return Err(refuse(
                    "FieldRefUnsupported",
                    format!(
                        "container {}: env {}: fieldRef {other} is not available on fleetlet devices",
                        c.name, e.name
                    ),
                ));
            }
        };
        return Ok(plain(v.unwrap_or_default()));
    }
    Err(refuse(
        "EnvSourceUnsupported",
        format!(
            "container {}: env {}: only value, configMapKeyRef, secretKeyRef and fieldRef are supported",
            c.name, e.name
        ),
    ))
}

fn probe_port(c: &Container, port: &IntOrString) -> Result<u16, Refusal> {
    let container_port = match port {
        IntOrString::Int(p) => u16::try_from(*p).ok(),
        IntOrString::String(n) => c
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(n.as_str()))
            .and_then(|p| u16::try_from(p.container_port).ok()),
    };
    let Some(container_port) = container_port else {
        return Err(refuse(
            "ProbeUnsupported",
            format!(
                "container {}: probe port {port:?} is not one of its ports",
                c.name
            ),
        ));
    };
    // The agent probes the device's published port.
    c.ports
        .iter()
        .flatten()
        .find(|p| u16::try_from(p.container_port).ok() == Some(container_port))
        .map(|p| {
            p.host_port
                .and_then(|h| u16::try_from(h).ok())
                .unwrap_or(container_port)
        })
        .ok_or_else(|| {
            refuse(
                "ProbeUnsupported",
                format!(
                    "container {}: probe port {container_port} is not published in ports",
                    c.name
                ),
            )
        })
}

/// One container as the agent runs it.
fn container(
    cx: &PodContext<'_>,
    c: &Container,
    volumes: &Volumes,
    restart_policy: RestartPolicy,
) -> Result<ContainerSpec, Refusal> {
    let image = c
        .image
        .clone()
        .filter(|i| !i.is_empty())
        .ok_or_else(|| refuse("InvalidPod", format!("container {} has no image", c.name)))?;
    check_container(c)?;
    let limits = c
        .resources
        .as_ref()
        .and_then(|r| r.limits.as_ref())
        .map(|l| ContainerLimits {
            memory_bytes: l
                .get("memory")
                .and_then(|q| parse_quantity(&q.0))
                .map(|v| v as u64),
            cpu_millis: l
                .get("cpu")
                .and_then(|q| parse_quantity(&q.0))
                .map(|v| (v * 1000.0).ceil() as u32),
        });
    Ok(ContainerSpec {
        image,
        image_pull_policy: match c.image_pull_policy.as_deref() {
            Some("Always") => PullPolicy::Always,
            _ => PullPolicy::IfNotPresent,
        },
        command: c.command.clone().unwrap_or_default(),
        args: c.args.clone().unwrap_or_default(),
        env: container_env(cx, c)?,
        ports: container_ports(c)?,
        mounts: container_mounts(c, volumes)?,
        restart_policy,
        limits: limits.filter(|l| l.memory_bytes.is_some() || l.cpu_millis.is_some()),
        probe: c
            .readiness_probe
            .as_ref()
            .map(|p| readiness_probe(c, p))
            .transpose()?,
        // As with a kubelet, a changed ConfigMap or Secret does not restart the container.
        restart_on: Vec::new(),
        restart_digest: None,
    })
}

/// Container features a device does not offer.
fn check_container(c: &Container) -> Result<(), Refusal> {
    if c.liveness_probe.is_some() || c.startup_probe.is_some() {
        return Err(refuse(
            "ProbeUnsupported",
            format!(
                "container {}: liveness and startup probes are not run on fleetlet devices; use a readinessProbe",
                c.name
            ),
        ));
    }
    if let Some(sc) = &c.security_context {
        if sc.privileged == Some(true) {
            return Err(refuse(
                "PrivilegedUnsupported",
                format!(
                    "container {}: privileged containers are not run on fleetlet devices",
                    c.name
                ),
            ));
        }
        if sc.run_as_user.is_some() || sc.run_as_group.is_some() {
            return Err(refuse(
                "RunAsUserUnsupported",
                format!(
                    "container {}: runAsUser/runAsGroup are not supported on fleetlet devices yet",
                    c.name
                ),
            ));
        }
    }
    if c.working_dir.as_deref().is_some_and(|w| !w.is_empty()) {
        return Err(refuse(
            "WorkingDirUnsupported",
            format!(
                "container {}: workingDir is not supported on fleetlet devices yet",
                c.name
            ),
        ));
    }
    Ok(())
}

/// The container's environment: `envFrom` sources first, then `env` (which wins).
fn container_env(cx: &PodContext<'_>, c: &Container) -> Result<Vec<EnvVar>, Refusal> {
    let mut env = Vec::new();
    for from in c.env_from.iter().flatten() {
        let prefix = from.prefix.clone().unwrap_or_default();
        let named = match (&from.config_map_ref, &from.secret_ref) {
            (Some(r), _) => Some((SourceKind::ConfigMap, &r.name, r.optional)),
            (None, Some(r)) => Some((SourceKind::Secret, &r.name, r.optional)),
            (None, None) => None,
        };
        let source = match named {
            None => None,
            Some((kind, name, optional)) => match fetch(cx.lookup, cx.ns, kind, name) {
                Some(source) => Some(source),
                None if optional == Some(true) => None,
                None => {
                    return Err(wait(
                        "CreateContainerConfigError",
                        format!(
                            "container {}: envFrom {} {name} not found",
                            c.name,
                            kind.name()
                        ),
                    ));
                }
            },
        };
        if let Some(source) = source {
            for (k, v) in &source.entries {
                env.push(source.env(format!("{prefix}{k}"), v, cx.seal)?);
            }
        }
    }
    for e in c.env.iter().flatten() {
        if let Some(var) = env_value(cx.pod, cx.ns, c, e, cx.lookup, cx.seal)? {
            env.retain(|x: &EnvVar| x.name != e.name);
            env.push(var);
        }
    }
    Ok(env)
}

fn container_ports(c: &Container) -> Result<Vec<PortMapping>, Refusal> {
    let mut ports = Vec::new();
    for p in c.ports.iter().flatten() {
        let container_port = u16::try_from(p.container_port).map_err(|_| {
            refuse(
                "InvalidPod",
                format!("container {}: port {}", c.name, p.container_port),
            )
        })?;
        ports.push(PortMapping {
            container_port,
            host_port: p.host_port.and_then(|h| u16::try_from(h).ok()),
            protocol: match p.protocol.as_deref() {
                Some("UDP") => PortProtocol::UDP,
                Some("SCTP") => {
                    return Err(refuse(
                        "InvalidPod",
                        format!("container {}: SCTP ports are not supported", c.name),
                    ));
                }
                _ => PortProtocol::TCP,
            },
            host_ip: p.host_ip.clone().filter(|h| !h.is_empty()),
        });
    }
    Ok(ports)
}

fn container_mounts(c: &Container, volumes: &Volumes) -> Result<Vec<HostPathMount>, Refusal> {
    let mut mounts = Vec::new();
    for m in c.volume_mounts.iter().flatten() {
        if volumes.skipped.contains(&m.name) {
            continue;
        }
        let Some((host, read_only)) = volumes.hosts.get(&m.name) else {
            return Err(refuse(
                "InvalidPod",
                format!(
                    "container {}: volumeMount {} names no volume",
                    c.name, m.name
                ),
            ));
        };
        if m.sub_path.as_deref().is_some_and(|s| !s.is_empty()) {
            return Err(refuse(
                "SubPathUnsupported",
                format!(
                    "container {}: subPath mounts are not supported on fleetlet devices",
                    c.name
                ),
            ));
        }
        if m.sub_path_expr.as_deref().is_some_and(|s| !s.is_empty()) {
            return Err(refuse(
                "SubPathUnsupported",
                format!(
                    "container {}: volumeMount {}: subPathExpr mounts are not supported on fleetlet devices",
                    c.name, m.name
                ),
            ));
        }
        mounts.push(HostPathMount {
            host_path: host.clone(),
            container_path: m.mount_path.clone(),
            read_only: *read_only || m.read_only == Some(true),
        });
    }
    Ok(mounts)
}

fn readiness_probe(c: &Container, p: &k8s_openapi::api::core::v1::Probe) -> Result<Probe, Refusal> {
    let action = if let Some(e) = &p.exec {
        ProbeAction::Exec {
            command: e.command.clone().unwrap_or_default(),
        }
    } else if let Some(h) = &p.http_get {
        ProbeAction::Http {
            port: probe_port(c, &h.port)?,
            path: h.path.clone().unwrap_or_else(|| "/".into()),
        }
    } else if let Some(t) = &p.tcp_socket {
        ProbeAction::Tcp {
            port: probe_port(c, &t.port)?,
        }
    } else {
        return Err(refuse(
            "ProbeUnsupported",
            format!(
                "container {}: only exec, httpGet and tcpSocket readiness probes are supported",
                c.name
            ),
        ));
    };
    Ok(Probe {
        action,
        period_seconds: p
            .period_seconds
            .and_then(|s| u32::try_from(s).ok())
            .unwrap_or(10),
        failure_threshold: p
            .failure_threshold
            .and_then(|s| u32::try_from(s).ok())
            .unwrap_or(3),
    })
}

/// What the controller keeps of a virtual Node (watched as metadata only): its identity
/// and the device it stands for ([`PodWatch::node_devices`] reads nothing else).
pub fn node_identity(n: &mut PartialObjectMeta<k8s_openapi::api::core::v1::Node>) {
    let m = std::mem::take(&mut n.metadata);
    let device = m
        .labels
        .and_then(|mut l| l.remove_entry(DEVICE_LABEL))
        .map(|entry| BTreeMap::from([entry]));
    n.types = None;
    n.metadata = kube::api::ObjectMeta {
        name: m.name,
        uid: m.uid,
        resource_version: m.resource_version,
        deletion_timestamp: m.deletion_timestamp,
        labels: device,
        ..Default::default()
    };
}

/// Pods and what they need, as the controller watches them.
#[derive(Clone)]
pub struct PodWatch {
    pub pods: kube::runtime::reflector::Store<Pod>,
    /// Virtual Nodes only (label [`DEVICE_LABEL`]), their metadata as [`node_identity`]
    /// keeps it.
    pub nodes: kube::runtime::reflector::Store<PartialObjectMeta<k8s_openapi::api::core::v1::Node>>,
    pub config_maps: Scoped<ConfigMap>,
    pub secrets: Scoped<Secret>,
}

/// Objects watched cluster-wide (`None`) or in each of some namespaces, one store each.
#[derive(Clone)]
pub struct Scoped<K: kube::Resource<DynamicType = ()> + Clone + 'static> {
    pub stores: Vec<(Option<String>, kube::runtime::reflector::Store<K>)>,
}

impl<K: kube::Resource<DynamicType = ()> + Clone + 'static> Scoped<K> {
    /// Whether `namespace`'s objects are watched.
    pub fn covers(&self, namespace: &str) -> bool {
        self.stores
            .iter()
            .any(|(ns, _)| ns.as_deref().is_none_or(|n| n == namespace))
    }

    pub fn get(&self, namespace: &str, name: &str) -> Option<K> {
        let key = kube::runtime::reflector::ObjectRef::new(name).within(namespace);
        self.stores
            .iter()
            .filter(|(ns, _)| ns.as_deref().is_none_or(|n| n == namespace))
            .find_map(|(_, s)| s.get(&key))
            .map(|o| (*o).clone())
    }
}

impl Lookup for PodWatch {
    fn config_map(&self, namespace: &str, name: &str) -> Option<ConfigMap> {
        self.config_maps.get(namespace, name)
    }

    fn secret(&self, namespace: &str, name: &str) -> Option<Secret> {
        self.secrets.get(namespace, name)
    }

    fn serves(&self, namespace: &str) -> bool {
        self.secrets.covers(namespace) && self.config_maps.covers(namespace)
    }
}

impl PodWatch {
    /// Node name → device, for the virtual nodes.
    pub fn node_devices(&self) -> BTreeMap<String, fleetlet_protocol::DeviceId> {
        fleetlet_crds::naming::node_devices(self.nodes.state().iter().map(|n| &n.metadata))
    }

    /// Every pod bound to a virtual node and not being deleted, with its device.
    pub fn bound(&self) -> Vec<(std::sync::Arc<Pod>, fleetlet_protocol::DeviceId)> {
        let nodes = self.node_devices();
        self.pods
            .state()
            .into_iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .filter_map(|p| {
                let node = p.spec.as_ref()?.node_name.as_ref()?;
                let device = nodes.get(node)?.clone();
                Some((p, device))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use k8s_openapi::api::core::v1::{
        ConfigMapKeySelector, ConfigMapVolumeSource, ContainerPort, EmptyDirVolumeSource,
        EnvVarSource, PersistentVolumeClaimVolumeSource, PodSpec, ResourceRequirements, Volume,
        VolumeMount,
    };
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

    #[test]
    fn a_refusal_is_written_until_the_stored_pod_says_it_and_again_once_overwritten() {
        use k8s_openapi::api::core::v1::{PodCondition, PodStatus};
        let with = |status: Option<serde_json::Value>| Pod {
            status: status
                .map(|v| serde_json::from_value::<PodStatus>(v["status"].clone()).unwrap()),
            ..Default::default()
        };
        let failed = refuse("PersistentVolumeClaimUnsupported", "no PVCs on devices");
        // A new pod: Failed, with the reason and the prefix the bridge leaves alone.
        let patch = refusal_status(&with(None), &failed).unwrap();
        assert_eq!(patch["status"]["phase"], "Failed");
        assert_eq!(
            patch["status"]["reason"],
            "PersistentVolumeClaimUnsupported"
        );
        assert!(
            patch["status"]["message"]
                .as_str()
                .unwrap()
                .starts_with(REFUSED_PREFIX)
        );
        // Stored as written: nothing more to write.
        assert_eq!(refusal_status(&with(Some(patch.clone())), &failed), None);
        // Overwritten by a writer that saw the pod before the refusal: written again.
        let overwritten = Pod {
            status: Some(PodStatus {
                phase: Some("Pending".into()),
                conditions: Some(vec![PodCondition {
                    type_: "Ready".into(),
                    status: "False".into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(refusal_status(&overwritten, &failed), Some(patch));

        // A refusal that may resolve: Pending with the reason, written once, and again
        // when the reason changes.
        let waiting = wait("ConfigMapNotFound", "configmap app-config not found");
        let patch = refusal_status(&with(None), &waiting).unwrap();
        assert_eq!(patch["status"]["phase"], "Pending");
        assert_eq!(refusal_status(&with(Some(patch)), &waiting), None);
        let other = wait("ConfigMapNotFound", "configmap other not found");
        let patch = refusal_status(&with(None), &waiting).unwrap();
        assert!(refusal_status(&with(Some(patch)), &other).is_some());
    }

    #[test]
    fn a_stored_node_keeps_its_device_and_nothing_a_status_write_changes() {
        use k8s_openapi::api::core::v1::{Node, NodeCondition, NodeStatus};
        let node = |ready: &str, version: &str| Node {
            metadata: kube::api::ObjectMeta {
                name: Some("pi-1".into()),
                uid: Some("u1".into()),
                resource_version: Some(version.into()),
                labels: Some(BTreeMap::from([
                    (DEVICE_LABEL.to_owned(), "pi-1".to_owned()),
                    ("kubernetes.io/arch".to_owned(), "arm64".to_owned()),
                ])),
                annotations: Some(BTreeMap::from([("a".to_owned(), "b".repeat(4096))])),
                ..Default::default()
            },
            status: Some(NodeStatus {
                conditions: Some(vec![NodeCondition {
                    type_: "Ready".into(),
                    status: ready.into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        };
        // What a metadata watch brings of a Node, as the controller stores it.
        let stored = |n: Node| {
            use kube::core::PartialObjectMetaExt;
            let mut m = n.metadata.into_response_partial::<Node>();
            node_identity(&mut m);
            m
        };
        let (before, after) = (stored(node("True", "1")), stored(node("False", "2")));
        // What the Pod pass reads survives...
        assert_eq!(
            fleetlet_crds::naming::node_devices([&before.metadata])
                .get("pi-1")
                .map(|d| d.to_string()),
            Some("pi-1".to_owned())
        );
        assert_eq!(before.metadata.uid.as_deref(), Some("u1"));
        // ...the rest is gone, and a status-only write is no change worth a pass.
        assert!(before.metadata.annotations.is_none());
        assert_eq!(before.metadata.labels.as_ref().map(BTreeMap::len), Some(1));
        assert_eq!(
            fleetlet_plumbing::fingerprint(&before),
            fleetlet_plumbing::fingerprint(&after)
        );
        let mut relabelled = node("True", "3");
        if let Some(l) = relabelled.metadata.labels.as_mut() {
            l.insert(DEVICE_LABEL.to_owned(), "pi-2".to_owned());
        }
        let relabelled = stored(relabelled);
        assert_ne!(
            fleetlet_plumbing::fingerprint(&before),
            fleetlet_plumbing::fingerprint(&relabelled)
        );
    }

    struct Fake(Vec<ConfigMap>);
    impl Lookup for Fake {
        fn config_map(&self, _ns: &str, name: &str) -> Option<ConfigMap> {
            self.0
                .iter()
                .find(|c| c.metadata.name.as_deref() == Some(name))
                .cloned()
        }
        fn secret(&self, _: &str, _: &str) -> Option<Secret> {
            None
        }
    }

    /// Seals by marking the bytes: enough to see what was sealed and that plaintext is not.
    struct TestSeal;
    impl Seal for TestSeal {
        fn seal(&self, bytes: &[u8]) -> Result<String, Refusal> {
            Ok(format!("sealed:{}", bytes.len()))
        }
    }

    fn pod(spec: PodSpec) -> Pod {
        Pod {
            metadata: kube::api::ObjectMeta {
                name: Some("web-1".into()),
                namespace: Some("shop".into()),
                uid: Some("u1".into()),
                ..Default::default()
            },
            spec: Some(spec),
            status: None,
        }
    }

    fn web() -> Container {
        Container {
            name: "web".into(),
            image: Some("r/web:1".into()),
            ports: Some(vec![ContainerPort {
                container_port: 8080,
                ..Default::default()
            }]),
            ..Default::default()
        }
    }

    #[test]
    fn quantities() {
        assert_eq!(parse_quantity("128Mi"), Some(134_217_728.0));
        assert_eq!(parse_quantity("500m"), Some(0.5));
        assert_eq!(parse_quantity("2"), Some(2.0));
        assert_eq!(parse_quantity("1G"), Some(1e9));
        assert_eq!(parse_quantity("x"), None);
    }

    #[test]
    fn a_pod_becomes_containers_and_files() {
        let cm = ConfigMap {
            metadata: kube::api::ObjectMeta {
                name: Some("conf".into()),
                ..Default::default()
            },
            data: Some(
                [
                    ("app.toml".to_string(), "a = 1\n".to_string()),
                    ("level".to_string(), "debug".to_string()),
                ]
                .into(),
            ),
            ..Default::default()
        };
        let mut c = web();
        c.env = Some(vec![
            k8s_openapi::api::core::v1::EnvVar {
                name: "LEVEL".into(),
                value_from: Some(EnvVarSource {
                    config_map_key_ref: Some(ConfigMapKeySelector {
                        name: "conf".into(),
                        key: "level".into(),
                        optional: None,
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            },
            k8s_openapi::api::core::v1::EnvVar {
                name: "POD".into(),
                value_from: Some(EnvVarSource {
                    field_ref: Some(k8s_openapi::api::core::v1::ObjectFieldSelector {
                        field_path: "metadata.name".into(),
                        api_version: None,
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            },
        ]);
        c.volume_mounts = Some(vec![
            VolumeMount {
                name: "conf".into(),
                mount_path: "/etc/app".into(),
                ..Default::default()
            },
            VolumeMount {
                name: "scratch".into(),
                mount_path: "/tmp/s".into(),
                ..Default::default()
            },
        ]);
        c.resources = Some(ResourceRequirements {
            limits: Some(
                [
                    ("memory".to_string(), Quantity("64Mi".into())),
                    ("cpu".to_string(), Quantity("250m".into())),
                ]
                .into(),
            ),
            ..Default::default()
        });
        let p = pod(PodSpec {
            containers: vec![c],
            volumes: Some(vec![
                Volume {
                    name: "conf".into(),
                    config_map: Some(ConfigMapVolumeSource {
                        name: "conf".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                Volume {
                    name: "scratch".into(),
                    empty_dir: Some(EmptyDirVolumeSource::default()),
                    ..Default::default()
                },
            ]),
            ..Default::default()
        });
        let rs = translate(&p, &Fake(vec![cm]), &TestSeal).unwrap();
        let tag = pod_tag("shop", "web-1");
        let ids: Vec<String> = rs.iter().map(|r| r.id.to_string()).collect();
        assert_eq!(
            ids,
            vec![
                format!("{tag}-f0"),
                format!("{tag}-f1"),
                format!("{tag}-f2"),
                format!("{tag}-web")
            ]
        );
        assert!(
            rs.iter()
                .all(|r| r.owner.kind == OwnerKind::Pod && r.owner.name == "web-1")
        );
        let ResourceSpec::Container(c) = &rs[3].spec else {
            panic!()
        };
        assert_eq!(
            c.env,
            vec![
                EnvVar {
                    name: "LEVEL".into(),
                    value: "debug".into(),
                    sealed_value: None,
                },
                EnvVar {
                    name: "POD".into(),
                    value: "web-1".into(),
                    sealed_value: None,
                }
            ]
        );
        assert_eq!(
            c.limits,
            Some(ContainerLimits {
                memory_bytes: Some(67_108_864),
                cpu_millis: Some(250)
            })
        );
        assert_eq!(c.ports[0].container_port, 8080);
        assert_eq!(
            c.mounts[0],
            HostPathMount {
                host_path: format!("{POD_ROOT}/shop_web-1/conf"),
                container_path: "/etc/app".into(),
                read_only: true
            }
        );
        assert!(!c.mounts[1].read_only);
        let ResourceSpec::File(f) = &rs[0].spec else {
            panic!()
        };
        assert_eq!(f.path, format!("{POD_ROOT}/shop_web-1/conf/app.toml"));
        for r in &rs {
            r.spec.validate().unwrap();
        }
    }

    #[test]
    fn pods_outside_the_namespaces_the_controller_reads_are_refused_for_good() {
        struct Only(&'static str);
        impl Lookup for Only {
            fn config_map(&self, _: &str, _: &str) -> Option<ConfigMap> {
                None
            }
            fn secret(&self, _: &str, _: &str) -> Option<Secret> {
                None
            }
            fn serves(&self, namespace: &str) -> bool {
                namespace == self.0
            }
        }
        let p = pod(PodSpec {
            containers: vec![web()],
            ..Default::default()
        });
        let r = translate(&p, &Only("apps"), &TestSeal).unwrap_err();
        assert_eq!(r.reason, "NamespaceNotServed");
        assert!(!r.transient);
        assert!(r.message.contains("namespace shop"), "{}", r.message);
        assert!(translate(&p, &Only("shop"), &TestSeal).is_ok());
    }

    #[test]
    fn what_a_device_cannot_do_is_refused_and_missing_config_waits() {
        let mut p = pod(PodSpec {
            containers: vec![web()],
            ..Default::default()
        });
        p.spec.as_mut().unwrap().volumes = Some(vec![Volume {
            name: "data".into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: "d".into(),
                read_only: None,
            }),
            ..Default::default()
        }]);
        let r = translate(&p, &Fake(vec![]), &TestSeal).unwrap_err();
        assert_eq!(r.reason, "PersistentVolumeClaimUnsupported");
        assert!(!r.transient);

        let mut p = pod(PodSpec {
            containers: vec![web()],
            ..Default::default()
        });
        p.spec.as_mut().unwrap().init_containers = Some(vec![web()]);
        assert_eq!(
            translate(&p, &Fake(vec![]), &TestSeal).unwrap_err().reason,
            "InitContainersUnsupported"
        );

        let mut c = web();
        c.liveness_probe = Some(Default::default());
        let p = pod(PodSpec {
            containers: vec![c],
            ..Default::default()
        });
        assert_eq!(
            translate(&p, &Fake(vec![]), &TestSeal).unwrap_err().reason,
            "ProbeUnsupported"
        );

        let p = pod(PodSpec {
            containers: vec![web()],
            volumes: Some(vec![Volume {
                name: "conf".into(),
                config_map: Some(ConfigMapVolumeSource {
                    name: "later".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }]),
            ..Default::default()
        });
        let r = translate(&p, &Fake(vec![]), &TestSeal).unwrap_err();
        assert!(r.transient, "{r:?}");
    }

    #[test]
    fn secrets_travel_sealed_to_the_device_never_in_clear() {
        use k8s_openapi::{
            ByteString,
            api::core::v1::{
                EnvFromSource, SecretEnvSource, SecretKeySelector, SecretVolumeSource,
            },
        };
        struct Secrets(Secret);
        impl Lookup for Secrets {
            fn config_map(&self, _: &str, _: &str) -> Option<ConfigMap> {
                None
            }
            fn secret(&self, _: &str, name: &str) -> Option<Secret> {
                (self.0.metadata.name.as_deref() == Some(name)).then(|| self.0.clone())
            }
        }
        let secret = Secret {
            metadata: kube::api::ObjectMeta {
                name: Some("db".into()),
                ..Default::default()
            },
            data: Some([("password".to_string(), ByteString(b"hunter2".to_vec()))].into()),
            ..Default::default()
        };
        let mut c = web();
        c.volume_mounts = Some(vec![VolumeMount {
            name: "creds".into(),
            mount_path: "/creds".into(),
            ..Default::default()
        }]);
        c.env = Some(vec![k8s_openapi::api::core::v1::EnvVar {
            name: "DB_PASSWORD".into(),
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: "db".into(),
                    key: "password".into(),
                    optional: None,
                }),
                ..Default::default()
            }),
            ..Default::default()
        }]);
        c.env_from = Some(vec![EnvFromSource {
            secret_ref: Some(SecretEnvSource {
                name: "db".into(),
                optional: None,
            }),
            prefix: Some("ALL_".into()),
            ..Default::default()
        }]);
        let p = pod(PodSpec {
            containers: vec![c],
            volumes: Some(vec![Volume {
                name: "creds".into(),
                secret: Some(SecretVolumeSource {
                    secret_name: Some("db".into()),
                    ..Default::default()
                }),
                ..Default::default()
            }]),
            ..Default::default()
        });
        let rs = translate(&p, &Secrets(secret.clone()), &TestSeal).unwrap();
        let wire = serde_json::to_string(&rs).unwrap();
        assert!(!wire.contains("hunter2"), "{wire}");
        let file = rs
            .iter()
            .find_map(|r| match &r.spec {
                ResourceSpec::File(f) if f.path.ends_with("/creds/password") => Some(f),
                _ => None,
            })
            .unwrap();
        assert_eq!(file.content, FileContent::Sealed("sealed:7".into()));
        assert_eq!(file.mode, Some(0o600));
        let ResourceSpec::Container(spec) = &rs.last().unwrap().spec else {
            panic!("{rs:?}")
        };
        for name in ["DB_PASSWORD", "ALL_password"] {
            let var = spec.env.iter().find(|e| e.name == name).unwrap();
            assert_eq!(var.value, "");
            assert_eq!(var.sealed_value.as_deref(), Some("sealed:7"));
        }

        // A device whose key is not known yet: the pod waits, nothing goes out in clear.
        struct NoKeyYet;
        impl Seal for NoKeyYet {
            fn seal(&self, _: &[u8]) -> Result<String, Refusal> {
                Err(wait("DeviceKeyUnknown", "no key"))
            }
        }
        let r = translate(&p, &Secrets(secret), &NoKeyYet).unwrap_err();
        assert_eq!(r.reason, "DeviceKeyUnknown");
        assert!(r.transient);
    }

    /// A `projected` volume with a serviceAccountToken source, as the apiserver injects.
    fn projected_token(name: &str) -> Volume {
        use k8s_openapi::api::core::v1::{
            ProjectedVolumeSource, ServiceAccountTokenProjection, VolumeProjection,
        };
        Volume {
            name: name.into(),
            projected: Some(ProjectedVolumeSource {
                default_mode: Some(0o644),
                sources: Some(vec![VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        path: "token".into(),
                        expiration_seconds: Some(3607),
                        audience: None,
                    }),
                    ..Default::default()
                }]),
            }),
            ..Default::default()
        }
    }

    const SA_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

    #[test]
    fn the_injected_service_account_token_volume_is_left_out_and_others_refused() {
        let mut c = web();
        c.volume_mounts = Some(vec![VolumeMount {
            name: "kube-api-access-x7k2p".into(),
            mount_path: SA_PATH.into(),
            read_only: Some(true),
            ..Default::default()
        }]);
        let p = pod(PodSpec {
            containers: vec![c.clone()],
            volumes: Some(vec![projected_token("kube-api-access-x7k2p")]),
            ..Default::default()
        });
        let rs = translate(&p, &Fake(vec![]), &TestSeal).unwrap();
        assert_eq!(rs.len(), 1, "{rs:?}");
        let ResourceSpec::Container(spec) = &rs[0].spec else {
            panic!("{rs:?}")
        };
        assert_eq!(spec.image, "r/web:1");
        assert!(
            spec.mounts.iter().all(|m| m.container_path != SA_PATH),
            "{:?}",
            spec.mounts
        );
        assert!(spec.mounts.is_empty(), "{:?}", spec.mounts);
        assert!(
            !rs.iter().any(|r| matches!(&r.spec, ResourceSpec::File(f)
                if f.path.contains("serviceaccount") || f.path.contains("kube-api-access"))),
            "{rs:?}"
        );

        // Any other projected volume is refused.
        c.volume_mounts.as_mut().unwrap()[0].name = "creds".into();
        let p = pod(PodSpec {
            containers: vec![c],
            volumes: Some(vec![projected_token("creds")]),
            ..Default::default()
        });
        let r = translate(&p, &Fake(vec![]), &TestSeal).unwrap_err();
        assert_eq!(r.reason, "VolumeTypeUnsupported");
        assert!(!r.transient);
        assert!(r.message.contains("creds"), "{}", r.message);
    }

    #[test]
    fn unsupported_pod_and_container_settings_are_refused_for_good() {
        use k8s_openapi::api::core::v1::{PodSecurityContext, SecurityContext};
        let scratch = || {
            vec![Volume {
                name: "scratch".into(),
                empty_dir: Some(EmptyDirVolumeSource::default()),
                ..Default::default()
            }]
        };
        let with_container = |f: &dyn Fn(&mut Container)| {
            let mut c = web();
            f(&mut c);
            pod(PodSpec {
                containers: vec![c],
                volumes: Some(scratch()),
                ..Default::default()
            })
        };
        let with_spec = |f: &dyn Fn(&mut PodSpec)| {
            let mut spec = PodSpec {
                containers: vec![web()],
                volumes: Some(scratch()),
                ..Default::default()
            };
            f(&mut spec);
            pod(spec)
        };
        let mount = |f: &dyn Fn(&mut VolumeMount)| {
            with_container(&|c: &mut Container| {
                let mut m = VolumeMount {
                    name: "scratch".into(),
                    mount_path: "/data".into(),
                    ..Default::default()
                };
                f(&mut m);
                c.volume_mounts = Some(vec![m]);
            })
        };
        let cases: Vec<(&str, Pod, &str, &str)> = vec![
            (
                "hostNetwork",
                with_spec(&|s: &mut PodSpec| s.host_network = Some(true)),
                "HostNetworkUnsupported",
                "hostNetwork",
            ),
            (
                "privileged",
                with_container(&|c: &mut Container| {
                    c.security_context = Some(SecurityContext {
                        privileged: Some(true),
                        ..Default::default()
                    })
                }),
                "PrivilegedUnsupported",
                "privileged",
            ),
            (
                "container runAsUser",
                with_container(&|c: &mut Container| {
                    c.security_context = Some(SecurityContext {
                        run_as_user: Some(1000),
                        ..Default::default()
                    })
                }),
                "RunAsUserUnsupported",
                "runAsUser",
            ),
            (
                "pod runAsUser",
                with_spec(&|s: &mut PodSpec| {
                    s.security_context = Some(PodSecurityContext {
                        run_as_user: Some(1000),
                        ..Default::default()
                    })
                }),
                "RunAsUserUnsupported",
                "spec.securityContext.runAsUser",
            ),
            (
                "pod runAsGroup",
                with_spec(&|s: &mut PodSpec| {
                    s.security_context = Some(PodSecurityContext {
                        run_as_group: Some(1000),
                        ..Default::default()
                    })
                }),
                "RunAsUserUnsupported",
                "spec.securityContext.runAsGroup",
            ),
            (
                "workingDir",
                with_container(&|c: &mut Container| c.working_dir = Some("/srv".into())),
                "WorkingDirUnsupported",
                "workingDir",
            ),
            (
                "subPath",
                mount(&|m: &mut VolumeMount| m.sub_path = Some("a".into())),
                "SubPathUnsupported",
                "subPath",
            ),
            (
                "subPathExpr",
                mount(&|m: &mut VolumeMount| m.sub_path_expr = Some("$(POD_NAME)".into())),
                "SubPathUnsupported",
                "subPathExpr",
            ),
        ];
        for (what, p, reason, field) in cases {
            let r = translate(&p, &Fake(vec![]), &TestSeal).unwrap_err();
            assert_eq!(r.reason, reason, "{what}: {r:?}");
            assert!(!r.transient, "{what}: {r:?}");
            assert!(r.message.contains(field), "{what}: {}", r.message);
        }

        // The same pods without the setting run: the refusals come from the setting alone.
        assert!(translate(&with_spec(&|_| {}), &Fake(vec![]), &TestSeal).is_ok());
        assert!(translate(&mount(&|_| {}), &Fake(vec![]), &TestSeal).is_ok());
        // An empty pod-level securityContext is fine.
        let p = with_spec(&|s: &mut PodSpec| s.security_context = Some(Default::default()));
        assert!(translate(&p, &Fake(vec![]), &TestSeal).is_ok());
    }

    #[test]
    fn ids_are_dns_labels_even_for_long_names() {
        let long = "c".repeat(60);
        let id = container_id(
            "a-very-long-namespace-name",
            "and-a-long-pod-name-too",
            3,
            &long,
        )
        .unwrap();
        assert!(id.as_str().len() <= 63, "{id}");
        assert!(id.as_str().ends_with("-c3"));
    }
}
