#!/bin/bash
# tests/packages-guest.sh — runs inside the VM that tests/packages.sh boots: a clean
# Debian 12 root with systemd as PID 1, the packages in /ctl. Writes its exit status to
# /ctl/rc; the unit that runs it powers the VM off afterwards.
#
# One cycle per package format: install (enabled, not started), configure and start
# (`systemctl status` active, STATUS= line), upgrade (restarted, kernel objects adopted),
# encryptd-strict.service (enabled; with the daemon stopped and the table gone, as at a
# boot, it puts the kept rules back under systemd's sandbox), purge/erase (stopped,
# teardown, units and state gone). Between the .deb's strict step and its purge, a real
# reboot: this script runs again in the second boot (/ctl/boot1 says which boot it is)
# and carries its counts over in /ctl/counts.
#
# `packages-guest.sh wire` (pkgtest-net.service, at every boot): only the wire.
set -u
. /ctl/env
export LC_ALL=C.UTF-8 SYSTEMD_PAGER= SYSTEMD_COLORS=0
# The wire: this node (192.0.2.10, subnet 10.99.1.0/24 behind it) and one peer in a
# network namespace (192.0.2.11, 10.99.2.0/24), over a veth pair. The peer runs
# encryptd by hand (not a unit), so the unit under test has a real tunnel: READY=1
# when the peer is up, SAs that an upgrade must not drop, pings across the upgrade.
wire() {
    ip netns add peer
    ip link add veth0 type veth peer name veth1 netns peer
    ip link set veth0 up && ip addr add 192.0.2.10/24 dev veth0
    ip route add default via 192.0.2.1 dev veth0 onlink   # the IPsec link: the default route's
    ip link add sub0 type dummy && ip link set sub0 up && ip addr add 10.99.1.1/24 dev sub0
    ip route add 10.99.2.0/24 via 192.0.2.11
    ip -n peer link set lo up && ip -n peer link set veth1 up && ip -n peer addr add 192.0.2.11/24 dev veth1
    ip -n peer route add default via 192.0.2.10
    ip -n peer link add sub0 type dummy && ip -n peer link set sub0 up && ip -n peer addr add 10.99.2.1/24 dev sub0
}
if [ "${1:-}" = wire ]; then wire; exit; fi
PASS=0 FAIL=0
[ -e /ctl/counts ] && . /ctl/counts
ok() { PASS=$((PASS + 1)); echo "  ok   $*"; }
bad() { FAIL=$((FAIL + 1)); echo "  FAIL $*"; }
check() { local what=$1; shift; if "$@"; then ok "$what"; else bad "$what"; fi; }
eq() { [ "$1" = "$2" ] || { echo "       got \"$1\", want \"$2\""; return 1; }; }
section() { echo; echo "=== $* ($(cut -d' ' -f1 /proc/uptime) s uptime)"; }
finish() {
    echo; echo "$PASS passed, $FAIL failed"
    if [ $FAIL = 0 ]; then echo 0 >/ctl/rc; else echo 1 >/ctl/rc; fi
    # Power off from here, straight through reboot(2) (the unit's SuccessAction did not
    # fire reliably: the guest stayed up after the script had ended).
    sync; systemctl poweroff -ff; exit 0
}
trap finish EXIT

# (Not `is-system-running --wait`: this unit is part of the boot, which would wait for it.)
section "the system: $(. /etc/os-release; echo "$PRETTY_NAME"), kernel $(uname -r), PID 1 $(cat /proc/1/comm), $(systemctl is-system-running)"
systemctl --failed --no-legend | sed 's/^/       failed unit: /'
if [ ! -e /ctl/boot1 ]; then
    # The wire as the network manager of this test brings it up at every boot.
    cp /ctl/pkgtest-net.service /etc/systemd/system/ && systemctl daemon-reload
    systemctl enable --now pkgtest-net.service 2>&1 | sed 's/^/       | /'
fi
P=/run/peer
start_peer() {   # after configure: the same inventory and key, its own boot ID
    rm -rf $P && mkdir -p $P && cp /usr/bin/encryptd /etc/encryptd/nodes.toml /etc/encryptd/ipsec.keys $P/
    cat /proc/sys/kernel/random/uuid >$P/boot_id
    printf 'mode = "ipsec"\nnode = "peer"\nruntime_dir = "run"\nstate_dir = "state"\nboot_id_path = "boot_id"\n' >$P/encryptd.toml
    ip netns exec peer $P/encryptd run --config $P/encryptd.toml 2>>/ctl/peer.log &
    echo $! >$P/pid
}
stop_peer() {
    kill "$(cat $P/pid)"; wait "$(cat $P/pid)" 2>/dev/null
    ip -n peer xfrm policy flush; ip -n peer xfrm state flush
}

