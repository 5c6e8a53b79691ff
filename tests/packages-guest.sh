#!/bin/bash
# tests/packages-guest.sh — runs inside the VM that tests/packages.sh boots: a clean
# Debian 12 root with systemd as PID 1, the packages in /ctl. Writes its exit status to
# /ctl/rc; the unit that runs it powers the VM off afterwards.
#
# One cycle per package format: install (enabled, not started), configure and start
# (`systemctl status` active, STATUS= line), upgrade (restarted, kernel objects adopted),
# purge/erase (stopped, teardown, state gone).
set -u
. /ctl/env
export LC_ALL=C.UTF-8 SYSTEMD_PAGER= SYSTEMD_COLORS=0
PASS=0 FAIL=0
ok() { PASS=$((PASS + 1)); echo "  ok   $*"; }
bad() { FAIL=$((FAIL + 1)); echo "  FAIL $*"; }
check() { local what=$1; shift; if "$@"; then ok "$what"; else bad "$what"; fi; }
eq() { [ "$1" = "$2" ] || { echo "       got \"$1\", want \"$2\""; return 1; }; }
section() { echo; echo "=== $* ($(cut -d' ' -f1 /proc/uptime) s uptime)"; }
finish() { echo; echo "$PASS passed, $FAIL failed"; [ $FAIL = 0 ] && echo 0 >/ctl/rc || echo 1 >/ctl/rc; exit 0; }
trap finish EXIT

# (Not `is-system-running --wait`: this unit is part of the boot, which would wait for it.)
section "the system: $(. /etc/os-release; echo "$PRETTY_NAME"), kernel $(uname -r), PID 1 $(cat /proc/1/comm), $(systemctl is-system-running)"
systemctl --failed --no-legend | sed 's/^/       failed unit: /'
# The node's underlay: a dummy link with the default route (the daemon's IPsec link is
# the default route's). The one peer in the inventory never answers: hellos to it go
# nowhere, READY=1 comes after the daemon's 10 s wait, STATUS= says 0/1 peers up.
ip link add dum0 type dummy && ip link set dum0 up
ip addr add 192.0.2.10/24 dev dum0 && ip route add default via 192.0.2.1 dev dum0

kernel_objects() {   # what encryptd made in the kernel, for comparisons
    ip xfrm policy; ip xfrm state; nft list table inet encryptd 2>/dev/null
}

configure() {   # what the operator (Ansible) writes after installing the package
    cat >/etc/encryptd/encryptd.toml <<'EOF'
mode = "ipsec"
node = "pkgtest"
[strict]
enabled = true
cidrs = ["10.99.0.0/16"]
exceptions = [{ proto = "tcp", port = 22 }]
EOF
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
    check "/etc/encryptd/nodes.toml installed" test -s /etc/encryptd/nodes.toml
    check "/var/lib/encryptd is 0700 root" eq "$(stat -c '%a %U' /var/lib/encryptd)" "700 root"
    check "man page encryptd(8)" test -s /usr/share/man/man8/encryptd.8.gz
    check "man page encryptd.toml(5)" test -s /usr/share/man/man5/encryptd.toml.5.gz
}

start_and_status() {
    configure
    check "encryptd check accepts the configuration" encryptd check
    check "systemctl start encryptd" systemctl start encryptd
    systemctl status encryptd --no-pager --lines=5 | sed 's/^/       | /'
    check "active (running)" eq "$(systemctl show -p ActiveState,SubState --value encryptd | tr '\n' ' ')" "active running "
    check "STATUS= line" eq "$(systemctl show -p StatusText --value encryptd)" "ipsec: 0/1 peers up, key 1, strict on"
    check "XFRM policies installed" test "$(ip xfrm policy | grep -c '^src')" -gt 0
    check "strict table installed" sh -c 'nft list table inet encryptd >/dev/null'
}

upgraded() {   # $1 = MainPID before, $2 = kernel objects before
    check "active after the upgrade" eq "$(systemctl is-active encryptd)" active
    local pid; pid=$(systemctl show -p MainPID --value encryptd)
    check "restarted by the upgrade (MainPID $1 -> $pid)" test "$pid" != "$1" -a "$pid" != 0
    check "kernel objects adopted unchanged (not flushed)" eq "$(kernel_objects | md5sum)" "$(echo "$2" | md5sum)"
    check "STATUS= line after the upgrade" eq "$(systemctl show -p StatusText --value encryptd)" "ipsec: 0/1 peers up, key 1, strict on"
    check "the operator's encryptd.toml kept" grep -q '^node = "pkgtest"' /etc/encryptd/encryptd.toml
}

removed() {   # $1 = output of the purge/erase, $2 = what may stay in /etc/encryptd
    check "stopped" eq "$(systemctl is-active encryptd)" inactive
    check "unit gone" eq "$(systemctl show -p LoadState --value encryptd)" not-found
    check "/usr/bin/encryptd gone" test ! -e /usr/bin/encryptd
    check "/var/lib/encryptd gone" test ! -e /var/lib/encryptd
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

section ".deb: dpkg -i encryptd_${VERSION}_amd64.deb"
dpkg -i /ctl/encryptd_${VERSION}_amd64.deb </dev/null 2>&1 | sed 's/^/       | /'
check "dpkg -i" test "${PIPESTATUS[0]}" = 0
after_install /lib/systemd/system
check "conffiles" eq "$(dpkg-query -W -f='${Conffiles}' encryptd | awk 'NF{print $1}' | tr '\n' ' ')" \
    "/etc/encryptd/encryptd.toml /etc/encryptd/nodes.toml "

section ".deb: configure and start"
start_and_status
pid=$(systemctl show -p MainPID --value encryptd); before=$(kernel_objects)

section ".deb: upgrade to $NEXT"
# The operator changed both conffiles, the package did not: dpkg keeps them, no prompt
# (stdin is /dev/null: a prompt would fail the step).
dpkg -i /ctl/encryptd_${NEXT}_amd64.deb </dev/null 2>&1 | sed 's/^/       | /'
check "dpkg -i (upgrade)" test "${PIPESTATUS[0]}" = 0
check "version $NEXT installed" eq "$(dpkg-query -W -f='${Version}' encryptd)" "$NEXT"
upgraded "$pid" "$before"

section ".deb: dpkg --purge"
out=$(dpkg --purge encryptd </dev/null 2>&1); rc=$?
echo "$out" | sed 's/^/       | /'
check "dpkg --purge" test $rc = 0
check "no package left" eval '! dpkg-query -W encryptd >/dev/null 2>&1'
removed "$out" "ipsec.keys "

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
rpm -U --nodeps /ctl/encryptd-${NEXT}-1.x86_64.rpm 2>&1 | sed 's/^/       | /'
check "rpm -U" test "${PIPESTATUS[0]}" = 0
upgraded "$pid" "$before"

section ".rpm: rpm -e"
out=$(rpm -e --nodeps encryptd 2>&1); rc=$?
echo "$out" | sed 's/^/       | /'
check "rpm -e" test $rc = 0
# rpm keeps the operator's edited config files as .rpmsave on erase (it has no purge).
removed "$out" "encryptd.toml.rpmsave ipsec.keys nodes.toml.rpmsave "

section "the daemon's journal during the test"
journalctl -b -u encryptd --no-pager -o short-monotonic | tail -40 | sed 's/^/       | /'
