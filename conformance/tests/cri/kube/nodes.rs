//! Two nodes under one API server, each a kubelet in front of a wasmlet of
//! its own (root, socket, streaming port, CNI bridge and /24, kubelet root,
//! port and `cgroupRoot`), no kube-proxy. In order, on one cluster:
//!
//! 1. a Deployment spread over both nodes by a topology spread constraint
//!    is Ready with half its replicas on each;
//! 2. the kubelet of node `a` garbage-collects images through wasmlet: its
//!    root is a tmpfs of its own (the image filesystem the kubelet's
//!    cAdvisor sizes through ImageFsInfo's mountpoint), and once the test
//!    fills it past the `imagefs.available` eviction threshold the
//!    kubelet's eviction manager reclaims it by deleting every image no
//!    container uses (RemoveImage), which relieves the pressure before any
//!    pod is evicted; the image the replicas run stays, and node `b`
//!    keeps all its images;
//! 3. node `b`'s wasmlet is killed (SIGKILL) and, 5 s later, served
//!    again: its sandboxes survive (same pod IPs), its running containers were exited
//!    (255) and the kubelet restarts them in place, until all replicas are
//!    Ready again;
//! 4. `kubectl drain` of node `a` evicts its replicas, which come back on
//!    node `b`, and wasmlet on `a` keeps nothing of them running.
//!
//! The cluster is then torn down and the test fails if anything of it is
//! left on the host, for either node.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use wasmlet_conformance::cri;
use wasmlet_conformance::fixtures::cluster::{
    Cluster, ClusterOptions, NodeOptions, RUNTIME_CLASS, kube_or_skip,
};

use super::{Outcome, Runtime, container_status, timed};
use crate::SLEEPER_P1;

/// Replicas of the spread Deployment: two per node.
const REPLICAS: usize = 4;
/// How long the replicas may take to be Ready (scheduled, started).
const READY_TIMEOUT: Duration = Duration::from_secs(90);
/// How big node `a`'s tmpfs root is (MiB): room for the samples and the
/// state.
const IMAGE_FS_MIB: u64 = 64;
/// Node `a`'s eviction threshold on its image filesystem's free space.
const IMAGE_FS_RESERVE_MIB: u64 = 16;
/// How long the kubelet may take to see the image filesystem short (its
/// eviction manager looks every 10 s), delete the unused images and
/// publish the node's new image list (every 10 s, from a cache refreshed
/// every 30 s).
const IMAGE_GC_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the replicas may take to be Ready again after their runtime
/// came back (the kubelet's relist, its back-off after the failed calls).
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(120);
/// How long node `b`'s wasmlet stays down: long enough for its kubelet's
/// calls (relist, status) to fail meanwhile.
const RUNTIME_DOWN: Duration = Duration::from_secs(5);
/// How long `kubectl drain` may wait for the evicted pods to go.
const DRAIN_TIMEOUT_ARG: &str = "--timeout=25s";

