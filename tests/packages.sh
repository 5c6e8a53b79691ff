#!/bin/bash
# tests/packages.sh — build the .deb and the .rpm, lint them, and install them on a clean
# Debian 12 root booted with systemd:   bash tests/packages.sh
#
# As root on Debian 12 (Rust from rustup). Not part of tests/run.sh: it downloads a
# Debian root once (debootstrap, 2-3 min, cached) and boots a VM under TCG. Measured
# here: 2 min 50 s with the root cached and the binary built; ~8.5 min from nothing.
#
#  1. packaging/build.sh: the .deb and .rpm of this tree, plus a second .deb/.rpm of the
#     same binary under a higher version (VERSION+pkgtest1) for the upgrade step.
#  2. lintian (pedantic, overrides in packaging/debian/encryptd.lintian-overrides) and
#     rpmlint (packaging/rpm/rpmlint.toml): any error or warning fails the test.
#  3. A clean Debian 12 root (debootstrap minbase + systemd, nftables, iproute2,
#     iputils-ping, kmod, procps, rpm), cached in $PKGTEST_CACHE; a copy of it (3 s; the
#     cached root stays clean) booted read-write over 9p, so that what the test installs
#     survives its reboot, under qemu, with Debian's stock kernel from the VM rig
#     (tests/vm/setup.sh), systemd as PID 1. No Docker here, and systemd-nspawn --boot
#     hangs silently in this sandbox; it would also run the host's kernel, which has no
#     ESP/gcm.
#  4. In the booted guest, tests/packages-guest.sh (run by a oneshot unit), with a peer
#     node in a network namespace: dpkg -i -> files, conffiles, no ipsec.keys,
#     /var/lib/encryptd 0700, unit enabled and NOT started; write a key and the
#     inventory; systemctl start -> `systemctl status` active with its STATUS= line
#     (1/1 peers up), SAs, pings through the tunnel; dpkg -i of the higher version ->
#     restarted (new PID), kernel objects adopted unchanged, no ping lost (every 50 ms),
#     the operator's conffile kept without a prompt; encryptd-strict.service enabled, and
#     with the daemon stopped and its table deleted (a boot), `systemctl restart` of it
#     puts the kept rules (strict.nft) back under its sandbox; then a real reboot
#     (`systemctl reboot`: systemd stops everything, reboot(2), qemu starts the same root
#     again) -> a new boot ID, the table in the kernel when the network unit (ordered
#     like Debian's networking.service) starts and when encryptd.service starts, and
#     systemd's own timestamps ordering encryptd-strict before network-pre.target;
#     the daemon and the peer up again; dpkg --purge -> stopped,
#     teardown, binary, both units, strict.nft and /var/lib/encryptd gone. Then the same
#     cycle for the .rpm (rpm -i/-U/-e --nodeps on the same Debian guest: its scriptlets
#     under real systemd, not a Rocky/Alma userland).
#
# Env: PKGTEST_CACHE (~/.cache/encryptd-pkgtest), VM_CACHE (the rig's), PKGTEST_TIMEOUT
#      (600 s for each boot of the VM), PKGTEST_KEEP=1 keeps the work dir (console-N.log:
#      the guest's kernel and systemd messages of boot N).
# Exit status 0 when everything passed; the last line is "N passed, M failed".
set -euo pipefail
export LC_ALL=C.UTF-8
cd "$(dirname "$0")/.."
ROOT=$PWD
export HOME=${HOME:-$(getent passwd "$(id -u)" | cut -d: -f6)}
export PATH="$HOME/.cargo/bin:$PATH"
T0=$SECONDS
say() { echo "==> $* ($((SECONDS - T0)) s)"; }
die() { echo "packages.sh: error: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root (apt, debootstrap, qemu's 9p root)"

CACHE=${PKGTEST_CACHE:-$HOME/.cache/encryptd-pkgtest}
mkdir -p "$CACHE"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/encryptd-pkgtest.XXXXXX")
if [ "${PKGTEST_KEEP:-0}" = 1 ]; then echo "packages.sh: work dir kept: $WORK"; else trap 'rm -rf "$WORK"' EXIT; fi

# --- tools ---------------------------------------------------------------------------------
PKGS="debhelper dpkg-dev lintian rpm rpm2cpio rpmlint debootstrap cpio gzip"
missing=$(for p in $PKGS; do
    dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q 'ok installed' || echo "$p"
done)
if [ -n "$missing" ]; then
    missing=$(echo $missing)
    say "apt-get install $missing"
    compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null || apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing
fi
# qemu, Debian's kernel (extracted, never installed) and busybox, cached by the rig.
tests/vm/setup.sh
VM_CACHE=${VM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/encryptd-kernel-vm}
KDIR=$VM_CACHE/kernel
KV=$(ls "$KDIR/lib/modules" | awk 'NR==1')

# --- 1. packages ---------------------------------------------------------------------------
say "build"
OUT=$WORK/out
PKG_OUT=$OUT bash packaging/build.sh deb rpm
VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)
NEXT=$VERSION+pkgtest1
PKG_OUT=$OUT PKG_VERSION=$NEXT ENCRYPTD_BIN=$ROOT/target/release/encryptd bash packaging/build.sh deb rpm
ls -l "$OUT"
DEB1=encryptd_${VERSION}_amd64.deb DEB2=encryptd_${NEXT}_amd64.deb
RPM1=encryptd-$VERSION-1.x86_64.rpm RPM2=encryptd-$NEXT-1.x86_64.rpm
for f in $DEB1 $DEB2 $RPM1 $RPM2; do [ -s "$OUT/$f" ] || die "not built: $f"; done

