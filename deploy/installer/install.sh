#!/usr/bin/env bash
# Installs wasmlet onto the node this runs on, from the installer image (or
# from this machine, for a test): the binary, its systemd unit and its
# configuration under HOST_ROOT (the node's root, mounted at /host by the
# installer DaemonSet). On a node that already runs containerd the config
# sends every non-Wasm pod on to it ([delegate]), so the kubelet can point
# at wasmlet alone. Then, where the node runs systemd, the service is
# started; with CONFIGURE_KUBELET=true the kubelet is pointed at wasmlet's
# socket (only with a delegate: otherwise its other pods would have no
# runtime) and restarted; and the node is labelled wasmlet.dev/runtime=ready
# so the RuntimeClasses schedule onto it. Safe to run again: an existing
# config file is the operator's and is kept.
#
# Environment:
#   HOST_ROOT          the node's root (/host)
#   WASMLET_BINARY     the binary to install (/opt/wasmlet/bin/wasmlet)
#   UNIT_FILE          the unit to install (/opt/wasmlet/wasmlet.service)
#   CONTAINERD_SOCKET  the downstream runtime's socket, as the node sees it
#                      (/run/containerd/containerd.sock)
#   CONFIGURE_KUBELET  "true" to point the kubelet at wasmlet (false)
#   KUBELET_CONFIG     the kubelet's config file (/var/lib/kubelet/config.yaml)
#   NODE_NAME          this node, for its label (the DaemonSet sets it)
set -euo pipefail

HOST_ROOT="${HOST_ROOT:-/host}"
WASMLET_BINARY="${WASMLET_BINARY:-/opt/wasmlet/bin/wasmlet}"
UNIT_FILE="${UNIT_FILE:-/opt/wasmlet/wasmlet.service}"
CONTAINERD_SOCKET="${CONTAINERD_SOCKET:-/run/containerd/containerd.sock}"
CONFIGURE_KUBELET="${CONFIGURE_KUBELET:-false}"
KUBELET_CONFIG="${KUBELET_CONFIG:-/var/lib/kubelet/config.yaml}"
SOCKET=/run/wasmlet/wasmlet.sock

log() { echo "wasmlet-installer: $*"; }

[ -d "$HOST_ROOT" ] || { log "no node root at $HOST_ROOT"; exit 1; }
[ -x "$WASMLET_BINARY" ] || { log "no wasmlet binary at $WASMLET_BINARY"; exit 1; }
[ -f "$UNIT_FILE" ] || { log "no unit file at $UNIT_FILE"; exit 1; }

# Replaces a file in one rename, so a running node never sees half of it.
place() {
    local src="$1" dest="$2" mode="$3"
    mkdir -p "$(dirname "$dest")"
    local tmp
    tmp="$(mktemp "$dest.XXXXXX")"
    cp "$src" "$tmp"
    chmod "$mode" "$tmp"
    mv -f "$tmp" "$dest"
}

place "$WASMLET_BINARY" "$HOST_ROOT/usr/local/bin/wasmlet" 0755
place "$UNIT_FILE" "$HOST_ROOT/etc/systemd/system/wasmlet.service" 0644
log "installed /usr/local/bin/wasmlet and /etc/systemd/system/wasmlet.service"

delegate=false
if [ -S "$HOST_ROOT$CONTAINERD_SOCKET" ]; then
    delegate=true
fi
config="$HOST_ROOT/etc/wasmlet/wasmlet.toml"
if [ -e "$config" ]; then
    log "keeping the existing /etc/wasmlet/wasmlet.toml"
    if grep -q '^\[delegate\]' "$config"; then delegate=true; else delegate=false; fi
