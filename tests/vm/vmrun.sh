#!/bin/bash
# tests/vm/vmrun.sh CMD [ARGS...] — run one command as root inside a throw-away VM running
# Debian's stock kernel (qemu; TCG unless VM_ACCEL=kvm), with the host's / as the guest's root
# (copy-on-write, writes discarded), in the same working directory; returns its exit code.
#
# The command's stdout+stderr stream back on stdout (second serial port); the kernel log
# goes to console.log in a control dir. Exit code: the command's, or 125 when the VM gave
# none (setup failed, no boot, kernel panic, timeout), with the reason and the kernel log
# tail on stderr; the control dir is then kept for a look.
# Usable as a cargo runner:
#   CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER=$PWD/tests/vm/vmrun.sh cargo test --test kernel
# Env: VM_CACHE (see setup.sh), VM_RW="dir:dir" (host dirs the guest may write to),
#      VM_ENV="NAME NAME" (extra env vars to pass; RUST_*, CARGO_*, TESTS, NSPREFIX, CI, VM_CACHE always),
#      VM_SMP (2), VM_MEM (1024 MiB), VM_TIMEOUT (900 s, whole VM), VM_ACCEL (tcg),
#      VM_KEEP=1 keeps the control dir, VM_VERBOSE=1 reports boot and run times on stderr.
# The command sees ENCRYPTD_VM=1 (the kernel test harness then runs its cases directly).
set -u
VM_CACHE=${VM_CACHE:-${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/encryptd-kernel-vm}
export VM_CACHE
HERE=$(cd "$(dirname "$0")" && pwd)
TIMEOUT=${VM_TIMEOUT:-900}
[ $# -gt 0 ] || { echo "usage: vmrun.sh CMD [ARGS...]" >&2; exit 2; }
# Idempotent: ~0.15 s when everything is in place; rebuilds a stale initramfs.
"$HERE/setup.sh" || { echo "vm: setup failed ($HERE/setup.sh)" >&2; exit 125; }
KDIR=$VM_CACHE/kernel
CTL=$(mktemp -d "${TMPDIR:-/tmp}/encryptd-vm.XXXXXX")
keep=${VM_KEEP:-0}
cleanup() { if [ "$keep" = 1 ]; then echo "vm: control dir kept: $CTL" >&2; else rm -rf "$CTL"; fi; }
trap cleanup EXIT
cp "$HERE/guest-init.sh" "$CTL/"
{
    printf 'export PATH=%q HOME=/root ENCRYPTD_VM=1\n' "$PATH"
    printf 'cd %q || exit 126\n' "$PWD"
    for v in $(compgen -e | grep -E '^(RUST_|CARGO_|TESTS$|NSPREFIX$|CI$|VM_CACHE$)') ${VM_ENV:-}; do
        [ -n "${!v+x}" ] && printf 'export %s=%q\n' "$v" "${!v}"
    done
    printf 'exec'; printf ' %q' "$@"; printf '\n'
} >"$CTL/cmd.sh"
RWDEV=(); i=0
for d in $(echo "${VM_RW:-}" | tr ':' ' '); do
    RWDEV+=(-fsdev "local,id=rw$i,path=$d,security_model=none" -device "virtio-9p-pci,fsdev=rw$i,mount_tag=rw$i")
    i=$((i+1))
done
# The guest stops the command itself a little before the host's deadline, so that a hang
# is reported from inside (with a process list) and the output so far is kept.
GUEST_TIMEOUT=$((TIMEOUT > 60 ? TIMEOUT - 30 : TIMEOUT / 2))
t0=$(date +%s.%N)
timeout --kill-after=10 "$TIMEOUT" qemu-system-x86_64 \
    -machine "q35,accel=${VM_ACCEL:-tcg}" -cpu max -smp "${VM_SMP:-2}" -m "${VM_MEM:-1024}" \
    -nodefaults -no-user-config -nographic -no-reboot -monitor none \
    -serial "file:$CTL/console.log" -serial stdio \
    -kernel "$KDIR/vmlinux" -initrd "$VM_CACHE/initramfs.cpio.gz" \
    -append "console=ttyS0 panic=-1 CTL=$CTL KDIR=$KDIR RWDIRS=${VM_RW:-} GUEST_TIMEOUT=$GUEST_TIMEOUT" \
    -fsdev local,id=root,path=/,security_model=none,readonly=on,multidevs=remap \
    -device virtio-9p-pci,fsdev=root,mount_tag=hostroot \
    -fsdev "local,id=ctl,path=$CTL,security_model=none" \
    -device virtio-9p-pci,fsdev=ctl,mount_tag=ctl \
    "${RWDEV[@]}" </dev/null &
qpid=$!
# `timeout` runs qemu in its own process group, so a Ctrl-C (or a TERM to this script)
# would not reach it and the VM would run on: pass it on (timeout forwards it to qemu).
interrupted=
trap 'interrupted=1; kill -TERM "$qpid" 2>/dev/null' INT TERM HUP
wait "$qpid"
qrc=$?
while kill -0 "$qpid" 2>/dev/null; do wait "$qpid"; qrc=$?; done
if [ -n "$interrupted" ]; then
    echo "vm: interrupted; VM stopped" >&2
    exit 130
fi
wall=$(awk -v a="$(date +%s.%N)" -v b="$t0" 'BEGIN{printf "%.1f", a-b}')
if [ "${VM_VERBOSE:-0}" = 1 ]; then
    echo "vm: command started at $(cat "$CTL/boot_s" 2>/dev/null || echo "?") s guest uptime; VM wall time ${wall} s" >&2
fi
if [ -s "$CTL/rc" ]; then exit "$(cat "$CTL/rc")"; fi
keep=1
case $qrc in
    124|137) why="timed out after $TIMEOUT s (VM_TIMEOUT)" ;;
    *) why="gave no exit code (qemu exit status $qrc, after ${wall} s)" ;;
esac
if [ -s "$CTL/boot_s" ]; then
    why="$why; the command had started at $(cat "$CTL/boot_s") s guest uptime"
else
    why="$why; the guest never started the command (boot failed?)"
fi
echo "vm: FAILED: the VM $why. Kernel log tail ($CTL/console.log):" >&2
# (SeaBIOS's terminal escapes and the \r of the serial console stripped)
tail -n 30 "$CTL/console.log" 2>/dev/null | sed 's/\x1b\[[0-9;?]*[A-Za-z]//g; s/\r//g; s/^/    /' >&2
echo >&2
exit 125