/// The cluster and the nodes' runtimes, in the cluster's node order.
/// Fields drop in order: the kubelets before the runtimes they talk to.
struct Nodes {
    cluster: Cluster,
    runtimes: Vec<Runtime>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_two_nodes_spread_image_gc_restart_and_drain() {
    let Some(binaries) =
        kube_or_skip("kube::nodes::kube_two_nodes_spread_image_gc_restart_and_drain")
    else {
        return;
    };
    let started = Instant::now();
    let a = Runtime::start("info", "", |b| b.root_on_tmpfs(&format!("{IMAGE_FS_MIB}m"))).await;
    let b = Runtime::start("info", "", |b| b).await;
    let options = ClusterOptions::with_nodes(vec![
        NodeOptions::new(a.wasmlet.socket())
            // Only this signal: the machine's own disk and memory must not
            // make this node evict anything.
            .kubelet_config(
                "evictionHard",
                json!({"imagefs.available": format!("{IMAGE_FS_RESERVE_MIB}Mi")}),
            )
            .kubelet_config("evictionPressureTransitionPeriod", json!("5s"))
            .kubelet_config("imageMinimumGCAge", json!("1s")),
        NodeOptions::new(b.wasmlet.socket()),
    ]);
    let cluster = Cluster::start(&binaries, options)
        .await
        .unwrap_or_else(|e| panic!("starting the cluster: {e}"));
    let mut nodes = Nodes {
        cluster,
        runtimes: vec![a, b],
    };
    eprintln!("kube nodes: two nodes Ready in {:?}", started.elapsed());

    let ns = "spread";
    let mut outcome = timed("spread over two nodes", spread(&nodes, ns)).await;
    if outcome.is_ok() {
        outcome = timed("image garbage collection", image_gc(&nodes, ns)).await;
    }
    if outcome.is_ok() {
        outcome = timed(
            "runtime killed and restarted",
            runtime_restart(&mut nodes, ns),
        )
        .await;
    }
    if outcome.is_ok() {
        outcome = timed("drain", drain(&nodes, ns)).await;
    }
    // Panicking while the nodes are up prints every component's log.
    if let Err(e) = outcome {
        panic!("{e}");
    }

    let teardown = Instant::now();
    let leftovers = nodes.cluster.teardown();
    assert!(
        leftovers.is_empty(),
        "the cluster left behind:\n  {}",
        leftovers.join("\n  ")
    );
    let tmpfs_root = nodes.runtimes[0].wasmlet.root();
    drop(nodes);
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let root = tmpfs_root.to_string_lossy();
    assert!(
        !mounts.lines().any(|l| l.split(' ').nth(4) == Some(&*root)),
        "node a's tmpfs root {root} is still mounted"
    );
    eprintln!(
        "kube nodes: torn down in {:?}; {:?} in all",
        teardown.elapsed(),
        started.elapsed()
    );
}

/// The replicas of the Deployment `spread` in `ns`, as the API has them.
async fn replicas(cluster: &Cluster, ns: &str) -> Result<Vec<Value>, String> {
    let pods = cluster
        .get_json(&["get", "pods", "-n", ns, "-l", "app=spread"])
        .await
        .map_err(|e| e.to_string())?;
    Ok(pods["items"].as_array().cloned().unwrap_or_default())
}

fn pod_ready(pod: &Value) -> bool {
    pod["metadata"]["deletionTimestamp"].is_null()
        && pod["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
}

fn node_of(pod: &Value) -> &str {
    pod["spec"]["nodeName"].as_str().unwrap_or_default()
}

fn name_of(pod: &Value) -> &str {
    pod["metadata"]["name"].as_str().unwrap_or_default()
}

/// How many Ready replicas each node runs.
fn ready_per_node(pods: &[Value]) -> BTreeMap<String, usize> {
    let mut per_node = BTreeMap::new();
    for pod in pods.iter().filter(|p| pod_ready(p)) {
        *per_node.entry(node_of(pod).to_owned()).or_insert(0) += 1;
    }
    per_node
}

/// One line per replica, for failure messages.
fn describe(pods: &[Value]) -> String {
    pods.iter()
        .map(|p| {
            format!(
                "  {} on {:?}: phase {}, ready {}, container {}\n",
                name_of(p),
                node_of(p),
                p["status"]["phase"],
                pod_ready(p),
                container_status(p)
            )
        })
        .collect()
}

/// Polls the replicas until `done` holds for them, at most `timeout`; the
/// replicas as last seen.
async fn wait_replicas(
    nodes: &Nodes,
    ns: &str,
    waiting_for: &str,
    timeout: Duration,
    done: impl Fn(&[Value]) -> bool,
) -> Result<Vec<Value>, String> {
    let deadline = Instant::now() + timeout;
    loop {
        let pods = replicas(&nodes.cluster, ns).await?;
        if done(&pods) {
            return Ok(pods);
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "the replicas were not {waiting_for} within {timeout:?}:\n{}events in {ns}:\n{}",
                describe(&pods),
                nodes.cluster.events(ns).await
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A Deployment whose replicas a topology spread constraint keeps even
/// over the nodes (`maxSkew: 1` on `kubernetes.io/hostname`,
/// `DoNotSchedule`) is Ready with half on each. `nodeTaintsPolicy: Honor`
/// leaves a cordoned (tainted) node out of the count, so that a drain can
/// move every replica to the other node.
async fn spread(nodes: &Nodes, ns: &str) -> Outcome {
    let cluster = &nodes.cluster;
    let deployment = json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "spread", "namespace": ns},
        "spec": {
            "replicas": REPLICAS,
            "selector": {"matchLabels": {"app": "spread"}},
            "template": {
                "metadata": {"labels": {"app": "spread"}},
                "spec": {
                    "runtimeClassName": RUNTIME_CLASS,
                    "terminationGracePeriodSeconds": 2,
                    "topologySpreadConstraints": [{
                        "maxSkew": 1,
                        "topologyKey": "kubernetes.io/hostname",
                        "whenUnsatisfiable": "DoNotSchedule",
                        "nodeTaintsPolicy": "Honor",
                        "labelSelector": {"matchLabels": {"app": "spread"}},
                    }],
                    "containers": [{
                        "name": "sleeper",
                        "image": SLEEPER_P1,
                        "imagePullPolicy": "Never",
                    }],
                },
            },
        },
    });
    super::create(cluster, ns, &deployment.to_string()).await?;
    let names: Vec<String> = cluster
        .nodes()
        .iter()
        .map(|n| n.name().to_owned())
        .collect();
    let pods = wait_replicas(nodes, ns, "Ready, two per node", READY_TIMEOUT, |pods| {
        let per_node = ready_per_node(pods);
        pods.len() == REPLICAS
            && names
                .iter()
                .all(|n| per_node.get(n) == Some(&(REPLICAS / 2)))
    })
    .await?;
    // Each node's wasmlet runs its own replicas, with addresses from its
    // own network.
    for (node, runtime) in cluster.nodes().iter().zip(&nodes.runtimes) {
        for pod in pods.iter().filter(|p| node_of(p) == node.name()) {
            let ip = pod["status"]["podIP"].as_str().unwrap_or_default();
            if !runtime.net.contains(ip) {
                return Err(format!(
                    "{} on {} has address {ip:?}, not one of its node's network {}.0/24",
                    name_of(pod),
                    node.name(),
                    runtime.net.prefix
                ));
            }
        }
    }
    Ok(())
}

/// The images wasmlet holds, each by its tags.
async fn images_of(runtime: &Runtime) -> Result<Vec<cri::Image>, String> {
    runtime
        .wasmlet
        .cri()
        .list_images(None)
        .await
        .map_err(|e| e.to_string())
}

/// The image names a node's `status.images` lists.
async fn node_images(cluster: &Cluster, node: &str) -> Result<Vec<String>, String> {
    let json = cluster
        .get_json(&["get", "node", node])
        .await
        .map_err(|e| e.to_string())?;
    Ok(json["status"]["images"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|i| i["names"].as_array().cloned().unwrap_or_default())
        .filter_map(|n| n.as_str().map(str::to_owned))
        .collect())
}

/// Bytes free on the filesystem holding `path`, as `statvfs` (and so
/// cAdvisor) counts them.
fn available_bytes(path: &std::path::Path) -> Result<u64, String> {
    let stat = nix::sys::statvfs::statvfs(path).map_err(|e| format!("statvfs {path:?}: {e}"))?;
    Ok(stat.blocks_available() as u64 * stat.fragment_size() as u64)
}

/// Node `a`'s image filesystem runs short: its kubelet deletes, through
/// wasmlet's RemoveImage, every image no container uses, which frees
/// enough for no pod to be evicted. Node `a`'s `status.images` follows;
/// the replicas' image stays; node `b` keeps every image.
async fn image_gc(nodes: &Nodes, ns: &str) -> Outcome {
    let cluster = &nodes.cluster;
    let (node_a, node_b) = (&cluster.nodes()[0], &cluster.nodes()[1]);
    let (a, b) = (&nodes.runtimes[0], &nodes.runtimes[1]);
    let before = replicas(cluster, ns).await?;
    let images = images_of(a).await?;
    let in_use = |image: &cri::Image| image.repo_tags.iter().any(|t| t == SLEEPER_P1);
    let unused: Vec<&cri::Image> = images.iter().filter(|i| !in_use(i)).collect();
    let unused_tags: Vec<String> = unused.iter().flat_map(|i| i.repo_tags.clone()).collect();
    if unused.is_empty() || images.iter().filter(|i| in_use(i)).count() != 1 {
        return Err(format!(
            "node a's wasmlet should hold {SLEEPER_P1} and other images: {images:?}"
        ));
    }
    let listed = node_images(cluster, node_a.name()).await?;
    if !unused_tags.iter().all(|t| listed.contains(t)) {
        return Err(format!(
            "node a's status.images {listed:?} lacks some of wasmlet's images {unused_tags:?}"
        ));
    }
    // What the kubelets see of their image filesystems: wasmlet's
    // ImageFsInfo names the store, cAdvisor sizes the filesystem under it:
    // node a's is its tmpfs, all of it.
    for node in cluster.nodes() {
        let path = format!("/api/v1/nodes/{}/proxy/stats/summary", node.name());
        let summary = cluster
            .kubectl(&["get", "--raw", &path], None)
            .await
            .map_err(|e| e.to_string())?;
        let summary: Value =
            serde_json::from_str(&summary).map_err(|e| format!("{path}: {e}: {summary}"))?;
        let image_fs = &summary["node"]["runtime"]["imageFs"];
        eprintln!(
            "kube nodes: {}'s image filesystem as its kubelet sees it: {image_fs}",
            node.name()
        );
        if node.name() == node_a.name() && image_fs["capacityBytes"] != IMAGE_FS_MIB << 20 {
            return Err(format!(
                "node a's kubelet does not see its {IMAGE_FS_MIB} MiB image filesystem: {image_fs}"
            ));
        }
    }

    // Fill the filesystem to just under the threshold: short by a quarter
    // of what the unused images take, so that deleting them relieves it
    // with room to spare (the state database may grow meanwhile).
    let unused_bytes: u64 = unused.iter().map(|i| i.size).sum();
    let root = a.wasmlet.root();
    let free = available_bytes(&root)?;
    let reserve = IMAGE_FS_RESERVE_MIB << 20;
    let ballast_len = (free + unused_bytes / 4)
        .checked_sub(reserve)
        .ok_or_else(|| format!("only {free} bytes free on node a's image filesystem"))?;
    let ballast = root.join("ballast");
    std::fs::write(&ballast, vec![0u8; ballast_len as usize])
        .map_err(|e| format!("writing {ballast:?}: {e}"))?;
    eprintln!(
        "kube nodes: {free} bytes were free on node a's image filesystem; {ballast_len} written, \
         leaving {} under a reserve of {reserve}; the unused images take {unused_bytes}",
        available_bytes(&root)?
    );
    let started = Instant::now();
    let outcome = async {
        loop {
            let now = images_of(a).await?;
            let left: Vec<&cri::Image> = now.iter().filter(|i| !in_use(i)).collect();
            if left.is_empty() {
                if !now.iter().any(in_use) {
                    return Err(format!(
                        "the kubelet removed {SLEEPER_P1}, which the replicas use: {now:?}"
                    ));
                }
                break;
            }
            if started.elapsed() >= IMAGE_GC_TIMEOUT {
                let log = node_a.kubelet_log();
                let evictions: Vec<&str> = log
                    .lines()
                    .filter(|l| l.contains("eviction") || l.contains("Eviction"))
                    .collect();
                return Err(format!(
                    "{IMAGE_GC_TIMEOUT:?} after the image filesystem ran short, node a's wasmlet \
                     still holds unused images {left:?}; the kubelet's eviction lines:\n{}",
                    evictions[evictions.len().saturating_sub(30)..].join("\n")
                ));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        eprintln!(
            "kube nodes: node a's kubelet removed the unused images {:?} after the filesystem ran short",
            started.elapsed()
        );
        loop {
            let listed = node_images(cluster, node_a.name()).await?;
            if !listed.iter().any(|n| unused_tags.contains(n)) {
                if !listed.iter().any(|n| n == SLEEPER_P1) {
                    return Err(format!(
                        "node a's status.images {listed:?} lacks {SLEEPER_P1}, still in use"
                    ));
                }
                break;
            }
            if started.elapsed() >= IMAGE_GC_TIMEOUT {
                return Err(format!(
                    "{IMAGE_GC_TIMEOUT:?} after the image filesystem ran short, node a's \
                     status.images still lists removed images: {listed:?}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        Ok(())
    }
    .await;
    let _ = std::fs::remove_file(&ballast);
    outcome?;
    eprintln!(
        "kube nodes: node a's status.images followed {:?} after the filesystem ran short",
        started.elapsed()
    );

    // It was the kubelet's doing, through its eviction manager's reclaim,
    // and wasmlet's RemoveImage, once per image.
    let log = node_a.kubelet_log();
    for line in [
        "Attempting to delete unused images",
        "able to reduce resource pressure without evicting pods",
    ] {
        if !log.contains(line) {
            return Err(format!("node a's kubelet never logged {line:?}"));
        }
    }
    let removals = a
        .wasmlet
        .daemon_log()
        .lines()
        .filter(|l| l.contains("method=RemoveImage") && l.contains("answered"))
        .count();
    if removals < unused.len() {
        return Err(format!(
            "node a's wasmlet answered {removals} RemoveImage calls, for {} unused images",
            unused.len()
        ));
    }
    // Node b, whose filesystem did not run short, keeps all its images.
    let b_images = images_of(b).await?;
    let b_tags: Vec<&String> = b_images.iter().flat_map(|i| &i.repo_tags).collect();
    if !unused_tags.iter().all(|t| b_tags.contains(&t)) {
        return Err(format!(
            "node b lost images it was never short of room for: it holds {b_tags:?}"
        ));
    }
    let listed = node_images(cluster, node_b.name()).await?;
    if !unused_tags.iter().all(|t| listed.contains(t)) {
        return Err(format!("node b's status.images {listed:?} lost images"));
    }
    // Reclaiming the images was enough: no replica was evicted.
    let after = replicas(cluster, ns).await?;
    let uids = |pods: &[Value]| -> Vec<String> {
        let mut uids: Vec<String> = pods
            .iter()
            .filter(|p| pod_ready(p))
            .filter_map(|p| p["metadata"]["uid"].as_str().map(str::to_owned))
            .collect();
        uids.sort();
        uids
    };
    if uids(&after) != uids(&before) {
        return Err(format!(
            "replicas changed while node a reclaimed its image filesystem:\nbefore:\n{}after:\n{}",
            describe(&before),
            describe(&after)
        ));
    }
    Ok(())
}

/// Node `b`'s wasmlet is SIGKILLed and, some seconds later, served again
/// on the same root.
/// wasmlet keeps the sandboxes (their network namespaces are re-adopted:
/// same pod IPs) and reports the containers that were running as exited
/// with 255; the kubelet restarts them in place, and every replica is
/// Ready again, node `a`'s untouched.
async fn runtime_restart(nodes: &mut Nodes, ns: &str) -> Outcome {
    let node_b = nodes.cluster.nodes()[1].name().to_owned();
    let before = replicas(&nodes.cluster, ns).await?;
    let ips: BTreeMap<String, String> = before
        .iter()
        .map(|p| {
            (
                name_of(p).to_owned(),
                p["status"]["podIP"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    let killed = Instant::now();
    let wasmlet = &mut nodes.runtimes[1].wasmlet;
    wasmlet.kill_9().await;
    tokio::time::sleep(RUNTIME_DOWN).await;
    wasmlet.restart().await;
    eprintln!(
        "kube nodes: node b's wasmlet killed and serving again in {:?}",
        killed.elapsed()
    );
    let restarted = |pod: &Value| {
        let status = container_status(pod);
        status["restartCount"].as_u64().is_some_and(|n| n >= 1)
            && status["lastState"]["terminated"]["exitCode"] == 255
    };
    let after = wait_replicas(
        nodes,
        ns,
        "all Ready again, node b's restarted after exiting 255",
        RECOVERY_TIMEOUT,
        |pods| {
            pods.len() == REPLICAS
                && pods.iter().all(pod_ready)
                && pods.iter().filter(|p| node_of(p) == node_b).all(restarted)
                && pods.iter().all(|p| ips.contains_key(name_of(p)))
        },
    )
    .await?;
    eprintln!(
        "kube nodes: all replicas Ready {:?} after the kill",
        killed.elapsed()
    );
    for pod in &after {
        let ip = pod["status"]["podIP"].as_str().unwrap_or_default();
        if ips.get(name_of(pod)).map(String::as_str) != Some(ip) {
            return Err(format!(
                "{} changed its address from {:?} to {ip:?}: its sandbox did not survive",
                name_of(pod),
                ips.get(name_of(pod))
            ));
        }
        if node_of(pod) != node_b && container_status(pod)["restartCount"] != 0 {
            return Err(format!(
                "{} on node a was restarted, though its runtime was not: {}",
                name_of(pod),
                container_status(pod)
            ));
        }
    }
    Ok(())
}

/// `kubectl drain` of node `a`: its replicas are evicted and come back on
/// node `b`, all Ready; node `a` is unschedulable and its wasmlet runs
/// nothing of them.
async fn drain(nodes: &Nodes, ns: &str) -> Outcome {
    let cluster = &nodes.cluster;
    let (node_a, node_b) = (cluster.nodes()[0].name(), cluster.nodes()[1].name());
    let drained = Instant::now();
    cluster
        .kubectl(
            &[
                "drain",
                node_a,
                "--ignore-daemonsets",
                "--delete-emptydir-data",
                DRAIN_TIMEOUT_ARG,
            ],
            None,
        )
        .await
        .map_err(|e| e.to_string())?;
    wait_replicas(nodes, ns, "all Ready on node b", READY_TIMEOUT, |pods| {
        pods.len() == REPLICAS && pods.iter().all(|p| pod_ready(p) && node_of(p) == node_b)
    })
    .await?;
    eprintln!(
        "kube nodes: all replicas Ready on node b {:?} after kubectl drain",
        drained.elapsed()
    );
    let node = cluster
        .get_json(&["get", "node", node_a])
        .await
        .map_err(|e| e.to_string())?;
    if node["spec"]["unschedulable"] != true {
        return Err(format!("node a is not cordoned: {}", node["spec"]));
    }
    // Node a's kubelet stopped the evicted pods: nothing of them runs in
    // its wasmlet, and their network namespaces are gone.
    let a = &nodes.runtimes[0];
    let labels = std::collections::HashMap::from([(
        "io.kubernetes.pod.namespace".to_owned(),
        ns.to_owned(),
    )]);
    let mut cri = a.wasmlet.cri();
    let sandboxes = cri
        .list_pod_sandbox(Some(cri::PodSandboxFilter {
            label_selector: labels.clone(),
            ..Default::default()
        }))
        .await
        .map_err(|e| e.to_string())?;
    let containers = cri
        .list_containers(Some(cri::ContainerFilter {
            label_selector: labels,
            ..Default::default()
        }))
        .await
        .map_err(|e| e.to_string())?;
    let ready = cri::PodSandboxState::SandboxReady as i32;
    let running = cri::ContainerState::ContainerRunning as i32;
    if sandboxes.iter().any(|s| s.state == ready) || containers.iter().any(|c| c.state == running) {
        return Err(format!(
            "after the drain node a's wasmlet still runs sandboxes {sandboxes:?} and containers {containers:?}"
        ));
    }
    let pinned: Vec<String> = a
        .net
        .namespaces()
        .into_iter()
        .filter(|n| sandboxes.iter().any(|s| n.contains(s.id.as_str())))
        .collect();
    if !pinned.is_empty() {
        return Err(format!(
            "network namespaces of drained pods are left on node a: {pinned:?}"
        ));
    }
    Ok(())
}
