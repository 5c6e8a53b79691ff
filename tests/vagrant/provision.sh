#!/bin/bash
# tests/vagrant/provision.sh — run by the Vagrantfile on each VM, as root:
#   provision.sh NAME INDEX ADDR MODE CONFIGURE NODES...
# NODES: "NAME=ADDR=INDEX" for every node. Installs tcpdump and the uploaded package
# (/tmp/encryptd.deb or /tmp/encryptd.rpm), adds a subnet behind this node (10.99.INDEX.1/24
# on a dummy link) and routes to the others' subnets, opens firewalld for ESP, the hello
# and WireGuard, and — when CONFIGURE is "shell" — writes the three files (key from
# /tmp/ipsec.keys) and starts encryptd. With CONFIGURE "ansible", the role does that.
set -euo pipefail
NAME=$1 INDEX=$2 ADDR=$3 MODE=$4 CONFIGURE=$5
shift 5
NODES=("$@")
log() { echo "provision $NAME: $*"; }

if command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends tcpdump iputils-ping nftables
    [ -e /tmp/encryptd.deb ] && apt-get install -y -qq /tmp/encryptd.deb
else
    dnf install -y -q tcpdump iputils nftables
    [ -e /tmp/encryptd.rpm ] && dnf install -y -q /tmp/encryptd.rpm
fi
command -v encryptd >/dev/null || { log "encryptd is not installed"; exit 1; }
log "$(encryptd --version) installed"

# The link that holds this node's address on the private network (not Vagrant's NAT
# link, which holds the default route).
WIRE=$(ip -o -4 addr show to "$ADDR/32" | awk '{print $2; exit}')
[ -n "$WIRE" ] || { log "no link holds $ADDR"; exit 1; }
log "private network on $WIRE"

# A subnet behind this node, and routes to the others' subnets through them (what a
# router or the operator's network configuration would provide). Not persistent.
ip link show sub0 >/dev/null 2>&1 || ip link add sub0 type dummy
ip link set sub0 up
ip addr replace "10.99.$INDEX.1/24" dev sub0
for n in "${NODES[@]}"; do
    IFS== read -r nname naddr nindex <<<"$n"
    [ "$nname" = "$NAME" ] || ip route replace "10.99.$nindex.0/24" via "$naddr" dev "$WIRE"
done

if systemctl is-active -q firewalld 2>/dev/null; then
    firewall-cmd -q --permanent --add-protocol=esp
    firewall-cmd -q --permanent --add-port=4510/udp --add-port=51871/udp
    # The routed subnets: forward between the private link and sub0.
    firewall-cmd -q --permanent --zone=trusted --add-source=10.99.0.0/16
    firewall-cmd -q --reload
    log "firewalld: ESP, udp/4510, udp/51871 open; 10.99.0.0/16 trusted"
fi

[ "$CONFIGURE" = shell ] || { log "configuration left to Ansible"; exit 0; }
[ "$MODE" = ipsec ] || { log "shell configuration does IPsec only; use ENCRYPTD_VAGRANT_ANSIBLE=1 for WireGuard"; exit 1; }

cat >/etc/encryptd/encryptd.toml <<EOF
# Written by tests/vagrant/provision.sh
mode = "ipsec"
node = "$NAME"
[strict]
enabled = true
cidrs = ["10.99.0.0/16"]
exceptions = [{ proto = "tcp", port = 22 }]
EOF
{
    echo "# Written by tests/vagrant/provision.sh"
    for n in "${NODES[@]}"; do
        IFS== read -r nname naddr nindex <<<"$n"
        printf '\n[[node]]\nname = "%s"\naddresses = ["%s"]\nsubnets = ["10.99.%s.0/24"]\n' "$nname" "$naddr" "$nindex"
    done
} >/etc/encryptd/nodes.toml
install -m 0600 -o root -g root /tmp/ipsec.keys /etc/encryptd/ipsec.keys
rm -f /tmp/ipsec.keys
encryptd check
if systemctl is-active -q encryptd; then systemctl reload encryptd; else systemctl enable --now encryptd; fi
systemctl status encryptd --no-pager --lines=3 || true
