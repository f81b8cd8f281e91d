//! The CRI configs the kubelet sends for a pod: every mapping from the
//! manifest to the wire lives here.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, Hasher};
use std::path::{Path, PathBuf};

use anyhow::Context;
use wasmlet_proto::cri;

use super::manifest::{Container, Pod};

/// Labels the kubelet puts on every sandbox and container.
pub const POD_NAME_LABEL: &str = "io.kubernetes.pod.name";
pub const POD_NAMESPACE_LABEL: &str = "io.kubernetes.pod.namespace";
pub const POD_UID_LABEL: &str = "io.kubernetes.pod.uid";
/// The label the kubelet puts on every container.
pub const CONTAINER_NAME_LABEL: &str = "io.kubernetes.container.name";
/// Annotations the kubelet puts on every container.
const RESTART_COUNT_ANNOTATION: &str = "io.kubernetes.container.restartCount";
const GRACE_PERIOD_ANNOTATION: &str = "io.kubernetes.pod.terminationGracePeriod";
/// The container's declared ports, as JSON.
const PORTS_ANNOTATION: &str = "io.kubernetes.container.ports";

/// A pod as this run knows it: the manifest and the uid the API server
/// would have given it.
#[derive(Debug)]
pub struct PodIdentity<'a> {
    pub pod: &'a Pod,
    pub uid: &'a str,
}

impl PodIdentity<'_> {
    /// The kubelet's log directory name for the pod: `<ns>_<name>_<uid>`.
    pub fn log_directory_name(&self) -> String {
        format!("{}_{}_{}", self.pod.namespace, self.pod.name, self.uid)
    }

    fn pod_labels(&self) -> HashMap<String, String> {
        HashMap::from([
            (POD_NAME_LABEL.to_owned(), self.pod.name.clone()),
            (POD_NAMESPACE_LABEL.to_owned(), self.pod.namespace.clone()),
            (POD_UID_LABEL.to_owned(), self.uid.to_owned()),
        ])
    }

    /// `RunPodSandbox`'s config: the manifest's labels with the kubelet's,
    /// its annotations, and the hostname set to the pod name.
    pub fn sandbox_config(&self, log_directory: &Path) -> cri::PodSandboxConfig {
        let mut labels: HashMap<String, String> = self
            .pod
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        labels.extend(self.pod_labels());
        cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: self.pod.name.clone(),
                uid: self.uid.to_owned(),
                namespace: self.pod.namespace.clone(),
                attempt: 0,
            }),
            hostname: self.pod.name.clone(),
            log_directory: log_directory.to_string_lossy().into_owned(),
            labels,
            annotations: self
                .pod
                .annotations
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            // Every declared port, as the kubelet lists them; the CNI
            // portmap plugin maps those with a hostPort.
            port_mappings: self
                .pod
                .spec
                .containers
                .iter()
                .flat_map(|c| &c.ports)
                .map(|p| cri::PortMapping {
                    protocol: match p.protocol.to_ascii_uppercase().as_str() {
                        "UDP" => cri::Protocol::Udp,
                        "SCTP" => cri::Protocol::Sctp,
                        _ => cri::Protocol::Tcp,
                    } as i32,
                    container_port: i32::from(p.container_port),
                    host_port: i32::from(p.host_port),
                    host_ip: String::new(),
                })
                .collect(),
            linux: Some(cri::LinuxPodSandboxConfig::default()),
            ..Default::default()
        }
    }

    /// `CreateContainer`'s config for run `attempt` (0 first) of
    /// `container`, whose image `PullImage` answered as `image_ref`.
    pub fn container_config(
        &self,
        container: &Container,
        attempt: u32,
        image_ref: &str,
        volumes: &BTreeMap<String, PathBuf>,
    ) -> anyhow::Result<cri::ContainerConfig> {
        let (command, args) = container.command_and_args();
        let mut labels = self.pod_labels();
        labels.insert(CONTAINER_NAME_LABEL.to_owned(), container.name.clone());
        let mut annotations = HashMap::from([
            (RESTART_COUNT_ANNOTATION.to_owned(), attempt.to_string()),
            (
                GRACE_PERIOD_ANNOTATION.to_owned(),
                self.pod.spec.grace_period_seconds().to_string(),
            ),
        ]);
        if !container.ports.is_empty() {
            let ports: Vec<serde_json::Value> = container
                .ports
                .iter()
                .map(|p| {
                    let mut port = serde_json::json!({
                        "containerPort": p.container_port,
                        "protocol": p.protocol.to_ascii_uppercase(),
                    });
                    if !p.name.is_empty() {
                        port["name"] = p.name.clone().into();
                    }
                    if p.host_port != 0 {
                        port["hostPort"] = p.host_port.into();
                    }
                    port
                })
                .collect();
            annotations.insert(
                PORTS_ANNOTATION.to_owned(),
                serde_json::Value::from(ports).to_string(),
            );
        }
        Ok(cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: container.name.clone(),
                attempt,
            }),
            image: Some(cri::ImageSpec {
                image: image_ref.to_owned(),
                user_specified_image: container.image.clone(),
                ..Default::default()
            }),
            command,
            args,
            working_dir: container.working_dir.clone().unwrap_or_default(),
            envs: container
                .env()
                .into_iter()
                .map(|(key, value)| cri::KeyValue {
                    key,
                    value: value.into_bytes(),
                })
                .collect(),
            mounts: mounts(container, volumes)?,
            labels,
            annotations,
            log_path: container_log_path(&container.name, attempt),
            linux: Some(cri::LinuxContainerConfig {
                resources: Some(linux_resources(&container.resources)?),
                ..Default::default()
            }),
            ..Default::default()
        })
    }
}