# --- 2. linters ----------------------------------------------------------------------------
say "lintian $DEB1"
# Informational tags shown too; errors and warnings fail.
lrc=0
lintian --info --display-info --pedantic --fail-on error,warning "$OUT/$DEB1" >"$WORK/lintian.txt" 2>&1 || lrc=$?
grep -v 'running with root privileges is not recommended' "$WORK/lintian.txt" || true
[ $lrc = 0 ] || die "lintian: errors or warnings (exit $lrc)"
say "rpmlint $RPM1"
rpmlint -c packaging/rpm/rpmlint.toml "$OUT/$RPM1" | tee "$WORK/rpmlint.txt"
grep -q ' 0 errors, 0 warnings' "$WORK/rpmlint.txt" || die "rpmlint: errors or warnings"
# The licence, as the packages state it: MIT OR Apache-2.0, with both texts.
dpkg-deb --fsys-tarfile "$OUT/$DEB1" | tar -xO ./usr/share/doc/encryptd/copyright >"$WORK/copyright"
grep -qx 'License: MIT or Apache-2.0' "$WORK/copyright" || die "deb copyright: no 'License: MIT or Apache-2.0'"
grep -q 'Permission is hereby granted' "$WORK/copyright" || die "deb copyright: no MIT text"
grep -q '/usr/share/common-licenses/Apache-2.0' "$WORK/copyright" || die "deb copyright: no Apache-2.0 reference"
[ "$(rpm -qp --qf '%{LICENSE}' "$OUT/$RPM1")" = "MIT OR Apache-2.0" ] || die "rpm License: is not MIT OR Apache-2.0"
for f in LICENSE-MIT LICENSE-APACHE; do
    rpm -qpL "$OUT/$RPM1" 2>/dev/null | grep -qx "/usr/share/licenses/encryptd/$f" || die "rpm: no %license $f"
done
say "licence: MIT OR Apache-2.0 in the .deb's copyright and the .rpm's License: and %license"

