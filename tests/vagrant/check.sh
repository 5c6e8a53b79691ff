#!/bin/bash
# tests/vagrant/check.sh — after `vagrant up` in tests/vagrant: the end-to-end checks on
# every VM (tests/vagrant/e2e-node.sh): `encryptd status` exits 0 (every peer up), each
# node pings the others' addresses and, from its subnet, theirs, and what it sends on the
# private network is only ESP (ENCRYPTD_MODE=ipsec, the default) or WireGuard's UDP
# (ENCRYPTD_MODE=wireguard). Exit 0 when every node passed.
# NOT RUN by the project (no Vagrant on its build machines).
set -u
cd "$(dirname "$0")"
MODE=${ENCRYPTD_MODE:-ipsec}
NODES="n1=192.168.56.11=1 n2=192.168.56.12=2 n3=192.168.56.13=3"   # as in the Vagrantfile
fail=0
for spec in $NODES; do
    IFS== read -r name ip idx <<<"$spec"
    addrs="" subnets=""
    for o in $NODES; do
        IFS== read -r oname oip oidx <<<"$o"
        [ "$oname" = "$name" ] && continue
        addrs+=" $oip" subnets+=" 10.99.$oidx.1"
    done
    echo "== $name"
    vagrant ssh "$name" -c "sudo systemctl show -p StatusText --value encryptd; \
        sudo bash /home/vagrant/e2e-node.sh $MODE $ip $addrs -I 10.99.$idx.1 $subnets" || fail=1
done
[ $fail = 0 ] && echo "check.sh: every node passed" || echo "check.sh: FAILED"
exit $fail
