#!/usr/bin/env bash
# Builds the project's Dockerfile with podman, with no container registry:
#
#   1. installs podman and debootstrap from Debian's archive (apt);
#   2. makes the base the Dockerfile names, python:3.11-slim-bookworm, itself:
#      `debootstrap --variant=minbase` of bookworm with python3 (3.11) and a venv
#      at /usr/local (so `python` and `pip` are on PATH and pip installs are not
#      refused by PEP 668), imported with `podman import`; the rootfs tarball is
#      cached, so only the first run pays for debootstrap;
#   3. layers this machine's pip configuration (index URLs, CA bundle) on top as
#      /etc/pip.conf, with a current pip and wheel as the official image has, tagged
#      docker.io/library/python:3.11-slim-bookworm: a CI-only stand-in for the
#      official image (it trusts this machine's CA bundle), never pushed anywhere;
#   4. `podman build --pull=never -t localhost/smtp-gateway:test .`: the Dockerfile
#      as users build it, unchanged; the wheel stage reaches the package index on
#      the host's network; docker format, so the image keeps its HEALTHCHECK.
#
# Cold (new machine): about 1.5 minutes after apt (debootstrap about 60 s);
# warm: about 2 s, or 10-20 s when gateway/ changed (the wheel stage reruns).
#
# Usage: .ci/build-image.sh [--deps-only]
#   --deps-only   install the apt packages and stop.
# Environment:
#   SMTPGW_IMAGE_CACHE   where the base tarball is kept (default /var/cache/smtp-gateway-ci)
#   SMTPGW_IMAGE         the tag built (default localhost/smtp-gateway:test)
#   DEBIAN_MIRROR        the Debian mirror (default: the one apt uses here)
# Idempotent; a second run reuses the tarball, the imported base and podman's
# layer cache, and takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive

log() { printf 'build-image [%ss]: %s\n' "$SECONDS" "$*" >&2; }

