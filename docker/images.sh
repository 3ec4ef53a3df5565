#!/usr/bin/env bash
# Build the project's images on a real Docker engine and run a command (the test suite) beside them.
#
#   bash docker/images.sh run CMD...   engine + base + build, run CMD with GQTOK_IMAGE_TAG set, stop what it started
#   bash docker/images.sh engine       install Debian's docker.io if missing (root + apt), start dockerd if stopped
#   bash docker/images.sh base         the base image: the public one if it can be pulled, else one made here
#   bash docker/images.sh build        the tokenizer (CPU and GPU), generator and balancer images
#   bash docker/images.sh stop         stop dockerd if this script started it
#
# Where no engine can be had (not root, no apt, no dockerd) `run` still runs CMD, without GQTOK_IMAGE_TAG, and
# the image tests skip with the reason; under CI=true that is an error instead, so CI never passes without them.
#
# The base: the Dockerfiles default to the public python:3.11-slim-trixie. No registry of images is reachable on
# the project's machines, so when that cannot be pulled this script makes `gqtok-base:bookworm` from Debian's own
# mirror (debootstrap --variant=minbase with python3 and python3-venv, then `docker import`), with the machine's
# extra CA certificates so that pip inside the build reaches the package index, and passes it as BASE.
# It is made once and reused (docker image inspect): it holds only Debian packages and certificates.
# Every step below checks its own failure: `set -e` does not apply inside functions called from `if` or `||`.
set -euo pipefail
cd "$(dirname "$0")/.."

TAG=${GQTOK_TAG:-0.1.0}
PUBLIC_BASE=python:3.11-slim-trixie
LOCAL_BASE=gqtok-base:bookworm
STATE=${GQTOK_ENGINE_STATE:-build/engine}   # dockerd's pid and log when this script started it
TORCH_WHEEL_GLOB=${TORCH_WHEEL_GLOB:-/opt/wheels/torch-2.13.0+cpu-*.whl}

log() { echo "images: $*" >&2; }
mkdir -p "$(dirname "$STATE")"

# The client that comes with Debian's engine (/usr/bin/docker, 20.10) builds with BuildKit on its own; a newer
# client elsewhere on PATH may lack the buildx plugin that BuildKit needs there. Tests use the same client.
# Chosen at the first call, after engine() may have installed it.
docker() {
    if [ -z "${GQTOK_DOCKER:-}" ]; then
        GQTOK_DOCKER=$( [ -x /usr/bin/docker ] && echo /usr/bin/docker || command -v docker || echo docker)
        export GQTOK_DOCKER
    fi
    "$GQTOK_DOCKER" "$@"
}

engine_up() { timeout 10 docker info >/dev/null 2>&1; }

engine() {
    engine_up && return 0
    if ! command -v dockerd >/dev/null; then
        [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null || { log "no dockerd, and no root apt to install it"; return 1; }
        log "installing Debian's docker.io"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker.io >/dev/null 2>&1 \
            || { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker.io >/dev/null; } \
            || { log "apt-get install docker.io failed"; return 1; }
    fi
    [ "$(id -u)" = 0 ] || { log "dockerd is installed but stopped, and starting it needs root"; return 1; }
    mkdir -p "$STATE"
    log "starting dockerd (log: $STATE/dockerd.log)"
    nohup dockerd >"$STATE/dockerd.log" 2>&1 &
    echo $! >"$STATE/dockerd.pid"
    for _ in $(seq 60); do engine_up && return 0; sleep 0.5; done
    log "dockerd did not answer within 30 s:"; tail -5 "$STATE/dockerd.log" >&2; return 1
}

stop() {
    [ -f "$STATE/dockerd.pid" ] || return 0
    local pid; pid=$(cat "$STATE/dockerd.pid"); rm -f "$STATE/dockerd.pid"
    # Containers this run left behind first (the tests remove theirs; this is for a run that was interrupted).
    docker ps -q --filter label=gqtok.test | xargs -r docker rm -f >/dev/null 2>&1 || true
    log "stopping dockerd ($pid)"
    kill "$pid" 2>/dev/null || return 0
    for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.5; done
    kill -9 "$pid" 2>/dev/null || true
}

apt_mirror() {  # the Debian mirror this machine's apt uses (deb822 or one-line sources), printed; 1 if none
    local m
    m=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | sed -n 's/^URIs: *\(http[^ ]*\).*$/\1/p' | grep -m1 debian) \
        || m=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
               | sed -n 's/^deb \(\[[^]]*\] \)\{0,1\}\(http[^ ]*\) .*$/\2/p' | grep -m1 debian) || return 1
    echo "$m"
}