kernel_objects() {   # what encryptd made in the kernel, without counters
    # Not the hello socket's own bypass policies (`socket in/out`): they belong to the
    # process's socket, go with it and are new after every restart.
    ip xfrm policy | awk '/^src/ { if (r !~ /socket (in|out)/) printf "%s", r; r = "" } { r = r $0 "\n" }
                          END { if (r !~ /socket (in|out)/) printf "%s", r }'
    ip xfrm state | grep -E '^src|proto esp'; nft -s list table inet encryptd 2>/dev/null
}

configure() {   # what the operator (Ansible) writes after installing the package
    cat >/etc/encryptd/encryptd.toml <<'EOF'
mode = "ipsec"
node = "pkgtest"
[strict]
enabled = true
cidrs = ["10.99.0.0/16"]
exceptions = [{ proto = "tcp", port = 22 }]
[metrics]
path = "/var/lib/prometheus/node-exporter/encryptd.prom"
EOF
    # As Debian's prometheus-node-exporter makes it: root 0755.
    install -d -m 0755 /var/lib/prometheus/node-exporter
    cat >/etc/encryptd/nodes.toml <<'EOF'
[[node]]
name = "pkgtest"
addresses = ["192.0.2.10"]
subnets = ["10.99.1.0/24"]
[[node]]
name = "peer"
addresses = ["192.0.2.11"]
subnets = ["10.99.2.0/24"]
EOF
    (umask 077; echo "1+ rfc4106(gcm(aes)) $(head -c 20 /dev/urandom | od -An -tx1 | tr -d ' \n') 128" \
        >/etc/encryptd/ipsec.keys)
}

after_install() {   # $1 = the unit's directory for this format
    # (Debian 12 is merged-/usr: systemd names /lib/... for a unit in /usr/lib/...)
    check "unit file at $1" eq "$(readlink -f "$(systemctl show -p FragmentPath --value encryptd)")" \
        "$(readlink -f "$1/encryptd.service")"
    check "the package owns $1/encryptd.service" test -s "$1/encryptd.service"
    check "enabled on install" eq "$(systemctl is-enabled encryptd)" enabled
    check "not started on install" eq "$(systemctl is-active encryptd)" inactive
    check "/usr/bin/encryptd runs" /usr/bin/encryptd --version
    check "no /etc/encryptd/ipsec.keys installed" test ! -e /etc/encryptd/ipsec.keys
    check "ipsec.keys only as an example" test -s /usr/share/doc/encryptd/examples/ipsec.keys
    check "/etc/encryptd/encryptd.toml installed" test -s /etc/encryptd/encryptd.toml
    check "no /etc/encryptd/nodes.toml installed" test ! -e /etc/encryptd/nodes.toml
    check "the annotated examples in /usr/share/doc/encryptd/examples" \
        test -s /usr/share/doc/encryptd/examples/encryptd.toml -a -s /usr/share/doc/encryptd/examples/nodes.toml
    check "docs/metrics.md and docs/status.md shipped" \
        sh -c 'ls /usr/share/doc/encryptd/ | grep -q "^metrics.md" && ls /usr/share/doc/encryptd/ | grep -q "^status.md"'
    unconfigured
    check "/var/lib/encryptd is 0700 root" eq "$(stat -c '%a %U' /var/lib/encryptd)" "700 root"
    check "man page encryptd(8)" test -s /usr/share/man/man8/encryptd.8.gz
    check "man page encryptd.toml(5)" test -s /usr/share/man/man5/encryptd.toml.5.gz
    # The completion bash loads on demand completes a command and a command's option.
    check "bash completes 'encryptd st' and 'encryptd status --p'" eq "$(bash -c '
        . /usr/share/bash-completion/completions/encryptd || exit 1
        COMP_WORDS=(encryptd st) COMP_CWORD=1; _encryptd encryptd st encryptd; a=${COMPREPLY[*]}
        COMP_WORDS=(encryptd status --p) COMP_CWORD=2; _encryptd encryptd --p status
        echo "$a ${COMPREPLY[*]}"')" "status --peer"
    check "zsh and fish completions" sh -c '
        grep -q "#compdef encryptd" /usr/share/zsh/vendor-completions/_encryptd /usr/share/zsh/site-functions/_encryptd 2>/dev/null &&
        grep -q "complete -c encryptd" /usr/share/fish/vendor_completions.d/encryptd.fish'
}

