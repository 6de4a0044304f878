#!/usr/bin/env bash
# Build the kakuremichi container images (Dockerfile.agent, Dockerfile.control,
# Dockerfile.gateway) without Docker and without a registry: buildah (vfs storage,
# chroot isolation) on a base image made locally with debootstrap.
#
#   scripts/build-image.sh                        build all three, localhost/kakuremichi-KIND:latest
#   scripts/build-image.sh control gateway        only those
#   BASE_IMAGE=debian:bookworm-slim scripts/build-image.sh agent    use that base instead
#
# With Docker (or Podman) and a registry, none of this is needed:
#
#   docker build -f Dockerfile.agent -t kakuremichi-agent .
#
# The three Dockerfiles share their builder stage word for word (it installs and
# compiles everything once and checks all three commands), so after the first image the
# others reuse its cached layers and only add their small runtime stage.
#
# The debootstrap root file system is cached as a tarball under
# ${KAKUREMICHI_CACHE_DIR:-${XDG_CACHE_HOME:-~/.cache}/kakuremichi} and imported once as
# localhost/kakuremichi-base:bookworm.  The build runs with --layers: a first build takes
# about three minutes, a rebuild after a code change about a minute and a half (vfs
# copies the whole file system for every step, even a cached one).  Images and cached
# layers stay in buildah's storage, a few GB with vfs: 'buildah --storage-driver vfs
# images' lists them, 'buildah --storage-driver vfs rmi --prune' drops the unnamed ones
# (and with them the cache).
#
# Behind a TLS-intercepting proxy, pip inside the build must trust the proxy's CA: give
# the bundle with --ca-bundle FILE (default: $PIP_CERT when set).  It reaches the pip
# steps as the build secret pip-ca and never becomes part of an image.
set -euo pipefail

usage() {
    cat <<EOF
Usage: $(basename "$0") [OPTIONS] [agent|control|gateway ...]

Build kakuremichi images from Dockerfile.KIND with buildah (default: all three, in
that order).

Options:
  -t, --tag NAME     image name, when building one image (default: kakuremichi-KIND,
                     stored as localhost/kakuremichi-KIND:latest)
  --version-tag TAG  name each image kakuremichi-KIND:TAG instead of :latest
  --rebuild-base     debootstrap the base image again, ignoring the cached one
  --no-cache         rebuild every Dockerfile step (default: reuse cached layers)
  --ca-bundle FILE   CA bundle pip must trust during the build (default: \$PIP_CERT,
                     if set); for networks that intercept TLS
  -h, --help         show this help

Environment:
  BASE_IMAGE         base image for both stages; unset: a Debian bookworm minbase
                     made here with debootstrap (needs root), imported as
                     $BASE_TAG
  DEBIAN_MIRROR      mirror for debootstrap (default: $DEBIAN_MIRROR)
  KAKUREMICHI_CACHE_DIR  where the debootstrap tarball is kept
                     (default: $CACHE_DIR)
  STORAGE_DRIVER     buildah storage driver (default: vfs, works everywhere)
  BUILDAH_ISOLATION  buildah isolation (default: chroot, needs no runtime)

Needs: buildah, and debootstrap when BASE_IMAGE is unset.  Run as root (debootstrap,
and buildah's chroot isolation without a user namespace).
EOF
}

die() {
    echo "build-image: error: $*" >&2
    exit 1
}

step() {
    echo "==> $*"
}

ROOT=$(cd "$(dirname "$0")/.." && pwd)
SUITE=bookworm
BASE_TAG=localhost/kakuremichi-base:$SUITE
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
CACHE_DIR=${KAKUREMICHI_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/kakuremichi}
export STORAGE_DRIVER=${STORAGE_DRIVER:-vfs}
export BUILDAH_ISOLATION=${BUILDAH_ISOLATION:-chroot}
TAG=""
VERSION_TAG=latest
KINDS=()
REBUILD_BASE=0
NO_CACHE=()
CA_BUNDLE=${PIP_CERT:-}

while [ $# -gt 0 ]; do
    case "$1" in
    -t | --tag)
        [ $# -ge 2 ] || die "$1 needs an image name"
        TAG=$2
        shift 2
        ;;
    --tag=*)
        TAG=${1#--tag=}
        shift
        ;;
    --version-tag)
        [ $# -ge 2 ] || die "$1 needs a tag"
        VERSION_TAG=$2
        shift 2
        ;;
    agent | control | gateway)
        KINDS+=("$1")
        shift
        ;;
    --ca-bundle)
        [ $# -ge 2 ] || die "$1 needs a file"
        CA_BUNDLE=$2
        shift 2
        ;;
    --rebuild-base)
        REBUILD_BASE=1
        shift
        ;;
    --no-cache)
        NO_CACHE=(--no-cache)
        shift
        ;;
    -h | --help)
        usage
        exit 0
        ;;
    *)
        die "unknown argument: $1 (see --help)"
        ;;
    esac
