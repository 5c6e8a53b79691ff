#!/bin/bash
# tests/vagrant/e2e-node.sh MODE WIRE [-I SRC] DST... — the end-to-end check on one node,
# as root: `encryptd status` exits 0, every DST answers pings, and what this node sends
# on its underlay link WIRE (a link name, or an address the link holds) is encrypted:
# ESP (MODE ipsec) or WireGuard's UDP (MODE wireguard), never a plaintext ICMP echo
# (request or reply). `-I SRC` pings the DSTs after it from SRC (an address of a subnet
# behind this node). Used by
# tests/vagrant/check.sh (on every node) and by tests/ansible.sh. Needs tcpdump, ping.
#
# Only this node's egress is captured (tcpdump -Q out): on the receiving side, the kernel
# hands the packet it decrypted from an ESP tunnel to the packet taps of the same link
# again, so an ingress capture shows the plaintext inner packet after its ESP packet
# although the wire carried only the latter. Run on every node, the egress captures
# cover every direction of every pair (a reply leaves by the same policy as a request).
# Exit 0 when all passed; the last line says what was seen.
set -u
export LC_ALL=C
MODE=${1:?usage: e2e-node.sh ipsec|wireguard WIRE [-I SRC] DST...}
WIRE=${2:?usage: e2e-node.sh ipsec|wireguard WIRE [-I SRC] DST...}
shift 2
case $MODE in ipsec|wireguard) ;; *) echo "e2e: mode must be ipsec or wireguard" >&2; exit 2 ;; esac
WG_PORT=${WG_PORT:-51871}
# WIRE may also be an address: the link that holds it.
if [ ! -e "/sys/class/net/$WIRE" ]; then
    link=$(ip -o addr show to "$WIRE" | awk '{print $2; exit}')
    [ -n "$link" ] || { echo "e2e: no link named or holding $WIRE" >&2; exit 2; }
    WIRE=$link
fi
me=$(hostname)
fail=0

if encryptd status >/tmp/e2e-status.txt 2>&1; then
    echo "e2e $me: encryptd status: exit 0 ($(sed -n 's/^Status: //p' /tmp/e2e-status.txt))"
else
    echo "e2e $me: encryptd status: exit $?:"; sed 's/^/    /' /tmp/e2e-status.txt; fail=1
fi

CAP=$(mktemp /tmp/e2e-cap.XXXXXX)
tcpdump -n -U -Q out -i "$WIRE" -w "$CAP" 2>"$CAP.err" &
cap=$!
for _ in $(seq 100); do grep -q listening "$CAP.err" && break; sleep 0.1; done

src=()
while [ $# -gt 0 ]; do
    if [ "$1" = -I ]; then src=(-I "$2"); shift 2; continue; fi
    if ping -n -q -c 3 -i 0.3 -W 3 "${src[@]}" "$1" >/dev/null 2>&1; then r=ok; else r=FAILED; fail=1; fi
    echo "e2e $me: ping ${src[*]:+from ${src[1]} }$1: $r"
    shift
done

sleep 0.5
kill -INT $cap; wait $cap 2>/dev/null
tcpdump -n -r "$CAP" 2>/dev/null >"$CAP.txt"
total=$(wc -l <"$CAP.txt")
esp=$(grep -c 'ESP(' "$CAP.txt")
wg=$(grep -cE "\.$WG_PORT[ :].*UDP|\.$WG_PORT > " "$CAP.txt")
clear=$(grep -cE 'ICMP echo|ICMP6, echo' "$CAP.txt")
rm -f "$CAP" "$CAP.err"
if [ "$clear" != 0 ]; then
    echo "e2e $me: plaintext pings on $WIRE:"; grep -E 'ICMP echo|ICMP6, echo' "$CAP.txt" | head -5 | sed 's/^/    /'
    fail=1
fi
case $MODE in
    ipsec) [ "$esp" -gt 0 ] || { echo "e2e $me: no ESP on $WIRE"; fail=1; } ;;
    wireguard) [ "$wg" -gt 0 ] && [ "$esp" = 0 ] || { echo "e2e $me: want WireGuard UDP and no ESP on $WIRE"; fail=1; } ;;
esac
rm -f "$CAP.txt"
echo "e2e $me: sent on $WIRE: $total packets, $esp ESP, $wg WireGuard (udp/$WG_PORT), $clear plaintext pings: $([ $fail = 0 ] && echo OK || echo FAILED)"
exit $fail