# What podman needs to build and run here as root. The OCI runtime is runc, not
# crun: this machine mounts cgroup v1 controllers with hugetlb left on the v2
# (unified) hierarchy, and crun 1.8 refuses that ("cgroups in hybrid mode not
# supported, drop all controllers from cgroupv2"); runc runs there. netavark is the
# network stack podman's configuration asks for; builds and tests use the host's
# network (loopback only for the tests), so no iptables, slirp4netns or bridge.
PACKAGES=(podman runc conmon netavark debootstrap debian-archive-keyring)
# Every podman call here and in tests/deploy goes through these options.
PODMAN=(podman --runtime runc)
missing=()
for p in "${PACKAGES[@]}"; do
  if [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" != "install ok installed" ]; then
    missing+=("$p")
  fi
done
if [ "${#missing[@]}" -gt 0 ]; then
  log "installing ${missing[*]}"
  # apt-get update once, unless apt's lists already know podman (.ci/run updates them).
  if ! apt-cache policy podman 2>/dev/null | grep -q 'Candidate: [0-9]'; then
    $SUDO apt-get update -qq
  fi
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if [ "${1:-}" = "--deps-only" ]; then
  exit 0
fi

CACHE="${SMTPGW_IMAGE_CACHE:-/var/cache/smtp-gateway-ci}"
IMAGE="${SMTPGW_IMAGE:-localhost/smtp-gateway:test}"
FROM_TAG="docker.io/library/python:3.11-slim-bookworm"
SUITE=bookworm
INCLUDE="python3,python3-venv,ca-certificates"
$SUDO mkdir -p "$CACHE"

# One build at a time (the CI script and a test may both call this).
exec 9>"$CACHE/lock"
flock 9

# The mirror apt uses here (deb822 .sources or one-line .list), for the suite itself
# (not -security or -updates).
if [ -z "${DEBIAN_MIRROR:-}" ]; then
  DEBIAN_MIRROR="$(
    python3 - "$SUITE" /etc/apt/sources.list /etc/apt/sources.list.d/* <<'EOF'
import sys
suite, files = sys.argv[1], sys.argv[2:]
for name in files:
    try:
        text = open(name).read()
    except OSError:
        continue
    if name.endswith(".sources"):
        for stanza in text.split("\n\n"):
            f = {}
            for line in stanza.splitlines():
                if ":" in line and not line.startswith("#"):
                    k, v = line.split(":", 1)
                    f[k.strip().lower()] = v.split()
            if suite in f.get("suites", []) and "deb" in f.get("types", []):
                for uri in f.get("uris", []):
                    if uri.rstrip("/").endswith("/debian"):
                        print(uri)
                        sys.exit(0)
    else:
        for line in text.splitlines():
            w = [x for x in line.split("#")[0].split() if not x.startswith("[")]
            if len(w) >= 3 and w[0] == "deb" and w[2] == suite and w[1].rstrip("/").endswith("/debian"):
                print(w[1])
                sys.exit(0)
EOF
  )" || true
  DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
fi
# An apt proxy, if one is configured, for debootstrap too.
if [ -z "${http_proxy:-}" ]; then
  eval "$(apt-config shell http_proxy Acquire::http::Proxy)"
  if [ -n "${http_proxy:-}" ]; then
    export http_proxy
  fi
fi

# --- 2. the base: debootstrap, cached as a tarball ---------------------------
RECIPE_VERSION=1  # bump when the recipe below changes
KEY="$(printf '%s\n' "$RECIPE_VERSION" "$SUITE" "$INCLUDE" "$DEBIAN_MIRROR" "$(uname -m)" |
  sha256sum | cut -c1-16)"
TARBALL="$CACHE/base-$SUITE-python-$KEY.tar"
RAW="localhost/smtp-gateway-ci/base:$KEY"

if [ ! -s "$TARBALL" ]; then
  log "debootstrap --variant=minbase $SUITE from $DEBIAN_MIRROR (cold: about a minute or two)"
  root="$(mktemp -d "$CACHE/rootfs.XXXXXX")"
  trap '$SUDO rm -rf "$root"' EXIT
  if ! $SUDO debootstrap --variant=minbase --include="$INCLUDE" "$SUITE" "$root" \
    "$DEBIAN_MIRROR" >"$CACHE/debootstrap.log" 2>&1; then
    tail -n 30 "$CACHE/debootstrap.log" >&2
    [ -f "$root/debootstrap/debootstrap.log" ] && tail -n 30 "$root/debootstrap/debootstrap.log" >&2
    log "debootstrap failed"
    exit 1
  fi
  # A venv at /usr/local, as the official image's Python lives there: python and
  # pip on PATH, and `pip install` into it is not refused (PEP 668 covers /usr only).
  $SUDO chroot "$root" /usr/bin/python3 -m venv /usr/local
  $SUDO chroot "$root" /usr/local/bin/python -m pip --version >&2
  # What a container does not need: downloaded .debs, apt's lists, docs.
  $SUDO rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* \
    "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/*
  # debootstrap copies the host's resolv.conf and hostname: a container gets its own.
  $SUDO rm -f "$root/etc/resolv.conf" "$root/etc/hostname"
  $SUDO tar --numeric-owner --xattrs -C "$root" -cf "$TARBALL.part" .
  $SUDO mv "$TARBALL.part" "$TARBALL"
  $SUDO rm -rf "$root"
  trap - EXIT
  # Older tarballs of other recipes are of no more use.
  find "$CACHE" -maxdepth 1 -name "base-*.tar" ! -name "$(basename "$TARBALL")" -delete
fi

if ! "${PODMAN[@]}" image exists "$RAW"; then
  log "podman import $TARBALL as $RAW"
  "${PODMAN[@]}" import \
    --change 'ENV=PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV=LANG=C.UTF-8' \
    --change 'CMD=["python3"]' \
    --message "debootstrap --variant=minbase $SUITE + python3 venv at /usr/local" \
    "$TARBALL" "$RAW" >/dev/null
fi

# --- 3. this machine's pip configuration on top, tagged as the Dockerfile's FROM ---
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# The configuration the host's pip uses, reduced to what reaches an index over
# the network (file:// indexes and find-links are paths on the host, not in the
# container), with the CA bundle it trusts (a TLS-intercepting proxy's CA, say).
python3 - "$work" <<'EOF'
import configparser, os, shutil, sys
from pathlib import Path

out = Path(sys.argv[1])
files = ["/etc/xdg/pip/pip.conf", "/etc/pip.conf",
         os.path.expanduser("~/.pip/pip.conf"), os.path.expanduser("~/.config/pip/pip.conf")]
if os.environ.get("PIP_CONFIG_FILE"):
    files.append(os.environ["PIP_CONFIG_FILE"])
cp = configparser.RawConfigParser()
cp.read([f for f in files if os.path.isfile(f)])
conf = {}
for section in ("global", "install", "download", "wheel"):
    if cp.has_section(section):
        for k, v in cp.items(section):
            conf.setdefault(k.replace("_", "-"), v)
for k in ("index-url", "extra-index-url", "trusted-host", "cert", "timeout", "default-timeout",
          "retries", "proxy"):
    env = os.environ.get("PIP_" + k.upper().replace("-", "_"))
    if env:
        conf[k] = env

def remote(urls):
    return [u for u in urls.split() if u.startswith(("http://", "https://"))]

lines = ["[global]"]
if remote(conf.get("index-url", "")):
    lines.append("index-url = " + remote(conf["index-url"])[0])
extra = remote(conf.get("extra-index-url", ""))
if extra:
    lines.append("extra-index-url = " + " ".join(extra))
for k in ("trusted-host", "retries", "proxy"):
    if conf.get(k):
        lines.append(f"{k} = {conf[k]}")
timeout = conf.get("timeout") or conf.get("default-timeout")
if timeout:
    lines.append("timeout = " + timeout)
ca = conf.get("cert") or os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("SSL_CERT_FILE")
if ca and os.path.isfile(ca):
    shutil.copy(ca, out / "ca-bundle.crt")
    lines.append("cert = /etc/ssl/certs/ci-host-ca-bundle.crt")
else:
    (out / "ca-bundle.crt").write_text("")
lines.append("disable-pip-version-check = true")
(out / "pip.conf").write_text("\n".join(lines) + "\n")
EOF
cat >"$work/Containerfile" <<EOF
FROM $RAW
COPY pip.conf /etc/pip.conf
COPY ca-bundle.crt /etc/ssl/certs/ci-host-ca-bundle.crt
# As in the official image: a current pip, and wheel beside setuptools (pip 23.0's
# sdist builds run setup.py bdist_wheel, which needs it: authres, dkimpy, pyspf).
RUN pip install --no-cache-dir --upgrade pip wheel
LABEL org.opencontainers.image.description="CI stand-in for $FROM_TAG: debootstrap $SUITE minbase, python3 venv at /usr/local"
EOF
log "base pip.conf: $(tr '\n' ' ' <"$work/pip.conf")"

# Short names resolve to the local image only, and nothing is ever pulled
# (--pull=never). Podman 4.3 already matches python:3.11-slim-bookworm to the local
# docker.io/library/python:3.11-slim-bookworm with no registries configured (as on
# this machine); this file pins that for a machine whose registries.conf says more.
cat >"$work/registries.conf" <<'EOF'
unqualified-search-registries = ["docker.io"]
short-name-mode = "permissive"
EOF
export CONTAINERS_REGISTRIES_CONF="$work/registries.conf"

"${PODMAN[@]}" build --pull=never --network=host --quiet -t "$FROM_TAG" -f "$work/Containerfile" "$work" >/dev/null

# --- 4. the project's Dockerfile ---------------------------------------------
log "podman build -t $IMAGE ."
"${PODMAN[@]}" build --pull=never --network=host --format docker -t "$IMAGE" . >"$CACHE/build.log" 2>&1 || {
  tail -n 60 "$CACHE/build.log" >&2
  log "podman build failed (whole log: $CACHE/build.log)"
  exit 1
}
"${PODMAN[@]}" image inspect --format '{{.Id}}' "$IMAGE"
