#!/bin/bash
# tests/demo.sh — encryptd's main job on a small built-in example:   bash tests/demo.sh
#
# Three nodes (network namespaces on one bridge, "the wire"), each running its own
# `encryptd run` in IPsec mode from the same inventory. The demo pings every node from
# every other one over IPv4 and IPv6 and into the subnets behind them, and shows what a
# capture on the wire sees: ESP and the daemons' hellos, no plaintext.
#
# The kernel of the machine must have ESP, gcm and XFRM; when it lacks them (as the
# project's build machines' kernel does), the demo runs itself inside the project's test
# VM (tests/vm: Debian's stock kernel under qemu), which it prepares on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

if [ -z "${ENCRYPTD_DEMO_INSIDE:-}" ]; then
    cargo build -q
    # Probe for ESP + gcm in a throw-away namespace, never in the host's own.
    ip netns add encryptd-probe
    if ip -n encryptd-probe xfrm state add src 192.0.2.254 dst 192.0.2.253 proto esp spi 0x1 \
        aead 'rfc4106(gcm(aes))' 0x0000000000000000000000000000000000000000 128 2>/dev/null; then
        ip netns del encryptd-probe
        exec env ENCRYPTD_DEMO_INSIDE=host bash "$0"
    fi
    ip netns del encryptd-probe
    echo "demo: this kernel lacks ESP/gcm; running inside the test VM (Debian's kernel under qemu)"
    tests/vm/setup.sh >/dev/null
    exec env VM_ENV=ENCRYPTD_DEMO_INSIDE ENCRYPTD_DEMO_INSIDE=vm tests/vm/vmrun.sh bash "$0"
fi

BIN=$PWD/target/debug/encryptd
W=$(mktemp -d /tmp/encryptd-demo.XXXXXX)
P=demo
N=3
cleanup() {
    for i in $(seq 0 $((N - 1))); do [ -f "$W/n$i/pid" ] && kill "$(cat "$W/n$i/pid")" 2>/dev/null; done
    [ -n "${CAP:-}" ] && kill "$CAP" 2>/dev/null
    sleep 0.3
    for i in $(seq 0 $((N - 1))); do ip netns del $P-n$i 2>/dev/null; done
    ip netns del $P-sw 2>/dev/null
    rm -rf "$W"
}
trap cleanup EXIT

echo "== the wire: bridge br0 in namespace $P-sw; nodes n0..n$((N - 1)) in $P-n0.."
ip netns add $P-sw && ip -n $P-sw link add br0 type bridge && ip -n $P-sw link set br0 up
for i in $(seq 0 $((N - 1))); do
    a=$((i + 1))
    ip netns add $P-n$i
    ip -n $P-n$i link set lo up
    ip -n $P-sw link add p$i type veth peer name eth0 netns $P-n$i
    ip -n $P-sw link set p$i master br0 up
    ip -n $P-n$i link set eth0 up
    ip -n $P-n$i addr add 10.77.0.$a/24 dev eth0
    ip -n $P-n$i addr add fd77::$a/64 dev eth0 nodad
    ip -n $P-n$i link add sub0 type dummy
    ip -n $P-n$i addr add 10.1.$i.1/24 dev sub0
    ip -n $P-n$i link set sub0 up
done
for i in $(seq 0 $((N - 1))); do for j in $(seq 0 $((N - 1))); do
    [ "$i" = "$j" ] || ip -n $P-n$i route add 10.1.$j.0/24 via 10.77.0.$((j + 1))
done; done

# The same inventory and key on every node; each node its own config and boot ID.
inv=""
for i in $(seq 0 $((N - 1))); do
    inv+="[[node]]
name = \"n$i\"
addresses = [\"10.77.0.$((i + 1))\", \"fd77::$((i + 1))\"]
subnets = [\"10.1.$i.0/24\"]

"
done
key="1+ rfc4106(gcm(aes)) $(head -c 20 /dev/urandom | od -An -tx1 | tr -d ' \n') 128"
for i in $(seq 0 $((N - 1))); do
    d=$W/n$i
    mkdir -p "$d"
    printf '%s' "$inv" >"$d/nodes.toml"
    (umask 077; echo "$key" >"$d/ipsec.keys")
    cat /proc/sys/kernel/random/uuid >"$d/boot_id"
    cat >"$d/encryptd.toml" <<CONF
mode = "ipsec"
node = "n$i"
runtime_dir = "run"
state_dir = "state"
boot_id_path = "boot_id"
CONF
done
echo "== encryptd check (what Ansible's validate runs):"
"$BIN" check "$W/n0/encryptd.toml"

echo "== starting encryptd in every node"
for i in $(seq 0 $((N - 1))); do
    ip netns exec $P-n$i "$BIN" run --config "$W/n$i/encryptd.toml" 2>"$W/n$i/log" &
    echo $! >"$W/n$i/pid"
done
for i in $(seq 0 $((N - 1))); do
    for _ in $(seq 100); do [ "$(grep -c 'INFO peer .* up' "$W/n$i/log")" -ge $((N - 1)) ] && break; sleep 0.2; done
done
for i in $(seq 0 $((N - 1))); do sed "s/^/   n$i: /" "$W/n$i/log"; done

echo "== capture on the wire while every node pings every other (IPv4, IPv6, subnet)"
ip netns exec $P-sw tcpdump -l -n -i br0 >"$W/cap" 2>/dev/null &
CAP=$!
sleep 1
fail=0
for i in $(seq 0 $((N - 1))); do for j in $(seq 0 $((N - 1))); do
    [ "$i" = "$j" ] && continue
    for dst in 10.77.0.$((j + 1)) fd77::$((j + 1)) 10.1.$j.1; do
        if ip netns exec $P-n$i ping -c 2 -i 0.2 -W 2 "$dst" >/dev/null; then r=ok; else r=FAILED; fail=1; fi
        printf '   n%s -> %-12s %s\n' "$i" "$dst" "$r"
    done
done; done
sleep 0.5; kill $CAP; wait $CAP 2>/dev/null || true; CAP=
total=$(wc -l <"$W/cap")
esp=$(grep -c 'ESP(' "$W/cap" || true)
hello=$(grep -c '\.4510: UDP' "$W/cap" || true)
clear=$(grep -cE 'ICMP echo|ICMP6, echo' "$W/cap" || true)
echo "== on the wire: $total packets: $esp ESP, $hello hello, $clear plaintext pings. A sample:"
{ grep 'ESP(' "$W/cap" || true; } | head -6 | sed 's/^/   /'
echo "== n0's SAs (2 per peer per family; keys not shown):"
ip -n $P-n0 xfrm state | grep -E '^src' | sed 's/^/   /'
echo "== encryptd status on n0:"
ip netns exec $P-n0 "$BIN" status --config "$W/n0/encryptd.toml" | sed 's/^/   /' || fail=1
[ "$fail" = 0 ] && [ "$clear" = 0 ] && [ "$esp" -gt 0 ] || { echo "demo: FAILED"; exit 1; }
echo "demo: every node reached every other, encrypted."
