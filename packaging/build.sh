#!/bin/bash
# packaging/build.sh [deb] [rpm] — build the .deb and/or the .rpm (default: both) into
# target/packages/ (or $PKG_OUT). As root on Debian 12, with Rust from rustup.
#
#   1. `cargo build --release --locked` (skipped when ENCRYPTD_BIN names a built binary);
#   2. lays out one staging tree: the binary, systemd/encryptd.service,
#      systemd/encryptd-strict.service, systemd/encryptd-sync.service, etc/ (the examples), packaging/etc/ (what goes
#      to /etc/encryptd), docs/man/, README.md, docs/*.md for operators;
#   3. .deb: packaging/debian/ as its debian/, `dpkg-buildpackage -b` (debhelper);
#      .rpm: a tarball of the tree and packaging/rpm/encryptd.spec, `rpmbuild -bb`
#      (Debian's `rpm` package).
# The package builds themselves need no network and no Rust toolchain.
# Installs its build tools if missing (apt-get --no-install-recommends).
#
# Env: PKG_OUT (target/packages), ENCRYPTD_BIN (a prebuilt binary),
#      PKG_VERSION (default: Cargo.toml's version; another version, e.g. 0.1.0+t1 for an
#      upgrade test, gets a generated changelog entry on top of the packaged one).
set -euo pipefail
export LC_ALL=C.UTF-8
cd "$(dirname "$0")/.."
ROOT=$PWD
export HOME=${HOME:-$(getent passwd "$(id -u)" | cut -d: -f6)}
export PATH="$HOME/.cargo/bin:$PATH"
log() { echo "packaging: $*" >&2; }
die() { echo "packaging: error: $*" >&2; exit 1; }

want_deb=0 want_rpm=0
[ $# -eq 0 ] && set -- deb rpm
for a in "$@"; do
    case $a in
        deb) want_deb=1 ;;
        rpm) want_rpm=1 ;;
        *) die "usage: packaging/build.sh [deb] [rpm]" ;;
    esac
done

need=()
[ $want_deb = 1 ] && need+=(debhelper dpkg-dev)
[ $want_rpm = 1 ] && need+=(rpm)
missing=$(for p in "${need[@]}"; do
    dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q 'ok installed' || echo "$p"
done)
if [ -n "$missing" ]; then
    missing=$(echo $missing)
    log "installing $missing"
    compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null || apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >&2
fi

CARGO_VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)
VERSION=${PKG_VERSION:-$CARGO_VERSION}
OUT=${PKG_OUT:-$ROOT/target/packages}
mkdir -p "$OUT"

if [ -n "${ENCRYPTD_BIN:-}" ]; then
    BIN=$ENCRYPTD_BIN
else
    log "cargo build --release --locked"
    cargo build --release --locked >&2
    BIN=$ROOT/target/release/encryptd
fi
[ -x "$BIN" ] || die "no binary at $BIN"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/encryptd-pkg.XXXXXX")
if [ -n "${PKG_KEEP:-}" ]; then log "work dir kept: $WORK"; else trap 'rm -rf "$WORK"' EXIT; fi
S=$WORK/encryptd-$VERSION
mkdir -p "$S/etc" "$S/default" "$S/man" "$S/docs"
install -m 0755 "$BIN" "$S/encryptd"
cp systemd/encryptd.service systemd/encryptd-strict.service systemd/encryptd-sync.service "$S/"
cp etc/encryptd.toml etc/nodes.toml etc/ipsec.keys "$S/etc/"
cp packaging/etc/encryptd.toml "$S/default/"
cp docs/man/encryptd.8 docs/man/encryptd.toml.5 "$S/man/"
cp README.md LICENSE-MIT LICENSE-APACHE "$S/"
cp docs/firewalld.md docs/hello.md docs/metrics.md docs/status.md docs/strict.md docs/sync.md docs/wireguard.md "$S/docs/"
mkdir -p "$S/firewalld" && cp packaging/firewalld/encryptd.xml "$S/firewalld/"
# Shell completions, from the binary's own grammar (clap_complete).
mkdir -p "$S/completions"
"$BIN" completions bash >"$S/completions/encryptd.bash"
"$BIN" completions zsh >"$S/completions/_encryptd"
"$BIN" completions fish >"$S/completions/encryptd.fish"
# The man pages say which version they document.
sed -i "s/\"encryptd [0-9][^\"]*\"/\"encryptd $VERSION\"/" "$S"/man/*

if [ $want_deb = 1 ]; then
    cp -r packaging/debian "$S/debian"
    cp systemd/encryptd.service "$S/debian/encryptd.service"
    # dh_installsystemd --name=encryptd-strict looks for debian/PACKAGE.NAME.service.
    cp systemd/encryptd-strict.service "$S/debian/encryptd.encryptd-strict.service"
    cp systemd/encryptd-sync.service "$S/debian/encryptd.encryptd-sync.service"
    top=$(dpkg-parsechangelog -l "$S/debian/changelog" -S Version)
    if [ "$top" != "$VERSION" ]; then
        [ -n "${PKG_VERSION:-}" ] || die "packaging/debian/changelog is at $top, Cargo.toml at $VERSION: add a changelog entry"
        { printf 'encryptd (%s) unstable; urgency=medium\n\n  * Test build of %s.\n\n -- %s  %s\n\n' \
            "$VERSION" "$VERSION" \
            "$(dpkg-parsechangelog -l "$S/debian/changelog" -S Maintainer)" "$(date -R)"
          cat "$S/debian/changelog"; } >"$S/debian/changelog.new"
        mv "$S/debian/changelog.new" "$S/debian/changelog"
    fi
    log "dpkg-buildpackage -b ($VERSION)"
    ( cd "$S" && dpkg-buildpackage -b -us -uc ) >"$WORK/deb.log" 2>&1 \
        || { cat "$WORK/deb.log" >&2; die "dpkg-buildpackage failed"; }
    rm -rf "$S/debian"
    for f in "$WORK"/*.deb; do cp "$f" "$OUT/"; echo "$OUT/$(basename "$f")"; done
fi

if [ $want_rpm = 1 ]; then
    cp packaging/rpm/encryptd.preset "$S/"
    mkdir -p "$WORK/rpm/SOURCES"
    tar -C "$WORK" -czf "$WORK/rpm/SOURCES/encryptd-$VERSION.tar.gz" "encryptd-$VERSION"
    log "rpmbuild -bb ($VERSION)"
    # rpm's version may not contain '-'; '~' and '+' sort as in Debian.
    packager=$(dpkg-parsechangelog -l packaging/debian/changelog -S Maintainer)
    rpmbuild -bb --define "_topdir $WORK/rpm" --define "pkg_version $VERSION" \
        --define "packager $packager" \
        packaging/rpm/encryptd.spec >"$WORK/rpm.log" 2>&1 \
        || { cat "$WORK/rpm.log" >&2; die "rpmbuild failed"; }
    for f in "$WORK"/rpm/RPMS/*/*.rpm; do cp "$f" "$OUT/"; echo "$OUT/$(basename "$f")"; done
fi