unconfigured() {   # installed, nobody configured it: told what to write, nothing failed
    local want="/etc/encryptd/nodes.toml:1:1: this node is not configured yet"
    check "encryptd check: not configured, one line" eq "$(encryptd check 2>&1 | sed -n 1p | cut -c1-${#want}) $(encryptd check >/dev/null 2>&1; echo $?)" "$want 1"
    # What a boot does: the same start job, skipped by ExecCondition=. (Result= is no
    # help: it keeps the last run's across a skip.)
    local since; since=$(date +%s); sleep 1
    systemctl start encryptd
    check "start on an unconfigured node: inactive, not failed" eq "$(systemctl show -p ActiveState --value encryptd)" inactive
    check "nothing failed (systemctl --failed)" eq "$(systemctl list-units --failed --plain --no-legend | grep -c encryptd)" 0
    check "systemd says: skipped by its condition" sh -c \
        "journalctl --since @$since --no-pager | grep -q 'encryptd.service.*being skipped'"
    check "the journal says what to write" sh -c \
        "journalctl --since @$since -u encryptd --no-pager | grep -q 'not configured yet: write the inventory'"
    check "nothing in the kernel" eq "$(ip xfrm policy | grep -c '^src') $(nft list table inet encryptd >/dev/null 2>&1; echo $?)" "0 1"
}

start_and_status() {
    configure
    check "encryptd check accepts the configuration" encryptd check
    start_peer
    check "systemctl start encryptd" systemctl start encryptd
    systemctl status encryptd --no-pager --lines=5 | sed 's/^/       | /'
    check "active (running)" eq "$(systemctl show -p ActiveState,SubState --value encryptd | tr '\n' ' ')" "active running "
    check "STATUS= line" eq "$(systemctl show -p StatusText --value encryptd)" "ipsec: 1/1 peers up, key 1, strict on"
    check "XFRM policies installed" test "$(ip xfrm policy | grep -c '^src')" -gt 0
    check "SAs to the peer installed" test "$(ip xfrm state | grep -c '^src')" -gt 0
    check "ping through the tunnel" ping -q -c 2 -W 5 -I 10.99.1.1 10.99.2.1
    check "strict table installed" sh -c 'nft list table inet encryptd >/dev/null'
    # The metrics, out of the box: written through the unit's sandbox, readable by
    # node_exporter's unprivileged user.
    local prom=/var/lib/prometheus/node-exporter/encryptd.prom
    check "metrics file written by the unit, 0644 root" eq "$(stat -c '%a %U' $prom 2>&1)" "644 root"
    check "metrics readable by an unprivileged user" sh -c \
        "setpriv --reuid=65534 --regid=65534 --clear-groups cat $prom | grep -qx 'encryptd_peers_up 1'"
    check "encryptd status: exit 0, ENCRYPTD OK" eq "$(encryptd status | sed -n 1p) $(encryptd status >/dev/null; echo $?)" \
        "ENCRYPTD OK - 1 of 1 peers up 0"
}

ping_start() { ping -n -i 0.05 -W 1 -I 10.99.1.1 10.99.2.1 >/run/ping.out 2>&1 & echo $! >/run/ping.pid; sleep 1; }
ping_stop() {   # prints "sent received"
    sleep 1; kill -INT "$(cat /run/ping.pid)"; wait "$(cat /run/ping.pid)" 2>/dev/null
    sed -n 's/^\([0-9]*\) packets transmitted, \([0-9]*\) received.*/\1 \2/p' /run/ping.out
}

same_objects() {   # $1 = kernel_objects before; on a difference, shows it
    local now; now=$(kernel_objects)
    [ "$now" = "$1" ] && return 0
    diff <(echo "$1") <(echo "$now") | head -20 | sed 's/^/       | /'; return 1
}