done

bah() {
    buildah --storage-driver "$STORAGE_DRIVER" "$@"
}

# Whatever a failed or interrupted run leaves behind.
ROOTFS=""
IMPORT_CTR=""
cleanup() {
    if [ -n "$IMPORT_CTR" ]; then bah rm "$IMPORT_CTR" >/dev/null 2>&1 || true; fi
    if [ -n "$ROOTFS" ]; then remove_rootfs "$ROOTFS"; fi
}
trap cleanup EXIT

[ ${#KINDS[@]} -gt 0 ] || KINDS=(agent control gateway)
[ -z "$TAG" ] || [ ${#KINDS[@]} = 1 ] || die "--tag names one image; with several use --version-tag"
command -v buildah >/dev/null ||
    die "buildah is not installed (Debian: apt-get install buildah); with Docker use: docker build -f Dockerfile.${KINDS[0]} ."
for kind in "${KINDS[@]}"; do
    [ -f "$ROOT/Dockerfile.$kind" ] || die "$ROOT/Dockerfile.$kind is missing"
done
SECRETS=()
if [ -n "$CA_BUNDLE" ]; then
    { [ -f "$CA_BUNDLE" ] && [ -r "$CA_BUNDLE" ]; } ||
        die "CA bundle $CA_BUNDLE (--ca-bundle or \$PIP_CERT) is not a readable file"
    SECRETS=(--secret "id=pip-ca,src=$CA_BUNDLE")
fi

ARCH=$(dpkg --print-architecture 2>/dev/null || true)
if [ -z "$ARCH" ]; then
    case "$(uname -m)" in
    x86_64) ARCH=amd64 ;;
    aarch64) ARCH=arm64 ;;
    *) die "unknown architecture $(uname -m); set BASE_IMAGE" ;;
    esac
fi
TARBALL=$CACHE_DIR/debian-$SUITE-minbase-$ARCH.tar.gz

# Unmount whatever debootstrap left mounted under $1 (it mounts /proc and /sys in the
# target and may not unmount them if it fails), then remove the tree without ever
# crossing into another file system.
remove_rootfs() {
    local dir=$1 mounts
    [ -d "$dir" ] || return 0
    mounts=$(awk -v prefix="$dir/" 'index($2, prefix) == 1 { print $2 }' /proc/mounts | sort -r)
    for mount in $mounts; do
        umount -l "$mount" || true
    done
    rm -rf --one-file-system "$dir"
}

make_rootfs_tarball() {
    command -v debootstrap >/dev/null ||
        die "debootstrap is not installed (Debian: apt-get install debootstrap); or set BASE_IMAGE to an existing Debian $SUITE image"
    [ "$(id -u)" = 0 ] || die "debootstrap needs root; run as root or set BASE_IMAGE"
    mkdir -p "$CACHE_DIR"
    ROOTFS=$(mktemp -d "$CACHE_DIR/rootfs.XXXXXX")
    step "debootstrap --variant=minbase $SUITE ($ARCH) from $DEBIAN_MIRROR (a few minutes, once)"
    debootstrap --variant=minbase --arch="$ARCH" "$SUITE" "$ROOTFS" "$DEBIAN_MIRROR" \
        >"$CACHE_DIR/debootstrap.log" 2>&1 ||
        die "debootstrap failed; see $CACHE_DIR/debootstrap.log"
    step "slimming the root file system"
    # Like debian:bookworm-slim: updates and security suites, no docs/man pages/locales
    # from future installs, no apt caches or logs.
    rm -f "$ROOTFS/etc/apt/sources.list"
    cat >"$ROOTFS/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $DEBIAN_MIRROR
Suites: $SUITE $SUITE-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: $SUITE-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    cat >"$ROOTFS/etc/dpkg/dpkg.cfg.d/slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/lintian/*
EOF
    find "$ROOTFS/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
    rm -rf "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/info/* "$ROOTFS"/usr/share/locale/* \
        "$ROOTFS"/var/cache/apt/* "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/log/* \
        "$ROOTFS"/tmp/* "$ROOTFS/etc/resolv.conf" "$ROOTFS/etc/hostname"
    step "caching the root file system as $TARBALL"
    tar --numeric-owner -C "$ROOTFS" -czf "$TARBALL.tmp" .
    mv "$TARBALL.tmp" "$TARBALL"
    remove_rootfs "$ROOTFS"
    ROOTFS=""
}

import_base_image() {
    step "importing $TARBALL as $BASE_TAG"
    local mnt
    IMPORT_CTR=$(bah from --name "kakuremichi-base-import-$$" scratch)
    mnt=$(bah mount "$IMPORT_CTR")
    tar --numeric-owner -C "$mnt" -xpzf "$TARBALL"
    bah umount "$IMPORT_CTR" >/dev/null
    bah config \
        --os linux --arch "$ARCH" \
        --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        --cmd bash \
        --label org.opencontainers.image.description="Debian $SUITE minbase (debootstrap) for kakuremichi builds" \
        "$IMPORT_CTR"
    bah commit --quiet --rm "$IMPORT_CTR" "$BASE_TAG" >/dev/null
    IMPORT_CTR=""
}

started=$SECONDS
if [ -z "${BASE_IMAGE:-}" ]; then
    BASE_IMAGE=$BASE_TAG
    if [ "$REBUILD_BASE" = 1 ] || [ ! -s "$TARBALL" ]; then
        make_rootfs_tarball
        bah rmi "$BASE_TAG" >/dev/null 2>&1 || true
    else
        step "using the cached root file system $TARBALL"
    fi
    if bah inspect --type image "$BASE_TAG" >/dev/null 2>&1; then
        step "base image $BASE_TAG is already in buildah's storage"
    else
        import_base_image
    fi
fi

VERSION=$(sed -n 's/^version *= *"\(.*\)"/\1/p' "$ROOT/pyproject.toml" | head -n 1)
if [ -n "$CA_BUNDLE" ]; then step "pip in the build trusts $CA_BUNDLE"; fi
cd "$ROOT"
for kind in "${KINDS[@]}"; do
    tag=${TAG:-kakuremichi-$kind:$VERSION_TAG}
    step "building $tag from Dockerfile.$kind on $BASE_IMAGE (storage $STORAGE_DRIVER, isolation $BUILDAH_ISOLATION)"
    bah bud \
        --isolation "$BUILDAH_ISOLATION" \
        --layers --force-rm "${NO_CACHE[@]}" \
        --pull=false \
        "${SECRETS[@]}" \
        --build-arg BASE_IMAGE="$BASE_IMAGE" \
        --build-arg VERSION="${VERSION:-unknown}" \
        -f "Dockerfile.$kind" \
        -t "$tag" \
        .
    size=$(bah images --format '{{.Size}}' "$tag" | head -n 1)
    step "built $tag ($size) in $((SECONDS - started)) s"
done
step "try it: ctr=\$(buildah --storage-driver $STORAGE_DRIVER from kakuremichi-${KINDS[0]}:$VERSION_TAG) &&" \
    "buildah --storage-driver $STORAGE_DRIVER run \$ctr kakuremichi ${KINDS[0]} --help"
