#!/usr/bin/env bash
# Installs and starts what the test suite needs on a fresh Debian machine
# (run as root): Debian packages, the Python package with its test extras,
# a private Docker daemon and a busybox base image built with `docker import`
# (no registry is reachable). Idempotent; prints the variables to export.
set -euo pipefail

DOCKER_DIR=${PLEXAGENT_TEST_DOCKER_DIR:-/tmp/pa-docker}
BASE_IMAGE=${PLEXAGENT_TEST_BASE_IMAGE:-plexagent-test/busybox:latest}
PACKAGES="docker.io busybox-static nginx-light docker-registry ufw apache2-utils git iproute2 curl"

log() { echo "setup: $*" >&2; }

# A program that "rotates" /dev/null (a log file pointed there) leaves a
# regular file behind, which breaks git and anything else reading it.
if [ ! -c /dev/null ]; then
    log "repairing /dev/null (it is not a character device)"
    rm -f /dev/null
    mknod -m 666 /dev/null c 1 3
fi

missing=""
for p in $PACKAGES; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    log "installing Debian packages:$missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq $missing >&2
fi

log "installing plexagent with its test extras"
python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore \
    -e ".[test]" --config-settings editable_mode=compat >&2

export DOCKER_HOST="unix://$DOCKER_DIR/docker.sock"
if ! docker version >/dev/null 2>&1; then
    log "starting a private Docker daemon in $DOCKER_DIR"
    mkdir -p "$DOCKER_DIR"
    if [ -f "$DOCKER_DIR/docker.pid" ]; then
        kill "$(cat "$DOCKER_DIR/docker.pid")" 2>/dev/null || true
        rm -f "$DOCKER_DIR/docker.pid"
    fi
    nohup dockerd --data-root "$DOCKER_DIR/data" --exec-root "$DOCKER_DIR/exec" \
        -H "$DOCKER_HOST" --pidfile "$DOCKER_DIR/docker.pid" \
        >"$DOCKER_DIR/dockerd.log" 2>&1 </dev/null &
    for _ in $(seq 1 60); do
        docker version >/dev/null 2>&1 && break
        sleep 0.5
    done
    docker version >/dev/null 2>&1 || { log "dockerd did not start:"; tail -n 20 "$DOCKER_DIR/dockerd.log" >&2; exit 1; }
fi

if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    log "building $BASE_IMAGE from /bin/busybox"
    rootfs=$(mktemp -d)
    mkdir -p "$rootfs/bin" "$rootfs/tmp" "$rootfs/etc" "$rootfs/proc" "$rootfs/sys" "$rootfs/dev"
    cp /bin/busybox "$rootfs/bin/busybox"
    for applet in $("$rootfs/bin/busybox" --list); do
        [ "$applet" = busybox ] || ln -sf busybox "$rootfs/bin/$applet"
    done
    echo "root:x:0:0:root:/root:/bin/sh" > "$rootfs/etc/passwd"
    echo "nobody:x:65534:65534:nobody:/:/bin/sh" >> "$rootfs/etc/passwd"
    echo "root:x:0:" > "$rootfs/etc/group"
    echo "nogroup:x:65534:" >> "$rootfs/etc/group"
    tar -C "$rootfs" -c . | docker import -c 'ENV PATH=/bin' -c 'CMD ["/bin/sh"]' - "$BASE_IMAGE" >/dev/null
    rm -rf "$rootfs"
fi

echo "export DOCKER_HOST=$DOCKER_HOST"
echo "export PLEXAGENT_TEST_DOCKER_HOST=$DOCKER_HOST"
echo "export PLEXAGENT_TEST_BASE_IMAGE=$BASE_IMAGE"