/// The CFS period the kubelet sets, in microseconds.
const CPU_PERIOD_US: i64 = 100_000;

/// `resources` as the kubelet turns them into Linux resources: the memory
/// limit in bytes, the CPU limit as a CFS quota over a 100 ms period, the
/// CPU request as shares (1024 per CPU, at least 2).
fn linux_resources(
    resources: &super::manifest::ResourceRequirements,
) -> anyhow::Result<cri::LinuxContainerResources> {
    let read = |map: &std::collections::BTreeMap<String, serde_yaml_ng::Value>,
                name: &str,
                scale: u64|
     -> anyhow::Result<Option<u64>> {
        match map.get(name) {
            None => Ok(None),
            Some(value) => super::manifest::quantity(value, scale)
                .map(Some)
                .ok_or_else(|| anyhow::anyhow!("resources: {name} {value:?} is not a quantity")),
        }
    };
    let mut out = cri::LinuxContainerResources::default();
    if let Some(bytes) = read(&resources.limits, "memory", 1)? {
        out.memory_limit_in_bytes = i64::try_from(bytes).unwrap_or(i64::MAX);
    }
    if let Some(millis) = read(&resources.limits, "cpu", 1000)? {
        out.cpu_period = CPU_PERIOD_US;
        out.cpu_quota = (i64::try_from(millis).unwrap_or(i64::MAX / CPU_PERIOD_US) * CPU_PERIOD_US
            / 1000)
            .max(1000);
    }
    let request = read(&resources.requests, "cpu", 1000)?.or(read(&resources.limits, "cpu", 1000)?);
    if let Some(millis) = request {
        out.cpu_shares = i64::try_from(millis * 1024 / 1000)
            .unwrap_or(i64::MAX)
            .max(2);
    }
    Ok(out)
}

/// The container's log file relative to the pod's log directory.
pub fn container_log_path(container: &str, attempt: u32) -> String {
    format!("{container}/{attempt}.log")
}

/// The container's volume mounts, each on the host path its volume resolved to.
fn mounts(
    container: &Container,
    volumes: &BTreeMap<String, PathBuf>,
) -> anyhow::Result<Vec<cri::Mount>> {
    container
        .volume_mounts
        .iter()
        .map(|m| {
            let host = volumes.get(&m.name).with_context(|| {
                format!(
                    "container {:?}: volume {:?} was not prepared",
                    container.name, m.name
                )
            })?;
            Ok(cri::Mount {
                container_path: m.mount_path.clone(),
                host_path: host.to_string_lossy().into_owned(),
                readonly: m.read_only,
                propagation: cri::MountPropagation::PropagationPrivate as i32,
                ..Default::default()
            })
        })
        .collect()
}

