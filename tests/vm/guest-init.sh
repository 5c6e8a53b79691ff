#!/bin/bash
# PID 1 in the guest (after switch_root). From the kernel command line: $CTL (the control
# dir: cmd.sh in; rc, boot_s out), $KDIR (the extracted kernel), $GUEST_TIMEOUT (seconds).
# The command's stdout+stderr go to the host over ttyS1; the kernel log goes to ttyS0.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
mkdir -p /dev/pts /dev/shm; mount -t devpts devpts /dev/pts; mount -t tmpfs tmpfs /dev/shm
ip link set lo up
# module autoload (crypto algs, nft expressions, ...) from the extracted kernel package
printf '#!/bin/sh\nexec /sbin/modprobe -d %s "$@"\n' "$KDIR" >/run/modprobe && chmod +x /run/modprobe
echo /run/modprobe >/proc/sys/kernel/modprobe
stty -F /dev/ttyS1 raw -echo 2>/dev/null        # ttyS1 = the host's stdout; no \r\n mangling
cut -d' ' -f1 /proc/uptime >"$CTL/boot_s"       # guest uptime when the command starts

# The command writes into a FIFO that one `cat` copies to ttyS1: programs see a non-tty
# stdout (no colours, as in CI), and we wait for the command itself, not for whatever it
# left running in the background still holding the pipe.
mkfifo /run/vm-out
cat /run/vm-out >/dev/ttyS1 &
reader=$!
bash "$CTL/cmd.sh" </dev/null >/run/vm-out 2>&1 &
cmd=$!
# Guest-side watchdog, shorter than the host's timeout: say what was still running, then
# stop the command, so that a hang ends as an ordinary failure with its output intact.
(
    trap 'kill "$nap" 2>/dev/null; exit 0' TERM
    sleep "${GUEST_TIMEOUT:-570}" & nap=$!
    wait "$nap"
    {
        echo "vm: the command is still running after ${GUEST_TIMEOUT:-570} s; processes:"
        ps -eo pid,ppid,etimes,stat,wchan:20,args 2>/dev/null | grep -v '\[.*\]$'
        echo "vm: kernel log tail:"
        dmesg 2>/dev/null | tail -n 20
    } >/dev/ttyS1 2>&1
    kill -TERM "$cmd"; sleep 5; kill -KILL "$cmd" 2>/dev/null
) </dev/null >/dev/null 2>&1 &
watchdog=$!
wait "$cmd"
rc=$?
kill "$watchdog" 2>/dev/null; wait "$watchdog"
# Whatever the command left behind (daemons, captures) would keep the FIFO open: end it,
# so the reader sees EOF once it has copied everything already written.
leaked=
for p in /proc/[0-9]*; do
    pid=${p#/proc/}
    case $pid in 1|"$reader"|"$BASHPID") continue ;; esac
    argv0=
    IFS= read -r -d '' argv0 <"$p/cmdline" 2>/dev/null  # no forks here: they cost ~20 ms each
    [ -n "$argv0" ] || continue                  # kernel threads, or already gone
    leaked="$leaked $pid:${argv0##*/}"
    kill -KILL "$pid" 2>/dev/null
done
wait "$reader"                                   # closing ttyS1 waits until it is drained
if [ -n "$leaked" ]; then
    printf 'vm: killed processes left running after the command:%s\n' "$leaked" >/dev/ttyS1
fi
echo "$rc" >"$CTL/rc"
sync
echo o >/proc/sysrq-trigger 2>/dev/null          # power off -> qemu exits
perl -e 'syscall(169, 0xfee1dead, 672274793, 0x4321fedc, 0)'   # reboot(2) fallback
