#!/bin/bash
# tests/vm/setup.sh — prepare (once, cached) the VM that runs the kernel tests, on Debian 12.
#   * host packages: qemu (TCG is enough) and the tools the tests run. The guest's root is the
#     host's /, so these are also the guest's tools.
#   * Debian's stock kernel (linux-image-*-amd64: ESP/XFRM, gcm, WireGuard, nf_tables),
#     *downloaded and extracted*, never installed: the host's boot setup is not touched.
#   * a ~2 MB initramfs: static busybox + virtio/9p/overlay + the modules the tests use.
# Idempotent and safe to run concurrently (flock). Everything lands in $VM_CACHE (~210 MB).
# First run: ~10 s plus apt; later runs: a few ms. Installing packages needs root; with every
# package present and the cache built, it runs as any user.
#
# Env: VM_CACHE (default ${XDG_CACHE_HOME:-~/.cache}/encryptd-kernel-vm),
#      PRELOAD (modules loaded from the initramfs; see below),
#      VM_EXTRA_PKGS (more packages to install in the same apt run; tests/run.sh uses it).
# The initramfs is rebuilt when this script changes; `rm -rf "$VM_CACHE"` starts over
# (it also picks up the newest kernel package).
set -euo pipefail
export LC_ALL=C
VM_CACHE=${VM_CACHE:-${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/encryptd-kernel-vm}
HERE=$(cd "$(dirname "$0")" && pwd)
log() { echo "vm setup: $*" >&2; }
die() { echo "vm setup: error: $*" >&2; exit 1; }
trap 'die "command failed at line $LINENO of $0"' ERR

# --- host packages -------------------------------------------------------------------------
# xz-utils: vmlinuz -> vmlinux; kmod: depmod/modprobe -d; cpio+gzip: the initramfs;
# procps: the guest watchdog's process list; openssl: the etcd cases' certificates.
# Without --no-install-recommends, wireguard-tools pulls a whole kernel and a systemd upgrade.
PKGS="qemu-system-x86 iproute2 iputils-ping nftables tcpdump wireguard-tools wireguard-go kmod cpio gzip xz-utils procps openssl ${VM_EXTRA_PKGS:-}"
apt_lists_present() { compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null; }
apt_update() { log "apt-get update"; apt-get update -qq >&2 || die "apt-get update failed"; }
missing=$(for p in $PKGS; do
    dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q 'ok installed' || echo "$p"
done)
if [ -n "$missing" ]; then
    missing=$(echo $missing)
    [ "$(id -u)" = 0 ] || die "missing packages ($missing); run this script as root once, or: apt-get install --no-install-recommends $missing"
    apt_lists_present || apt_update
    log "installing $missing"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >&2; then
        apt_update   # stale lists (a package version vanished from the mirror): once more
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >&2 \
            || die "apt-get install $missing failed"
    fi
fi

mkdir -p "$VM_CACHE"
exec 9>"$VM_CACHE/.lock"
flock 9                      # concurrent runs (several worktrees, parallel cargo) wait here

# `apt-get download` into a directory; stderr kept for the error message only.
download() {   # $1 = package, $2 = dir
    local err; err=$(mktemp)
    apt_lists_present || { [ "$(id -u)" = 0 ] || die "no apt package lists; run as root once"; apt_update; }
    if ! ( cd "$2" && apt-get download "$1" ) >/dev/null 2>"$err"; then
        if [ "$(id -u)" = 0 ]; then apt_update; fi
        ( cd "$2" && apt-get download "$1" ) >/dev/null 2>"$err" \
            || { cat "$err" >&2; rm -f "$err"; die "apt-get download $1 failed"; }
    fi
    rm -f "$err"
}

# --- the kernel ----------------------------------------------------------------------------
KDIR=$VM_CACHE/kernel
if [ ! -d "$KDIR/lib/modules" ]; then
    KPKG=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-/{print $2; exit}')
    [ -n "$KPKG" ] || die "cannot resolve linux-image-amd64 to a kernel package"
    log "downloading $KPKG"
    rm -rf "$VM_CACHE/debs" "$KDIR.tmp" && mkdir -p "$VM_CACHE/debs"
    download "$KPKG" "$VM_CACHE/debs"
    dpkg-deb -x "$VM_CACHE"/debs/"$KPKG"_*.deb "$KDIR.tmp"
    # keep net/crypto/lib/arch + the few drivers/filesystems a network test VM needs (405 -> ~125 MB)
    ( cd "$KDIR.tmp"/lib/modules/*/kernel && rm -rf sound block mm virt \
        $(ls -d drivers/* | grep -vE '^drivers/(net|virtio|char)$') \
        $(ls -d fs/* | grep -vE '^fs/(9p|overlayfs|netfs|fscache)$') )
    rm -rf "$VM_CACHE/debs"
    mv "$KDIR.tmp" "$KDIR"
fi
KV=$(ls "$KDIR/lib/modules" | awk 'NR==1')
[ -e "$KDIR/lib/modules/$KV/modules.dep" ] || depmod -b "$KDIR" "$KV"   # the .deb ships no modules.dep
# Uncompressed ELF vmlinux: qemu boots it through the PVH entry point, skipping SeaBIOS's
# real-mode path and the xz decompression (~3 s under TCG). Debian's amd64 kernels are
# CONFIG_KERNEL_XZ: the payload is the first xz stream inside the bzImage.
if [ ! -s "$KDIR/vmlinux" ]; then
    VMLINUZ=$KDIR/boot/vmlinuz-$KV
    off=$(grep -obUaP '\xfd7zXZ\x00' "$VMLINUZ" | awk -F: 'NR==1{print $1}')
    [ -n "$off" ] || die "no xz stream in $VMLINUZ"
    xz -dc --single-stream <(tail -c +$((off + 1)) "$VMLINUZ") >"$KDIR/vmlinux.tmp"
    mv "$KDIR/vmlinux.tmp" "$KDIR/vmlinux"
fi

# --- busybox (for the initramfs only; not installed on the host) ---------------------------
if [ ! -x "$VM_CACHE/busybox/bin/busybox" ]; then
    log "downloading busybox-static"
    T=$(mktemp -d)
    download busybox-static "$T"
    rm -rf "$VM_CACHE/busybox.tmp" && dpkg-deb -x "$T"/busybox-static_*.deb "$VM_CACHE/busybox.tmp"
    rm -rf "$T" "$VM_CACHE/busybox" && mv "$VM_CACHE/busybox.tmp" "$VM_CACHE/busybox"
fi

# --- etcd (the `encryptd sync` cases: a real cluster in namespaces) ------------------------
# Extracted, never installed: installing etcd-server would start a member on the host.
if [ ! -x "$VM_CACHE/etcd/usr/bin/etcd" ] || [ ! -x "$VM_CACHE/etcd/usr/bin/etcdctl" ]; then
    log "downloading etcd-server, etcd-client"
    T=$(mktemp -d)
    download etcd-server "$T"
    download etcd-client "$T"
    rm -rf "$VM_CACHE/etcd.tmp"
    for d in "$T"/etcd-*.deb; do dpkg-deb -x "$d" "$VM_CACHE/etcd.tmp"; done
    rm -rf "$T" "$VM_CACHE/etcd" && mv "$VM_CACHE/etcd.tmp" "$VM_CACHE/etcd"
fi

# --- the initramfs -------------------------------------------------------------------------
# Rebuilt when this script (its PRELOAD list, its init) or the kernel changes.
STAMP="$(sha256sum "$0" | cut -d' ' -f1) $KV ${PRELOAD-default}"
if [ -s "$VM_CACHE/initramfs.cpio.gz" ] && [ "$(cat "$VM_CACHE/initramfs.stamp" 2>/dev/null)" = "$STAMP" ]; then
    exit 0
fi
# Modules loaded from the initramfs: root-fs transport first, then what the tests use
# (insmod from RAM is much faster than modprobe over 9p under TCG, ~0.3 s each). Anything
# else still autoloads in the guest through kernel.modprobe -> modprobe -d $KDIR.
PRELOAD=${PRELOAD-esp4 esp6 xfrm_user xfrm_interface veth bridge dummy wireguard tun
    nf_tables nft_xfrm nft_ct nft_reject_inet gcm seqiv echainiv authenc ghash_generic ctr cbc hmac}
T=$(mktemp -d); trap 'rm -rf "$T"' EXIT
mkdir -p "$T"/{bin,dev,proc,sys,lower,upper,newroot,mods}
cp "$VM_CACHE/busybox/bin/busybox" "$T/bin/"
for a in sh mount umount mkdir insmod switch_root cat poweroff tr; do ln -s busybox "$T/bin/$a"; done
for m in virtio_pci 9pnet_virtio 9p overlay $PRELOAD; do
    modprobe -d "$KDIR" -S "$KV" --show-depends "$m" | awk '$1=="insmod"{print $2}' \
        || die "module $m not found in $KV"
done | awk '!seen[$0]++' | while read -r ko; do cp "$ko" "$T/mods/"; basename "$ko" >>"$T/mods/order"; done
cat >"$T/init" <<'INIT'
#!/bin/sh
# initramfs PID 1. Root = overlay(lower: host / over virtio-9p read-only, upper: tmpfs):
# the guest sees the host's files at the same paths, and whatever it writes stays in RAM.
# Then the control dir $CTL (rw 9p, tag ctl) and the extra rw dirs ($RWDIRS, tags rw0..)
# are mounted at their host paths, and $CTL/guest-init.sh takes over as PID 1.
fail() { echo "vm: $*"; poweroff -f; }
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in $(cat /mods/order); do insmod /mods/$m || echo "vm: insmod $m failed"; done
O=trans=virtio,version=9p2000.L,msize=512000
mount -t 9p -o $O,cache=loose,ro hostroot /lower || fail "9p root mount failed"
mount -t tmpfs tmpfs /upper && mkdir /upper/u /upper/w
mount -t overlay overlay -o lowerdir=/lower,upperdir=/upper/u,workdir=/upper/w /newroot || fail "overlay failed"
mount -t tmpfs tmpfs /newroot/run   # fresh /run: no stale host netns names / sockets
mkdir -p /newroot$CTL && mount -t 9p -o $O ctl /newroot$CTL || fail "ctl mount failed"
i=0
for d in $(echo "$RWDIRS" | tr ':' ' '); do
    mkdir -p /newroot$d && mount -t 9p -o $O rw$i /newroot$d || fail "rw mount $d failed"
    i=$((i+1))
done
umount /proc /sys /dev
exec switch_root /newroot /bin/bash "$CTL/guest-init.sh"
INIT
chmod +x "$T/init"
( cd "$T" && find . | cpio -o -H newc --quiet | gzip -1 ) >"$VM_CACHE/initramfs.cpio.gz.tmp"
mv "$VM_CACHE/initramfs.cpio.gz.tmp" "$VM_CACHE/initramfs.cpio.gz"
echo "$STAMP" >"$VM_CACHE/initramfs.stamp"
log "kernel $KV ($KDIR/vmlinux), initramfs $(du -h "$VM_CACHE/initramfs.cpio.gz" | cut -f1) with $(wc -l <"$T/mods/order") modules"
