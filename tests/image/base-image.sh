#!/usr/bin/env bash
# Build a local stand-in for the Dockerfile's base image, python:3.11-slim, for
# podman on machines that reach Debian's mirrors but no container registry.
# Like the real one: Debian bookworm, Python 3.11, pip, `python` on the PATH.
# Does nothing if the image exists. Needs root and debootstrap (~60 s).
set -euo pipefail

IMAGE=python:3.11-slim
if podman image exists "$IMAGE"; then
    exit 0
fi
command -v debootstrap >/dev/null || { echo "base-image: needs debootstrap (apt-get install debootstrap)" >&2; exit 1; }

root=$(mktemp -d /var/tmp/base-image.XXXXXX)
trap 'rm -rf "$root"' EXIT

echo "base-image: building $IMAGE with debootstrap (about a minute)"
timeout 600 debootstrap --variant=minbase \
    --include=python3,python3-venv,python3-pip,ca-certificates \
    bookworm "$root" http://deb.debian.org/debian >"$root.log" 2>&1 \
    || { tail -20 "$root.log" >&2; rm -f "$root.log"; exit 1; }
rm -f "$root.log"

# The host's CA bundle: it trusts whatever the host's route to PyPI presents.
cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
# python:3.11-slim lets pip install into the system Python; so must this.
rm -f "$root"/usr/lib/python3.*/EXTERNALLY-MANAGED
ln -sf /usr/bin/python3 "$root/usr/local/bin/python"
ln -sf /usr/bin/pip3 "$root/usr/local/bin/pip"
# Smaller: apt's caches and lists are not needed at run time.
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*

tar -C "$root" -c . | podman import --quiet --change 'CMD ["python3"]' - "$IMAGE" >/dev/null
echo "base-image: $IMAGE ready"