pip_index() {  # the package index this machine's pip is set to use, printed (nothing: pip's own default)
    { pip config get global.index-url 2>/dev/null || printenv PIP_INDEX_URL || true; } | head -1
}

base() {
    if docker image inspect "$PUBLIC_BASE" >/dev/null 2>&1 || timeout 30 docker pull -q "$PUBLIC_BASE" >/dev/null 2>&1; then
        echo "$PUBLIC_BASE"; return 0
    fi
    if ! docker image inspect "$LOCAL_BASE" >/dev/null 2>&1; then
        command -v debootstrap >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap >/dev/null \
            || { log "no debootstrap, and apt-get could not install it"; return 1; }
        local root mirror
        mirror=$(apt_mirror) || { log "no Debian mirror in this machine's apt sources to make a base from"; return 1; }
        root=$(mktemp -d)
        log "$PUBLIC_BASE cannot be pulled: making $LOCAL_BASE with debootstrap from $mirror (the machine's apt source)"
        debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
            bookworm "$root" "$mirror" >"$root.log" 2>&1 \
            || { tail -20 "$root.log" >&2; return 1; }
        # The machine's own CA certificates (an intercepting egress proxy signs with one of them).
        if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
            cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
            chroot "$root" update-ca-certificates >/dev/null
        fi
        rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
        tar -C "$root" --exclude=./proc --exclude=./sys --exclude=./dev -c . | docker import \
            --change 'ENV LANG=C.UTF-8 PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
            --change 'CMD ["python3"]' - "$LOCAL_BASE" >/dev/null || return 1
        rm -rf "$root" "$root.log"
    fi
    echo "$LOCAL_BASE"
}

build() {
    local base_image; base_image=$(base) || return 1
    log "base: $base_image"
    # The generator's torch: the CPU wheel this machine serves to pip, passed in through docker/wheels/ (ignored
    # by git); pip inside the build uses the index this machine's pip is set to, if any (else pip's default).
    local index_args=() index
    # shellcheck disable=SC2086
    for wheel in $TORCH_WHEEL_GLOB; do
        [ -f "$wheel" ] || continue
        [ -f "docker/wheels/$(basename "$wheel")" ] || cp "$wheel" docker/wheels/
    done
    index=$(pip_index)
    [ -z "$index" ] || index_args=(--build-arg PIP_INDEX_URL="$index")
    build_image gqtok-tokenizer --build-arg BASE="$base_image" "${index_args[@]}" -f docker/Dockerfile || return 1
    build_image gqtok-tokenizer-gpu --build-arg BASE="$base_image" "${index_args[@]}" --build-arg EXTRA=gpu \
        --build-arg DEVICE=auto -f docker/Dockerfile || return 1
    build_image gqtok-generator --build-arg BASE="$base_image" "${index_args[@]}" -f docker/Dockerfile.generator \
        || return 1
    build_image gqtok-balancer --build-arg BASE="$base_image" -f docker/Dockerfile.balancer || return 1
    # What earlier builds left: the images whose tags these builds took, and build cache unused for an hour.
    # Without this every CI run leaves ~5 GB behind (a full disk after a day of runs).
    docker image prune -f >/dev/null || true
    docker builder prune -af --filter until=1h >/dev/null || true
}

build_image() {  # NAME DOCKER-BUILD-ARGS...: NAME:$TAG from the repository root, timed
    local name=$1 t0=$SECONDS; shift
    DOCKER_BUILDKIT=1 docker build -q "$@" -t "$name:$TAG" . >/dev/null || return 1
    log "$name:$TAG built in $((SECONDS - t0)) s"
}

run() {
    local have=1
    if ! engine || ! build; then
        have=0
        if [ "${CI:-}" = true ]; then stop; log "CI: the images could not be built"; return 1; fi
        log "no images: the image tests will skip"
    fi
    local rc=0
    if [ $have = 1 ]; then
        GQTOK_IMAGE_TAG=$TAG "$@" || rc=$?
    else
        "$@" || rc=$?
    fi
    stop
    return $rc
}

case "${1:-}" in
    engine) engine ;;
    base) engine && base ;;
    build) engine && build ;;
    stop) stop ;;
    run) shift; run "$@" ;;
    *) sed -n '2,9p' "$0"; exit 2 ;;
esac