upgraded() {   # $1 = MainPID before, $2 = kernel objects before, $3 = "sent received" pings
    check "active after the upgrade" eq "$(systemctl is-active encryptd)" active
    local pid; pid=$(systemctl show -p MainPID --value encryptd)
    check "restarted by the upgrade (MainPID $1 -> $pid)" test "$pid" != "$1" -a "$pid" != 0
    check "kernel objects adopted unchanged (not flushed)" same_objects "$2"
    check "STATUS= line after the upgrade" eq "$(systemctl show -p StatusText --value encryptd)" "ipsec: 1/1 peers up, key 1, strict on"
    check "the operator's encryptd.toml kept" grep -q '^node = "pkgtest"' /etc/encryptd/encryptd.toml
    local sent=${3% *} recv=${3#* }
    check "no ping lost across the upgrade ($recv of $sent answered, every 50 ms)" test -n "$3" -a "$sent" = "$recv" -a "${sent:-0}" -gt 0
}

strict_at_boot() {   # encryptd-strict.service: the rules the daemon kept, installed at boot
    check "encryptd-strict.service enabled" eq "$(systemctl is-enabled encryptd-strict.service)" enabled
    # configure() turned strict mode on ([strict] enabled, the subnets' 10.99.0.0/16,
    # tcp/22 excepted), so the running daemon keeps its table in strict.nft.
    check "the daemon keeps its strict rules in /var/lib/encryptd/strict.nft" test -s /var/lib/encryptd/strict.nft
    local table; table=$(nft -s list table inet encryptd 2>&1)
    # A boot, as far as strict mode is concerned: no daemon, no table in the kernel.
    systemctl stop encryptd
    nft delete table inet encryptd
    check "(simulated boot) daemon stopped, no strict table" \
        eval '[ "$(systemctl is-active encryptd)" = inactive ] && ! nft list table inet encryptd >/dev/null 2>&1'
    check "systemctl restart encryptd-strict.service" systemctl restart encryptd-strict.service
    systemctl status encryptd-strict --no-pager --lines=3 | sed 's/^/       | /'
    # Not only the exit status of systemctl: a failed condition (no file) passes too, and
    # a syscall the filter forbids kills nft with SIGSYS (ExecMainCode=2, status 31).
    # (show prints properties in the bus's order, not in -p's: sorted.)
    check "encryptd-strict.service ran nft under its sandbox: condition met, exited 0" \
        eq "$(systemctl show -p ConditionResult,Result,ExecMainCode,ExecMainStatus encryptd-strict | sort | tr '\n' ' ')" \
        "ConditionResult=yes ExecMainCode=1 ExecMainStatus=0 Result=success "
    check "strict table back (nft list table inet encryptd)" sh -c 'nft list table inet encryptd >/dev/null'
    check "the daemon's rules, unchanged" eq "$(nft -s list table inet encryptd 2>&1)" "$table"
    # Running again for the purge/erase (which stops it first).
    check "systemctl start encryptd (adopts the table)" systemctl start encryptd
}

status_within() {   # $1 seconds for encryptd's STATUS= line to become $2
    local i got
    for i in $(seq "$1"); do
        got=$(systemctl show -p StatusText --value encryptd)
        [ "$got" = "$2" ] && return 0
        sleep 1
    done
    echo "       got \"$got\", want \"$2\""; return 1
}

mono() { systemctl show -p "$2" --value "$1"; }   # a unit's timestamp (µs since boot)

after_reboot() {   # the second boot: the strict table came before the network and the daemon
    check "a new boot (boot ID $(cat /ctl/boot1) -> $(cat /proc/sys/kernel/random/boot_id))" \
        test "$(cat /proc/sys/kernel/random/boot_id)" != "$(cat /ctl/boot1)"
    check "encryptd-strict.service ran at boot: condition met, exited 0" \
        eq "$(systemctl show -p ConditionResult,Result,ExecMainCode,ExecMainStatus encryptd-strict | sort | tr '\n' ' ')" \
        "ConditionResult=yes ExecMainCode=1 ExecMainStatus=0 Result=success "
    local strict pre net daemon
    strict=$(mono encryptd-strict.service ExecMainExitTimestampMonotonic)
    pre=$(mono network-pre.target ActiveEnterTimestampMonotonic)
    net=$(mono pkgtest-net.service ExecMainStartTimestampMonotonic)
    daemon=$(mono encryptd.service ExecMainStartTimestampMonotonic)
    echo "       | µs since boot: encryptd-strict done $strict, network-pre.target $pre, network unit $net, encryptd $daemon"
    check "systemd's order: encryptd-strict done < network-pre.target < the network unit < encryptd" \
        test "${strict:-0}" -gt 0 -a "$strict" -lt "${pre:-0}" -a "$pre" -lt "${net:-0}" -a "$net" -lt "${daemon:-0}"
    check "the strict table in the kernel when the network unit started" \
        eq "$(grep -c -e '^table inet encryptd' -e ' drop' /run/pkgtest-table-at-network 2>/dev/null)" \
        "$(grep -c -e '^table inet encryptd' -e ' drop' /ctl/table-before-reboot)"
    check "the strict table in the kernel when encryptd.service started" \
        eq "$(grep -c -e '^table inet encryptd' -e ' drop' /run/pkgtest-table-at-encryptd 2>/dev/null)" \
        "$(grep -c -e '^table inet encryptd' -e ' drop' /ctl/table-before-reboot)"
    check "the table kept across the reboot: the daemon's rules (nft -s)" \
        eq "$(nft -s list table inet encryptd 2>&1)" "$(cat /ctl/table-before-reboot)"
    start_peer
    check "after the reboot: 1/1 peers up (STATUS= line, within 60 s)" status_within 60 "ipsec: 1/1 peers up, key 1, strict on"
    check "after the reboot: ping through the tunnel" ping -q -c 2 -W 5 -I 10.99.1.1 10.99.2.1
    rm -rf /etc/systemd/system/encryptd.service.d && systemctl daemon-reload
}

removed() {   # $1 = output of the purge/erase, $2 = what may stay in /etc/encryptd, $3 = what stays in /var/lib/encryptd (empty: the directory goes)
    check "stopped" eq "$(systemctl is-active encryptd)" inactive
    check "unit gone" eq "$(systemctl show -p LoadState --value encryptd)" not-found
    check "encryptd-strict.service unit gone" eq "$(systemctl show -p LoadState --value encryptd-strict)" not-found
    check "encryptd-strict.service no longer enabled (no sysinit.target.wants link)" \
        eval '! test -L /etc/systemd/system/sysinit.target.wants/encryptd-strict.service'
    check "/var/lib/encryptd/strict.nft gone" test ! -e /var/lib/encryptd/strict.nft
    check "/usr/bin/encryptd gone" test ! -e /usr/bin/encryptd
    if [ -z "${3:-}" ]; then
        check "/var/lib/encryptd gone" test ! -e /var/lib/encryptd
    else
        check "/var/lib/encryptd kept, 0700 root" eq "$(stat -c '%a %U' /var/lib/encryptd 2>&1)" "700 root"
        check "left in /var/lib/encryptd: $3" eq "$(ls -A /var/lib/encryptd 2>&1 | tr '\n' ' ')" "$3"
    fi
    check "left in /etc/encryptd: $2" eq "$(ls -A /etc/encryptd 2>&1 | tr '\n' ' ')" "$2"
    if grep -q 'unknown command "teardown"' <<<"$1"; then
        echo "  NOTE encryptd teardown was called but this binary does not have it yet: the kernel"
        echo "       objects stay ($(ip xfrm policy | grep -c '^src') XFRM policies; strict table" \
            "$(nft list table inet encryptd >/dev/null 2>&1 && echo present || echo absent))"
        ip xfrm policy flush; ip xfrm state flush; nft delete table inet encryptd 2>/dev/null
    else
        check "teardown: no XFRM policies or states left" eq "$(ip xfrm policy; ip xfrm state)" ""
        check "teardown: no strict table left" eval '! nft list table inet encryptd >/dev/null 2>&1'
    fi
    rm -rf /etc/encryptd
}

if [ ! -e /ctl/boot1 ]; then   # the first boot: up to the reboot
section ".deb: dpkg -i encryptd_${VERSION}_amd64.deb"
dpkg -i /ctl/encryptd_${VERSION}_amd64.deb </dev/null 2>&1 | sed 's/^/       | /'
check "dpkg -i" test "${PIPESTATUS[0]}" = 0
after_install /lib/systemd/system
check "conffiles" eq "$(dpkg-query -W -f='${Conffiles}' encryptd | awk 'NF{print $1}' | tr '\n' ' ')" \
    "/etc/encryptd/encryptd.toml "

section ".deb: configure and start"
start_and_status
pid=$(systemctl show -p MainPID --value encryptd); before=$(kernel_objects)

section ".deb: upgrade to $NEXT"
ping_start
# The operator changed both conffiles, the package did not: dpkg keeps them, no prompt
# (stdin is /dev/null: a prompt would fail the step).
dpkg -i /ctl/encryptd_${NEXT}_amd64.deb </dev/null 2>&1 | sed 's/^/       | /'
check "dpkg -i (upgrade)" test "${PIPESTATUS[0]}" = 0
pings=$(ping_stop)
check "version $NEXT installed" eq "$(dpkg-query -W -f='${Version}' encryptd)" "$NEXT"
upgraded "$pid" "$before" "$pings"

section ".deb: encryptd-strict.service"
strict_at_boot

    section ".deb: reboot for real"
    # What encryptd.service finds in the kernel as it starts (run outside its sandbox).
    mkdir -p /etc/systemd/system/encryptd.service.d
    printf '[Service]\nExecStartPre=+/bin/sh -c %s\n' \
        "'nft list table inet encryptd >/run/pkgtest-table-at-encryptd 2>&1 || true'" \
        >/etc/systemd/system/encryptd.service.d/pkgtest.conf
    # Only this test's result powers the guest off; a stop by the reboot is no result.
    mkdir -p /run/systemd/system/pkgtest.service.d
    printf '[Unit]\nSuccessAction=none\nFailureAction=none\n' >/run/systemd/system/pkgtest.service.d/reboot.conf
    systemctl daemon-reload
    nft -s list table inet encryptd >/ctl/table-before-reboot
    cat /proc/sys/kernel/random/boot_id >/ctl/boot1
    echo "PASS=$PASS FAIL=$FAIL" >/ctl/counts
    trap - EXIT
    sync; touch /ctl/rebooting
    echo "  .. systemctl reboot (boot ID $(cat /ctl/boot1))"
    # (Not `systemctl reboot`: it asks logind over D-Bus first, which this root has not.)
    systemctl start --job-mode=replace-irreversibly --no-block reboot.target
    exec sleep 600
fi   # the second boot from here
after_reboot

section ".deb: dpkg --purge"
out=$(dpkg --purge encryptd </dev/null 2>&1); rc=$?
echo "$out" | sed 's/^/       | /'
check "dpkg --purge" test $rc = 0
check "no package left" eval '! dpkg-query -W encryptd >/dev/null 2>&1'
# The operator's files stay: the key and the inventory (no longer a conffile).
removed "$out" "ipsec.keys nodes.toml "
stop_peer

# The .rpm on the same Debian guest: its scriptlets under real systemd. --nodeps: rpm's
# database knows nothing of dpkg's packages (systemd, nftables, glibc are installed).
section ".rpm: rpm -i encryptd-${VERSION}-1.x86_64.rpm"
rpm --initdb
rpm -i --nodeps /ctl/encryptd-${VERSION}-1.x86_64.rpm 2>&1 | sed 's/^/       | /'
check "rpm -i" test "${PIPESTATUS[0]}" = 0
after_install /usr/lib/systemd/system
check "config(noreplace) files" eq "$(rpm -qc encryptd | tr '\n' ' ')" "/etc/encryptd/encryptd.toml /etc/encryptd/nodes.toml "

section ".rpm: configure and start"
start_and_status
pid=$(systemctl show -p MainPID --value encryptd); before=$(kernel_objects)

section ".rpm: upgrade to $NEXT"
ping_start
rpm -U --nodeps /ctl/encryptd-${NEXT}-1.x86_64.rpm 2>&1 | sed 's/^/       | /'
check "rpm -U" test "${PIPESTATUS[0]}" = 0
pings=$(ping_stop)
upgraded "$pid" "$before" "$pings"

section ".rpm: encryptd-strict.service"
strict_at_boot

section ".rpm: rpm -e"
# The node's WireGuard identity must survive an erase (rpm has no purge): a key made
# the way the daemon makes it, and its public half before and after.
(umask 077 && encryptd keygen >/var/lib/encryptd/wireguard.key)
idkey=$(sha256sum /var/lib/encryptd/wireguard.key)
out=$(rpm -e --nodeps encryptd 2>&1); rc=$?
echo "$out" | sed 's/^/       | /'
check "rpm -e" test $rc = 0
# rpm keeps the operator's edited config files as .rpmsave on erase (it has no purge).
# nodes.toml, %ghost (the operator's, never the package's), stays as it is.
removed "$out" "encryptd.toml.rpmsave ipsec.keys nodes.toml " "wireguard.key "
check "erase kept the WireGuard private key unchanged" eq "$(sha256sum /var/lib/encryptd/wireguard.key 2>&1)" "$idkey"
stop_peer

section "the daemon's journal during the test"
journalctl -b -u encryptd --no-pager -o short-monotonic | tail -40 | sed 's/^/       | /'
echo "=== encryptd-strict.service's journal"
journalctl -b -u encryptd-strict --no-pager -o short-monotonic | tail -20 | sed 's/^/       | /'
echo "=== the peer's log (/ctl/peer.log)"
tail -20 /ctl/peer.log | sed 's/^/       | /'
