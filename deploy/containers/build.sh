#!/usr/bin/env bash
# Build the CPU images of the container test with podman, with no registry: a Debian bookworm base
# made by debootstrap, Redis (Debian's) on it, and the spie reward and trainer images on it with the
# CPU build of torch.
#
#   sudo deploy/containers/build.sh            # then: deploy/containers/run-test.sh, or the pytest
#
# Environment (all optional):
#   SPIE_BASE_IMAGE    base tag (localhost/spie-base:bookworm); rebuilt only when missing
#   SPIE_REBUILD_BASE  1: rebuild the base even if it exists
#   DEBIAN_MIRROR      debootstrap's mirror (http://deb.debian.org/debian)
#   SPIE_TORCH_WHEELS  a folder holding a torch CPU wheel for cp311 (default /opt/wheels when it has one):
#                      mounted into the build as pip's find-links, torch pinned to that wheel's version;
#                      without one, torch comes from https://download.pytorch.org/whl/cpu
#   SPIE_PIP_CERT      a CA bundle for pip inside the build (default this machine's
#                      /etc/ssl/certs/ca-certificates.crt, for networks that re-sign TLS)
#   CONTAINERS_CONF    podman settings (default deploy/containers/containers.conf)
set -euo pipefail
cd "$(dirname "$0")/../.."
export CONTAINERS_CONF=${CONTAINERS_CONF:-$PWD/deploy/containers/containers.conf}
BASE=${SPIE_BASE_IMAGE:-localhost/spie-base:bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
log() { printf '[build %(%H:%M:%S)T] %s\n' -1 "$*"; }

if [[ ${SPIE_REBUILD_BASE:-0} == 1 ]] || ! podman image exists "$BASE"; then
  log "base $BASE: debootstrap bookworm from $MIRROR"
  root=$(mktemp -d /var/tmp/spie-base.XXXXXX)
  trap 'rm -rf "$root"' EXIT
  debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
    bookworm "$root" "$MIRROR" >"$root.log" 2>&1 || { tail -20 "$root.log"; exit 1; }
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root".log
  tar -C "$root" -c . | podman import --change 'CMD ["/bin/bash"]' - "$BASE" >/dev/null
  rm -rf "$root"
  trap - EXIT
fi

log "redis: localhost/spie-redis:bookworm"
podman build -q -f deploy/containers/Containerfile.redis --build-arg BASE_IMAGE="$BASE" \
  -t localhost/spie-redis:bookworm deploy/containers >/dev/null

# pip inside the build: our own pip.conf (find-links to the torch wheel, the CA bundle), mounted
# over /etc/pip.conf for the RUN steps only; nothing of it stays in the images.
work=$(mktemp -d /var/tmp/spie-build.XXXXXX)
trap 'rm -rf "$work"' EXIT
mounts=(-v "$work/pip.conf:/etc/pip.conf:ro")
printf '[global]\n' >"$work/pip.conf"
cert=${SPIE_PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}
if [[ -f $cert ]]; then
  mounts+=(-v "$cert:/run/spie/ca.crt:ro")
  printf 'cert = /run/spie/ca.crt\n' >>"$work/pip.conf"
fi
wheels=${SPIE_TORCH_WHEELS:-/opt/wheels}
wheel=$(ls "$wheels"/torch-*+cpu-cp311-*.whl 2>/dev/null | sort -V | tail -1 || true)
if [[ -n $wheel ]]; then
  version=$(basename "$wheel" | cut -d- -f2)  # e.g. 2.13.0+cpu
  mounts+=(-v "$wheels:/run/spie/wheels:ro")
  printf 'find-links = /run/spie/wheels\n' >>"$work/pip.conf"
  torch=(--build-arg TORCH_SPEC="torch==$version" --build-arg TORCH_INDEX=)
  log "torch $version from $wheel"
else
  torch=(--build-arg TORCH_SPEC=torch --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu)
  log "torch: the CPU build from download.pytorch.org"
fi

for image in reward trainer; do
  log "$image: localhost/spie-$image:cpu"
  podman build "${mounts[@]}" -f deploy/Dockerfile.$image --build-arg BASE_IMAGE="$BASE" "${torch[@]}" \
    -t localhost/spie-$image:cpu .
done
log "done"
