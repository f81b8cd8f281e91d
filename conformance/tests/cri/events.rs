//! GetContainerEvents: every subscriber sees each sandbox and container
//! transition of a pod's life, with the statuses the evented PLEG reads.

use std::time::Duration;

use wasmlet_conformance::{ContainerConfigBuilder, cri};

use crate::daemon::Wasmlet;
use crate::{ECHO_P1, GUEST_TIMEOUT};

type Events = tonic::Streaming<cri::ContainerEventResponse>;

async fn subscribe(cri: &mut wasmlet_conformance::CriClient) -> Events {
    cri.runtime()
        .get_container_events(cri::GetEventsRequest {})
        .await
        .unwrap()
        .into_inner()
}

/// Reads events until `last` (id, type) arrives.
async fn until(
    events: &mut Events,
    last: (&str, cri::ContainerEventType),
) -> Vec<cri::ContainerEventResponse> {
    let mut seen = Vec::new();
    loop {
        let event = tokio::time::timeout(GUEST_TIMEOUT, events.message())
            .await
            .expect("an event in time")
            .expect("an event, not an error")
            .expect("the stream goes on");
        let done = event.container_id == last.0 && event.container_event_type == last.1 as i32;
        seen.push(event);
        if done {
            return seen;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_subscriber_sees_every_transition_of_a_pod() {
    use cri::ContainerEventType::*;
    let wasmlet = Wasmlet::start().await;
    let mut cri = wasmlet.cri();
    let mut first = subscribe(&mut cri).await;
    let mut second = subscribe(&mut cri).await;
    // Subscriptions are in place once the stream's headers are back.
    tokio::time::sleep(Duration::from_millis(50)).await;

    let pod = cri.run_pod(wasmlet.pod().build()).await.unwrap();
    let echo = ContainerConfigBuilder::new("echo", ECHO_P1).build();
    let id = cri.start(&pod, echo).await.unwrap();
    cri.wait_exited(&id, GUEST_TIMEOUT).await.unwrap();
    cri.remove_container(&id).await.unwrap();
    cri.stop_pod_sandbox(&pod.id).await.unwrap();
    cri.remove_pod_sandbox(&pod.id).await.unwrap();

    let expected = [
        (pod.id.as_str(), ContainerCreatedEvent),
        (pod.id.as_str(), ContainerStartedEvent),
        (id.as_str(), ContainerCreatedEvent),
        (id.as_str(), ContainerStartedEvent),
        (id.as_str(), ContainerStoppedEvent),
        (id.as_str(), ContainerDeletedEvent),
        (pod.id.as_str(), ContainerStoppedEvent),
        (pod.id.as_str(), ContainerDeletedEvent),
    ];
    for events in [&mut first, &mut second] {
        let seen = until(events, (pod.id.as_str(), ContainerDeletedEvent)).await;
        let got: Vec<(&str, i32)> = seen
            .iter()
            .map(|e| (e.container_id.as_str(), e.container_event_type))
            .collect();
        let want: Vec<(&str, i32)> = expected.iter().map(|(i, t)| (*i, *t as i32)).collect();
        assert_eq!(got, want);
        for event in &seen {
            assert!(event.created_at > 0);
        }
        // The container's stop carries its pod's and its own final status.
        let stopped = &seen[4];
        let sandbox = stopped.pod_sandbox_status.as_ref().unwrap();
        assert_eq!(sandbox.id, pod.id);
        let status = stopped
            .containers_statuses
            .iter()
            .find(|c| c.id == id)
            .unwrap();
        assert_eq!(status.state, cri::ContainerState::ContainerExited as i32);
        assert_eq!(status.exit_code, 0);
        // The pod's deletion is read after the pod is gone, and still
        // carries its last status: the kubelet drops an event without one,
        // and only this one tells it to forget the pod.
        let gone = seen[7].pod_sandbox_status.as_ref().unwrap();
        assert_eq!(gone.id, pod.id);
        assert_eq!(gone.state, cri::PodSandboxState::SandboxNotready as i32);
        assert_eq!(
            gone.metadata.as_ref().map(|m| m.uid.as_str()),
            pod.config.metadata.as_ref().map(|m| m.uid.as_str())
        );
        assert!(seen[7].containers_statuses.is_empty());
    }
}

/// RemovePodSandbox of a pod whose container is still there (as the
/// kubelet's garbage collection does): both deletions carry the pod's last
/// status, though neither the pod nor the container is left to ask.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletions_of_a_removed_pod_carry_its_last_status() {
    use cri::ContainerEventType::*;
    let wasmlet = Wasmlet::start().await;
    let mut cri = wasmlet.cri();
    let mut events = subscribe(&mut cri).await;
    tokio::time::sleep(Duration::from_millis(50)).await;

    let pod = cri.run_pod(wasmlet.pod().build()).await.unwrap();
    let echo = ContainerConfigBuilder::new("echo", ECHO_P1).build();
    let id = cri.start(&pod, echo).await.unwrap();
    cri.wait_exited(&id, GUEST_TIMEOUT).await.unwrap();
    cri.remove_pod_sandbox(&pod.id).await.unwrap();

    let seen = until(&mut events, (pod.id.as_str(), ContainerDeletedEvent)).await;
    let deletions: Vec<&cri::ContainerEventResponse> = seen
        .iter()
        .filter(|e| e.container_event_type == ContainerDeletedEvent as i32)
        .collect();
    let ids: Vec<&str> = deletions.iter().map(|e| e.container_id.as_str()).collect();
    assert_eq!(ids, [id.as_str(), pod.id.as_str()]);
    let uid = pod.config.metadata.as_ref().map(|m| m.uid.clone());
    for event in deletions {
        let status = event
            .pod_sandbox_status
            .as_ref()
            .unwrap_or_else(|| panic!("{} deleted without its pod's status", event.container_id));
        assert_eq!(status.id, pod.id);
        assert_eq!(status.metadata.as_ref().map(|m| m.uid.clone()), uid);
        assert_eq!(status.state, cri::PodSandboxState::SandboxNotready as i32);
    }
}