# The firewalld service, as both packages install it: well-formed (firewalld skips a
# file it cannot parse), ESP and the daemon's default ports, nothing else.
FW=usr/lib/firewalld/services/encryptd.xml
dpkg-deb --fsys-tarfile "$OUT/$DEB1" | tar -xO "./$FW" >"$WORK/fw-deb.xml" || die "deb: no /$FW"
( cd "$WORK" && rpm2cpio "$OUT/$RPM1" | cpio -i --quiet --to-stdout "./$FW" ) >"$WORK/fw-rpm.xml" || die "rpm: no /$FW"
hello=$(sed -n 's/.*port(t, "hello_port", \([0-9]*\)).*/\1/p' src/config/settings.rs)
listen=$(sed -n 's/.*port(t, "listen_port", \([0-9]*\)).*/\1/p' src/config/settings.rs)
for f in "$WORK/fw-deb.xml" "$WORK/fw-rpm.xml"; do
    got=$(python3 -c '
import sys, xml.etree.ElementTree as E
r = E.parse(sys.argv[1]).getroot()
assert r.tag == "service", r.tag
print(" ".join(sorted([c.tag + ":" + (c.get("value") or c.get("protocol") + "/" + c.get("port")) for c in r if c.tag in ("protocol", "port")])))
' "$f") || die "$FW: not a firewalld service file"
    [ "$got" = "port:udp/$hello port:udp/$listen protocol:esp" ] || die "$FW: got '$got', want ESP, udp/$hello, udp/$listen"
done
say "firewalld: /$FW in both packages: ESP, udp/$hello (hellos), udp/$listen (WireGuard)"

# --- 3. a clean Debian 12 root, booted with systemd ----------------------------------------
INCLUDE=systemd,systemd-sysv,nftables,iproute2,iputils-ping,kmod,procps,rpm
RDIR=$CACHE/bookworm-root
if [ "$(cat "$CACHE/root.stamp" 2>/dev/null)" != "$INCLUDE" ] || [ ! -x "$RDIR/lib/systemd/systemd" ]; then
    say "debootstrap bookworm (minbase + $INCLUDE; once, cached in $CACHE)"
    rm -rf "$RDIR" "$RDIR.tmp"
    debootstrap --variant=minbase --include="$INCLUDE" bookworm "$RDIR.tmp" http://deb.debian.org/debian \
        >"$WORK/debootstrap.log" 2>&1 || { tail -20 "$WORK/debootstrap.log"; die "debootstrap failed"; }
    rm -f "$RDIR.tmp"/etc/machine-id && touch "$RDIR.tmp"/etc/machine-id   # a new one per boot
    mv "$RDIR.tmp" "$RDIR"
    echo "$INCLUDE" >"$CACHE/root.stamp"
fi

# The control dir, shared read-write with the guest: the packages, the guest script, rc.
CTL=$WORK/ctl
mkdir -p "$CTL"
# The guest's root: a copy, written through, so that its reboot keeps what it installed.
cp -a "$RDIR" "$WORK/root"
cp "$OUT"/*.deb "$OUT"/*.rpm tests/packages-guest.sh "$CTL/"
printf 'VERSION=%q\nNEXT=%q\n' "$VERSION" "$NEXT" >"$CTL/env"
cat >"$CTL/pkgtest.service" <<'EOF'
[Unit]
Description=encryptd package test (tests/packages-guest.sh)
After=multi-user.target
[Service]
Type=oneshot
ExecStart=/bin/bash /ctl/packages-guest.sh
StandardOutput=tty
StandardError=inherit
TTYPath=/dev/ttyS1
TimeoutStartSec=infinity
# -immediate: straight to reboot(2); -force hangs unmounting the 9p root.
# /ctl/rc is already on the host (9p without a cache).
SuccessAction=poweroff-immediate
FailureAction=poweroff-immediate
[Install]
WantedBy=multi-user.target
EOF
# The guest's wire to its peer, brought up at boot as a network manager does: ordered
# like Debian's networking.service (after network-pre.target, before network.target).
# What it finds in the kernel when it starts is the proof that the strict table is in
# force before the network comes up.
cat >"$CTL/pkgtest-net.service" <<'EOF'
[Unit]
Description=encryptd package test: the wire to the peer (as ifupdown would)
DefaultDependencies=no
Wants=network.target
After=local-fs.target network-pre.target
Before=network.target network-online.target shutdown.target
Conflicts=shutdown.target
[Service]
Type=oneshot
RemainAfterExit=yes
ExecStartPre=/bin/sh -c 'nft list table inet encryptd >/run/pkgtest-table-at-network 2>&1 || true'
ExecStart=/bin/bash /ctl/packages-guest.sh wire
[Install]
WantedBy=multi-user.target network-online.target
EOF

# initramfs: busybox, the modules for the 9p root and for what the daemon uses
# (loaded from RAM: fast under TCG; the rest autoloads from the kernel's modules, which
# the guest sees at /lib/modules over 9p). The guest's root: the copy, read-write; then
# systemd is PID 1.
I=$WORK/initramfs
mkdir -p "$I"/{bin,dev,proc,sys,newroot,mods}
cp "$VM_CACHE/busybox/bin/busybox" "$I/bin/"
for a in sh mount umount mkdir insmod switch_root cat poweroff ln cp echo; do ln -s busybox "$I/bin/$a"; done
for m in virtio_pci 9pnet_virtio 9p esp4 esp6 xfrm_user dummy veth nf_tables nft_ct \
         nft_reject_inet nft_xfrm nft_chain_nat gcm seqiv echainiv authenc ghash_generic ctr cbc hmac; do
    modprobe -d "$KDIR" -S "$KV" --show-depends "$m" | awk '$1=="insmod"{print $2}' || die "module $m not in $KV"
done | awk '!seen[$0]++' | while read -r ko; do cp "$ko" "$I/mods/"; basename "$ko" >>"$I/mods/order"; done
cat >"$I/init" <<'EOF'
#!/bin/sh
fail() { echo "initramfs: $*"; poweroff -f; }
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in $(cat /mods/order); do insmod /mods/$m || echo "initramfs: insmod $m failed"; done
O=trans=virtio,version=9p2000.L,msize=512000
mount -t 9p -o $O,cache=loose root /newroot || fail "9p root mount failed"
mkdir -p /newroot/ctl /newroot/lib/modules
mount -t 9p -o $O ctl /newroot/ctl || fail "ctl mount failed"
mount -t 9p -o $O,ro mods /newroot/lib/modules || fail "modules mount failed"
S=/newroot/etc/systemd/system
cp /newroot/ctl/pkgtest.service $S/
ln -sf ../pkgtest.service $S/multi-user.target.wants/pkgtest.service
# No udev in the root: no device units, so no gettys (they would wait for them).
ln -sf /dev/null $S/getty.target
echo pkgtest >/newroot/etc/hostname
umount /proc /sys /dev
exec switch_root /newroot /lib/systemd/systemd
EOF
chmod +x "$I/init"
( cd "$I" && find . | cpio -o -H newc --quiet | gzip -1 ) >"$WORK/initramfs.cpio.gz"

TIMEOUT=${PKGTEST_TIMEOUT:-600}
boot() {   # $1: the boot's number. Returns when qemu has exited.
    say "boot $1 of the clean root under qemu (Debian kernel $KV, systemd); the guest's output follows"
    # Made before qemu starts: `tail -f` below gives up at once on a file not there yet,
    # and the guest's output (every check's line) would be lost from the log.
    : >"$WORK/guest-$1.out"
    timeout --kill-after=10 "$TIMEOUT" qemu-system-x86_64 \
        -machine "q35,accel=${VM_ACCEL:-tcg}" -cpu max -smp "${VM_SMP:-2}" -m "${VM_MEM:-1024}" \
        -nodefaults -no-user-config -nographic -no-reboot -monitor none \
        -serial "file:$WORK/console-$1.log" -serial stdio \
        -kernel "$KDIR/vmlinux" -initrd "$WORK/initramfs.cpio.gz" \
        -append "console=ttyS0 panic=-1 systemd.show_status=error" \
        -fsdev "local,id=root,path=$WORK/root,security_model=none,multidevs=remap" \
        -device virtio-9p-pci,fsdev=root,mount_tag=root \
        -fsdev "local,id=ctl,path=$CTL,security_model=none" \
        -device virtio-9p-pci,fsdev=ctl,mount_tag=ctl \
        -fsdev "local,id=mods,path=$KDIR/lib/modules,security_model=none,readonly=on" \
        -device virtio-9p-pci,fsdev=mods,mount_tag=mods </dev/null >"$WORK/guest-$1.out" &
    qpid=$!
    trap 'kill "$qpid" 2>/dev/null' INT TERM HUP
    tail -f --pid="$qpid" "$WORK/guest-$1.out" | tr -d '\r' &
    # Once the guest has written its result, it powers itself off; give it 30 s. A
    # reboot it asked for ends qemu (-no-reboot); the next boot starts the same root.
    while kill -0 "$qpid" 2>/dev/null && [ ! -s "$CTL/rc" ]; do sleep 1; done
    for _ in $(seq 30); do kill -0 "$qpid" 2>/dev/null || break; sleep 1; done
    kill "$qpid" 2>/dev/null && echo "packages.sh: the guest did not power off; qemu stopped"
    wait "$qpid"
    qrc=$?
    sleep 0.5
}
set +e
boot 1
# The guest touches /ctl/rebooting just before `systemctl reboot`.
if [ ! -s "$CTL/rc" ] && [ -e "$CTL/rebooting" ]; then boot 2; fi
set -e
CONSOLE=$WORK/console-1.log
[ -e "$WORK/console-2.log" ] && CONSOLE=$WORK/console-2.log
if [ ! -s "$CTL/rc" ]; then
    echo "packages.sh: the guest gave no result (qemu exit $qrc; $([ $qrc = 124 ] && echo "timed out after $TIMEOUT s")). Console log tail:" >&2
    tail -40 "$CONSOLE" >&2
    echo "0 passed, 1 failed"
    exit 1
fi
rc=$(cat "$CTL/rc")
say "done: guest exit $rc"
cat "$WORK"/guest-*.out | tr -d '\r' | grep -E '^[0-9]+ passed, [0-9]+ failed$' | tail -1
exit "$rc"