/// A random UUID (version 4), standing in for the uid the API server
/// gives every pod.
pub fn new_uid() -> String {
    let mut bytes = [0u8; 16];
    for (i, chunk) in bytes.chunks_mut(8).enumerate() {
        // Every RandomState is keyed differently, from the OS's randomness.
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_usize(i);
        hasher.write_u32(std::process::id());
        hasher.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos(),
        );
        chunk.copy_from_slice(&hasher.finish().to_le_bytes());
    }
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod() -> Pod {
        Pod::parse(
            "
kind: Pod
metadata: {name: web, namespace: team, labels: {app: web}, annotations: {a: b}}
spec:
  runtimeClassName: wasm
  containers:
    - name: main
      image: example.com/web:v1
      args: ['$(WHO)']
      env: [{name: WHO, value: me}]
      volumeMounts: [{name: data, mountPath: /data, readOnly: true}]
      ports: [{name: http, containerPort: 8080}, {containerPort: 53, hostPort: 5353, protocol: UDP}]
      resources: {limits: {memory: 64Mi, cpu: 500m}, requests: {cpu: '0.25'}}
  volumes: [{name: data, emptyDir: {}}]
",
        )
        .unwrap()
    }

    #[test]
    fn sandbox_config_is_the_kubelets() {
        let pod = pod();
        let id = PodIdentity {
            pod: &pod,
            uid: "u-1",
        };
        assert_eq!(id.log_directory_name(), "team_web_u-1");
        let config = id.sandbox_config(Path::new("/logs/team_web_u-1"));
        let meta = config.metadata.unwrap();
        assert_eq!(
            (
                meta.name.as_str(),
                meta.namespace.as_str(),
                meta.uid.as_str(),
                meta.attempt
            ),
            ("web", "team", "u-1", 0)
        );
        assert_eq!(config.hostname, "web");
        assert_eq!(config.log_directory, "/logs/team_web_u-1");
        assert_eq!(config.labels["app"], "web");
        assert_eq!(config.labels[POD_UID_LABEL], "u-1");
        assert_eq!(config.annotations["a"], "b");
        let ports: Vec<(i32, i32, i32)> = config
            .port_mappings
            .iter()
            .map(|p| (p.protocol, p.container_port, p.host_port))
            .collect();
        assert_eq!(
            ports,
            [
                (cri::Protocol::Tcp as i32, 8080, 0),
                (cri::Protocol::Udp as i32, 53, 5353)
            ]
        );
    }

    #[test]
    fn container_config_is_the_kubelets() {
        let pod = pod();
        let id = PodIdentity {
            pod: &pod,
            uid: "u-1",
        };
        let volumes = BTreeMap::from([("data".to_owned(), PathBuf::from("/tmp/d"))]);
        let config = id
            .container_config(&pod.spec.containers[0], 2, "sha256:abc", &volumes)
            .unwrap();
        assert_eq!(config.metadata.unwrap().attempt, 2);
        let image = config.image.unwrap();
        assert_eq!(
            (image.image.as_str(), image.user_specified_image.as_str()),
            ("sha256:abc", "example.com/web:v1")
        );
        assert_eq!(config.args, ["me"]);
        assert_eq!(config.envs[0].key, "WHO");
        assert_eq!(config.mounts[0].host_path, "/tmp/d");
        assert_eq!(config.mounts[0].container_path, "/data");
        assert!(config.mounts[0].readonly);
        assert_eq!(config.log_path, "main/2.log");
        assert_eq!(config.labels[CONTAINER_NAME_LABEL], "main");
        assert_eq!(config.labels[POD_NAME_LABEL], "web");
        assert_eq!(config.annotations[RESTART_COUNT_ANNOTATION], "2");
        let ports: serde_json::Value =
            serde_json::from_str(&config.annotations[PORTS_ANNOTATION]).unwrap();
        assert_eq!(
            ports,
            serde_json::json!([
                {"name": "http", "containerPort": 8080, "protocol": "TCP"},
                {"containerPort": 53, "hostPort": 5353, "protocol": "UDP"}
            ])
        );
        let resources = config.linux.unwrap().resources.unwrap();
        assert_eq!(resources.memory_limit_in_bytes, 64 * 1024 * 1024);
        assert_eq!(
            (resources.cpu_quota, resources.cpu_period),
            (50_000, 100_000)
        );
        assert_eq!(resources.cpu_shares, 256);
        assert!(
            id.container_config(&pod.spec.containers[0], 0, "x", &BTreeMap::new())
                .is_err()
        );
    }

    #[test]
    fn quantities_read_as_the_kubelet_reads_them() {
        use crate::play::manifest::quantity;
        let q = |s: &str, scale| quantity(&serde_yaml_ng::Value::String(s.into()), scale);
        assert_eq!(q("64Mi", 1), Some(64 * 1024 * 1024));
        assert_eq!(q("1G", 1), Some(1_000_000_000));
        assert_eq!(q("500m", 1000), Some(500));
        assert_eq!(q("2", 1000), Some(2000));
        assert_eq!(q("0.1", 1000), Some(100));
        assert_eq!(q("0.0001", 1000), Some(1), "rounded up");
        assert_eq!(q("1e3", 1), Some(1000));
        assert_eq!(q("1.5Gi", 1), Some(1536 * 1024 * 1024));
        assert_eq!(q("1e30", 1), Some(u64::MAX), "saturated");
        assert_eq!(q("lots", 1), None);
        assert_eq!(q("-1", 1), None);
        assert_eq!(q("", 1), None);
        assert_eq!(q(".", 1), None);
        let number = serde_yaml_ng::Value::Number(3.into());
        assert_eq!(quantity(&number, 1), Some(3));
    }

    #[test]
    fn uids_are_uuid_shaped_and_differ() {
        let (a, b) = (new_uid(), new_uid());
        assert_ne!(a, b);
        let groups: Vec<usize> = a.split('-').map(str::len).collect();
        assert_eq!(groups, [8, 4, 4, 4, 12]);
        assert_eq!(&a[14..15], "4");
    }
}