else
    # The node's cgroup driver, as its containerd is configured (runc's
    # SystemdCgroup), else systemd's presence.
    driver=cgroupfs
    if grep -rqs 'SystemdCgroup *= *true' "$HOST_ROOT/etc/containerd/"; then
        driver=systemd
    elif [ -d "$HOST_ROOT/run/systemd/system" ] && ! [ -d "$HOST_ROOT/etc/containerd" ]; then
        driver=systemd
    fi
    tmp="$(mktemp)"
    {
        echo "# Written by the wasmlet installer; yours to edit (it is kept on reinstall)."
        echo "# \`wasmlet config default\` prints every key with its meaning."
        echo "socket = \"$SOCKET\""
        echo "root = \"/var/lib/wasmlet\""
        echo "cgroup_driver = \"$driver\""
        if [ "$delegate" = true ]; then
            echo
            echo "# Every pod whose RuntimeClass is not wasmlet's goes on to the node's containerd."
            echo "[delegate]"
            echo "socket = \"$CONTAINERD_SOCKET\""
        fi
    } > "$tmp"
    place "$tmp" "$config" 0644
    rm -f "$tmp"
    log "wrote /etc/wasmlet/wasmlet.toml (cgroup driver $driver, delegate to containerd: $delegate)"
fi
"$HOST_ROOT/usr/local/bin/wasmlet" --config "$config" config check >/dev/null

# On the node, where it runs systemd.
on_node() { nsenter --target 1 --mount --uts --ipc --net --pid -- "$@"; }
if [ -d "$HOST_ROOT/run/systemd/system" ] && [ "$HOST_ROOT" != / ] && command -v nsenter >/dev/null; then
    on_node systemctl daemon-reload
    on_node systemctl enable wasmlet.service
    on_node systemctl restart wasmlet.service
    for _ in $(seq 1 30); do
        [ -S "$HOST_ROOT$SOCKET" ] && break
        sleep 1
    done
    [ -S "$HOST_ROOT$SOCKET" ] || { log "wasmlet did not open $SOCKET"; exit 1; }
    log "wasmlet.service is running"
else
    log "the node does not run systemd here: start /usr/local/bin/wasmlet with its config yourself"
fi

if [ "$CONFIGURE_KUBELET" = true ]; then
    kubelet_config="$HOST_ROOT$KUBELET_CONFIG"
    if [ "$delegate" != true ]; then
        log "not pointing the kubelet at wasmlet: without [delegate] its other pods would have no runtime"
    elif [ ! -f "$kubelet_config" ]; then
        log "no kubelet config at $KUBELET_CONFIG; set containerRuntimeEndpoint yourself"
    elif grep -q "^containerRuntimeEndpoint: *unix://$SOCKET\$" "$kubelet_config"; then
        log "the kubelet already uses wasmlet"
    else
        tmp="$(mktemp)"
        grep -v '^containerRuntimeEndpoint:' "$kubelet_config" > "$tmp" || true
        echo "containerRuntimeEndpoint: unix://$SOCKET" >> "$tmp"
        cp "$kubelet_config" "$kubelet_config.before-wasmlet"
        place "$tmp" "$kubelet_config" 0644
        rm -f "$tmp"
        log "pointed the kubelet at unix://$SOCKET (the old config is $KUBELET_CONFIG.before-wasmlet)"
        if [ -d "$HOST_ROOT/run/systemd/system" ] && [ "$HOST_ROOT" != / ] && command -v nsenter >/dev/null; then
            on_node systemctl restart kubelet.service
        fi
    fi
fi

# Label the node ready for the RuntimeClasses, with the pod's own account.
token=/var/run/secrets/kubernetes.io/serviceaccount/token
if [ -n "${NODE_NAME:-}" ] && [ -f "$token" ]; then
    curl -fsS --cacert /var/run/secrets/kubernetes.io/serviceaccount/ca.crt \
        -H "Authorization: Bearer $(cat "$token")" \
        -H "Content-Type: application/merge-patch+json" \
        -X PATCH "https://${KUBERNETES_SERVICE_HOST}:${KUBERNETES_SERVICE_PORT}/api/v1/nodes/${NODE_NAME}" \
        -d '{"metadata":{"labels":{"wasmlet.dev/runtime":"ready"}}}' >/dev/null
    log "labelled node $NODE_NAME wasmlet.dev/runtime=ready"
fi
log "done"
