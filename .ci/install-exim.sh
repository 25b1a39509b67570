#!/usr/bin/env bash
# Exim 4 unpacked beside Postfix for the interop tests (tests/support/mta.py).
# Debian's exim4 packages conflict with postfix (installing one removes the
# other), so the .debs are downloaded and unpacked into a prefix, never
# installed. Only the shared libraries the binary links against are installed
# with apt (ordinary libraries, no conflict). Idempotent: a prefix that already
# holds a working binary is left as it is.
set -euo pipefail

PREFIX="${GATEWAY_TEST_EXIM_PREFIX:-/opt/smtp-gateway-test/exim}"
BIN="$PREFIX/usr/sbin/exim4"
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive

# The libraries exim4-daemon-light links against (Depends of the package).
$SUDO apt-get install -y -qq --no-install-recommends \
  libdb5.3 libgnutls-dane0 libgnutls30 libidn12 libidn2-0 libnsl2 libpcre2-8-0 libcrypt1 \
  >/dev/null

# The Debian binary is built with EXIM_USER=ref:Debian-exim and looks that
# name up at startup, before it reads any configuration (exim_user in the
# config comes too late): without the account every exim command fails with
# 'failed to find uid for user name "Debian-exim"'. The package's postinst
# would create it; unpacked, nothing does. The tests run Exim as another
# (existing) user through exim_user; this account only has to exist.
if ! getent passwd Debian-exim >/dev/null; then
  $SUDO useradd --system --user-group --no-create-home --home-dir /nonexistent \
    --shell /usr/sbin/nologin Debian-exim
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
# -bV reads a configuration; the default one (/etc/exim4) is not there.
: >"$tmp/empty.conf"
runs() { [ -x "$BIN" ] && "$BIN" -C "$tmp/empty.conf" -bV >/dev/null 2>&1; }

if runs; then
  exit 0
fi

# apt-get download writes into the current directory and runs as the _apt
# user where it can: give it a directory it may write.
chmod 0777 "$tmp"
(cd "$tmp" && apt-get download -qq exim4-daemon-light exim4-base exim4-config)
$SUDO mkdir -p "$PREFIX"
for deb in "$tmp"/*.deb; do
  $SUDO dpkg-deb -x "$deb" "$PREFIX"
done
if ! runs; then
  "$BIN" -C "$tmp/empty.conf" -bV >&2 || true
  echo "install-exim: $BIN does not run; missing libraries:" >&2
  ldd "$BIN" | grep 'not found' >&2 || true
  exit 1
fi
