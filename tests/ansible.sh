#!/bin/bash
# tests/ansible.sh — the Ansible role (packaging/ansible/roles/encryptd) run with
# ansible-core, over SSH, against two clean Debian 12 machines booted with systemd:
#   bash tests/ansible.sh
#
# As root on Debian 12 (Rust from rustup). Not part of tests/run.sh: it downloads
# ansible-core (pip, into a venv) and a Debian root (debootstrap) once, both cached, and
# boots two VMs under TCG. Measured here with the caches filled (TCG, 2 host cores shared
# with other work): 11-14 min (661-834 s) for steps a-g alone (8 playbook runs of 75-155 s
# each); with the preshared key steps h-j, 14-23 min (855-1402 s: 11 playbook runs of
# 50-160 s, and up to 2 min waiting for a WireGuard handshake in i).
#
#  1. packaging/build.sh deb: the .deb of this tree.
#  2. ansible-core from PyPI in a venv ($ANSIBLETEST_CACHE/venv-*, one per $ANSIBLE_CORE,
#     which picks the version). A Debian 12 root (debootstrap minbase + systemd, openssh-server, sudo,
#     python3, python3-apt, nftables, iproute2, tcpdump, ...), cached.
#  3. Two VMs (n1, n2) under qemu with Debian's stock kernel (tests/vm/setup.sh's), each
#     the cached root read-only with a RAM overlay, systemd as PID 1, sshd. Each has a
#     management NIC (qemu user networking; the host reaches its sshd on a forwarded
#     port) and a NIC on a shared wire between the two (192.0.2.1N/24, default route
#     there, a subnet 10.99.N.0/24 behind each node on a dummy link).
#  4. ansible-playbook (the example site.yml, the role from this tree, the inventory
#     group "encryptd" = n1, n2, the key in an encrypted Ansible Vault file), phase by
#     phase, each followed by checks over SSH:
#     a. IPsec, first run: the .deb copied and installed with apt; the three files
#        staged, validated with `encryptd check` and installed (modes, owners,
#        contents); unit enabled and started (not reloaded: it started on the new
#        files); STATUS= 1/1 peers up; pings between the nodes and between their
#        subnets, only ESP in what each node sends (tcpdump in the guest), `encryptd
#        status` exit 0 (tests/vagrant/e2e-node.sh); no staging directory left in /run.
#     b. The same run again: nothing changed, no handler.
#     c. A broken inventory (an address that is not one): the run fails at nodes.toml's
#        validate with encryptd check's file:line:col message; the deployed files are
#        unchanged, the daemon neither reloaded nor restarted.
#     d. A broken key line: refused the same way; ipsec.keys unchanged and still 0600.
#     e0. --check --diff with key-id 2 appended in the vault: would change ipsec.keys
#        only, changes nothing, prints no key bytes.
#     e. The rotation: only ipsec.keys changes, the handler reloads (same PID), both
#        nodes move to key 2, no ping lost meanwhile (every 200 ms).
#     f. Mode switched to WireGuard: `encryptd pubkey` on each node, the keys gathered
#        into nodes.toml through hostvars, the mode-change handler (a restart; the new
#        daemon removes the old mode's objects): no XFRM objects left, encryptd0 up, WireGuard UDP only on the wire.
#     g. WireGuard again: nothing changed.
#     h. A cluster preshared key in the vault (encryptd_wireguard_preshared_key): only
#        wireguard.psk (0600 root, the vaulted key) and encryptd.toml (which names it)
#        change, the handler reloads (same PID); `wg show encryptd0 preshared-keys` (the
#        host's wg, as /ctl/wg): a key for every peer, derived (not the cluster key), the
#        same at both ends of a pair; peers up, pings; no key bytes in the play's output.
#     i. The preshared key rotated: only wireguard.psk changes, reload; every pair has a
#        new key, the same at both ends; a handshake under it, no ping lost meanwhile
#        (every 200 ms), pings; no key bytes in the output.
#     j. The variable emptied: encryptd.toml says preshared_key = "", then wireguard.psk
#        is removed; reload; the peers show "(none)"; peers up, pings.
#     k. The inventory from etcd: one etcd member on n1 at an address of its own, outside
#        the mesh (Debian's etcd 3.4 from the rig's cache, TLS with client certificates, RBAC: a user per node that may write only
#        its own key); encryptd_inventory_source: etcd, the client key and the passwords
#        in the vault: the sync is enabled and running on both, the credentials 0600
#        root, each registration holds the node's public key, every nodes.toml is the
#        sync's rendering with both keys, the daemons keep their PIDs, peers up, pings;
#        n2's user is refused n1's key; no key or password bytes in the output.
#     k2. The same with --limit n1: exit 0, nothing changed (no other host's facts).
#     Then the wire itself, captured by qemu on the host for the whole run: no
#     plaintext ping ever; ESP in the IPsec phases, WireGuard UDP (and no ESP) after.
#
# Env: ANSIBLETEST_CACHE (~/.cache/encryptd-ansibletest), ANSIBLE_CORE (pip spec,
#      "ansible-core==2.19.*"), VM_CACHE (the rig's), ANSIBLETEST_TIMEOUT (2100 s for
#      the VMs), ANSIBLETEST_KEEP=1 keeps the work dir (console logs, playbook logs),
#      ENCRYPTD_DEB (a built .deb instead of building one).
# Exit status 0 when everything passed; the last line is "N passed, M failed".
set -euo pipefail
export LC_ALL=C.UTF-8
cd "$(dirname "$0")/.."
ROOT=$PWD
export HOME=${HOME:-$(getent passwd "$(id -u)" | cut -d: -f6)}
export PATH="$HOME/.cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
T0=$SECONDS
say() { echo; echo "==> $* ($((SECONDS - T0)) s)"; }
die() { echo "ansible.sh: error: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root (apt, debootstrap, qemu's 9p root)"

CACHE=${ANSIBLETEST_CACHE:-$HOME/.cache/encryptd-ansibletest}
ANSIBLE_CORE=${ANSIBLE_CORE:-ansible-core==2.19.*}
NODES=2
mkdir -p "$CACHE"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/encryptd-ansibletest.XXXXXX")
QPIDS=()
cleanup() {
    for f in "$WORK"/ssh-*; do [ -S "$f" ] && ssh -o ControlPath="$f" -O exit x 2>/dev/null; done
    for p in "${QPIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    if [ "${ANSIBLETEST_KEEP:-0}" = 1 ]; then echo "ansible.sh: work dir kept: $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

PASS=0 FAIL=0
ok() { PASS=$((PASS + 1)); echo "  ok   $*"; }
bad() { FAIL=$((FAIL + 1)); echo "  FAIL $*"; }
check() { local what=$1; shift; if "$@"; then ok "$what"; else bad "$what"; fi; }
eq() { [ "$1" = "$2" ] || { echo "       got \"$1\", want \"$2\""; return 1; }; }

# --- tools ---------------------------------------------------------------------------------
PKGS="debhelper dpkg-dev debootstrap cpio gzip openssh-client python3-venv openssl"
missing=$(for p in $PKGS; do
    dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q 'ok installed' || echo "$p"
done)
if [ -n "$missing" ]; then
    missing=$(echo $missing)
    say "apt-get install $missing"
    compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null || apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing
fi
tests/vm/setup.sh
VM_CACHE=${VM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/encryptd-kernel-vm}
KDIR=$VM_CACHE/kernel
KV=$(ls "$KDIR/lib/modules" | awk 'NR==1')

# --- 1. the package ------------------------------------------------------------------------
if [ -n "${ENCRYPTD_DEB:-}" ]; then
    DEB=$ENCRYPTD_DEB
else
    say "build the .deb"
    DEB=$(PKG_OUT=$WORK/out bash packaging/build.sh deb | grep '\.deb$' | tail -1)
fi
[ -s "$DEB" ] || die "no .deb at $DEB"
echo "package: $DEB"

# --- 2. ansible-core and the Debian root ---------------------------------------------------
VENV=$CACHE/venv-$(echo "$ANSIBLE_CORE" | tr -c "A-Za-z0-9.\n" _)
if [ "$(cat "$VENV/.spec" 2>/dev/null)" != "$ANSIBLE_CORE" ] || [ ! -x "$VENV/bin/ansible-playbook" ]; then
    say "pip install $ANSIBLE_CORE (venv in $VENV; once, cached)"
    rm -rf "$VENV"
    /usr/bin/python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check "$ANSIBLE_CORE"
    echo "$ANSIBLE_CORE" >"$VENV/.spec"
fi
export PATH="$VENV/bin:$PATH"
ansible-playbook --version | sed -n 1p

INCLUDE=systemd,systemd-sysv,nftables,iproute2,iputils-ping,kmod,procps,python3,python3-apt,openssh-server,sudo,tcpdump
RDIR=$CACHE/bookworm-root
if [ "$(cat "$CACHE/root.stamp" 2>/dev/null)" != "$INCLUDE" ] || [ ! -x "$RDIR/lib/systemd/systemd" ]; then
    say "debootstrap bookworm (minbase + $INCLUDE; once, cached in $CACHE)"
    rm -rf "$RDIR" "$RDIR.tmp"
    debootstrap --variant=minbase --include="$INCLUDE" bookworm "$RDIR.tmp" http://deb.debian.org/debian \
        >"$WORK/debootstrap.log" 2>&1 || { tail -20 "$WORK/debootstrap.log"; die "debootstrap failed"; }
    rm -f "$RDIR.tmp"/etc/machine-id && touch "$RDIR.tmp"/etc/machine-id   # a new one per boot
    rm -f "$RDIR.tmp"/var/cache/apt/archives/*.deb
    mv "$RDIR.tmp" "$RDIR"
    echo "$INCLUDE" >"$CACHE/root.stamp"
fi

# --- 3. two VMs ------------------------------------------------------------------------------
# The control dir, shared read-only with the guests: the SSH key and the network script.
CTL=$WORK/ctl
mkdir -p "$CTL"
ssh-keygen -q -t ed25519 -N '' -C ansibletest -f "$WORK/id"
cp "$WORK/id.pub" "$CTL/authorized_keys"
cp tests/vagrant/e2e-node.sh "$CTL/"
# wg (wireguard-tools, which tests/vm/setup.sh installs on the host, Debian 12 as the
# guests): the preshared keys the kernel holds, read in the guests as /ctl/wg.
cp "$(command -v wg)" "$CTL/wg"
# etcd and etcdctl (Debian's etcd-server/etcd-client, as tests/vm/setup.sh extracts them)
# for k.: one member on n1.
cp "$VM_CACHE/etcd/usr/bin/etcd" "$VM_CACHE/etcd/usr/bin/etcdctl" "$CTL/"
cat >"$CTL/net.sh" <<EOF
#!/bin/sh
# The test's network, as an operator's would be before Ansible runs: NICs found by MAC.
set -ex
N=\$1
nic() { for d in /sys/class/net/*; do [ "\$(cat \$d/address)" = "\$1" ] && basename \$d; done; true; }
mgmt=\$(nic 52:54:00:00:00:1\$N); wire=\$(nic 52:54:00:00:01:1\$N)
ip link set lo up
ip link set "\$mgmt" up && ip addr add 10.0.2.15/24 dev "\$mgmt"
ip link set "\$wire" name wire0 && ip link set wire0 up && ip addr add 192.0.2.1\$N/24 dev wire0
ip route add default via 192.0.2.1 dev wire0 onlink
ip link add sub0 type dummy && ip link set sub0 up && ip addr add 10.99.\$N.1/24 dev sub0
for M in \$(seq $NODES); do [ \$M = \$N ] || ip route add 10.99.\$M.0/24 via 192.0.2.1\$M; done
EOF
cat >"$CTL/testnet.service" <<'EOF'
[Unit]
Description=the test's network (tests/ansible.sh)
DefaultDependencies=no
Before=network.target network-online.target ssh.service
Wants=network.target
[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/sh /ctl/net.sh %i
StandardOutput=journal+console
StandardError=journal+console
[Install]
WantedBy=multi-user.target network-online.target
EOF

I=$WORK/initramfs
mkdir -p "$I"/{bin,dev,proc,sys,lower,upper,newroot,mods}
cp "$VM_CACHE/busybox/bin/busybox" "$I/bin/"
for a in sh mount umount mkdir insmod switch_root cat poweroff ln cp echo sed chmod; do ln -s busybox "$I/bin/$a"; done
for m in virtio_pci virtio_net 9pnet_virtio 9p overlay esp4 esp6 xfrm_user dummy nf_tables nft_ct \
         nft_reject_inet nft_xfrm gcm seqiv echainiv authenc ghash_generic ctr cbc hmac wireguard af_packet; do
    modprobe -d "$KDIR" -S "$KV" --show-depends "$m" | awk '$1=="insmod"{print $2}' || die "module $m not in $KV"
done | awk '!seen[$0]++' | while read -r ko; do cp "$ko" "$I/mods/"; basename "$ko" >>"$I/mods/order"; done
cat >"$I/init" <<'EOF'
#!/bin/sh
fail() { echo "initramfs: $*"; poweroff -f; }
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in $(cat /mods/order); do insmod /mods/$m || echo "initramfs: insmod $m failed"; done
N=$(sed -n 's/.*encryptd_test\.n=\([0-9]*\).*/\1/p' /proc/cmdline)
O=trans=virtio,version=9p2000.L,msize=512000
mount -t 9p -o $O,cache=loose,ro root /lower || fail "9p root mount failed"
mount -t tmpfs tmpfs /upper && mkdir /upper/u /upper/w
mount -t overlay overlay -o lowerdir=/lower,upperdir=/upper/u,workdir=/upper/w /newroot || fail "overlay failed"
mkdir -p /newroot/ctl /newroot/lib/modules
mount -t 9p -o $O,ro ctl /newroot/ctl || fail "ctl mount failed"
mount -t 9p -o $O,ro mods /newroot/lib/modules || fail "modules mount failed"
S=/newroot/etc/systemd/system
cp /newroot/ctl/testnet.service $S/testnet@.service
mkdir -p $S/network-online.target.wants
ln -s ../testnet@.service $S/multi-user.target.wants/testnet@$N.service
ln -s ../testnet@.service $S/network-online.target.wants/testnet@$N.service
# No udev in the root: no device units, so no gettys (they would wait for them).
ln -s /dev/null $S/getty.target
echo n$N >/newroot/etc/hostname
printf '127.0.0.1 localhost\n127.0.1.1 n%s\n' $N >/newroot/etc/hosts
mkdir -p /newroot/root/.ssh && chmod 700 /newroot/root/.ssh
cp /newroot/ctl/authorized_keys /newroot/root/.ssh/ && chmod 600 /newroot/root/.ssh/authorized_keys
umount /proc /sys /dev
exec switch_root /newroot /lib/systemd/systemd
EOF
chmod +x "$I/init"
( cd "$I" && find . | cpio -o -H newc --quiet | gzip -1 ) >"$WORK/initramfs.cpio.gz"

# Free TCP/UDP ports on the host: SSH forwards and the wire's two datagram ends.
BASE=$((20000 + RANDOM % 20000))
TIMEOUT=${ANSIBLETEST_TIMEOUT:-2100}
say "boot n1..n$NODES under qemu (Debian kernel $KV, systemd; consoles in $WORK/n*.console)"
for N in $(seq $NODES); do
    other=$((NODES + 1 - N))   # two nodes: the wire is a point-to-point datagram link
    # The wire as the host sees it: every frame n1's link sends or receives (the link
    # between the two nodes, like the bridge the demo captures on).
    dump=()
    [ $N = 1 ] && dump=(-object "filter-dump,id=wirecap,netdev=wire,file=$WORK/wire.pcap")
    timeout --kill-after=10 "$TIMEOUT" qemu-system-x86_64 \
        -machine "q35,accel=${VM_ACCEL:-tcg}" -cpu max -smp 1 -m 1024 \
        -nodefaults -no-user-config -display none -no-reboot -monitor none \
        -serial "file:$WORK/n$N.console" \
        -kernel "$KDIR/vmlinux" -initrd "$WORK/initramfs.cpio.gz" \
        -append "console=ttyS0 panic=-1 systemd.show_status=error encryptd_test.n=$N" \
        -fsdev "local,id=root,path=$RDIR,security_model=none,readonly=on,multidevs=remap" \
        -device virtio-9p-pci,fsdev=root,mount_tag=root \
        -fsdev "local,id=ctl,path=$CTL,security_model=none,readonly=on" \
        -device virtio-9p-pci,fsdev=ctl,mount_tag=ctl \
        -fsdev "local,id=mods,path=$KDIR/lib/modules,security_model=none,readonly=on" \
        -device virtio-9p-pci,fsdev=mods,mount_tag=mods \
        -netdev "user,id=mgmt,net=10.0.2.0/24,hostfwd=tcp:127.0.0.1:$((BASE + N))-10.0.2.15:22" \
        -device "virtio-net-pci,netdev=mgmt,mac=52:54:00:00:00:1$N" \
        -netdev "dgram,id=wire,local.type=inet,local.host=127.0.0.1,local.port=$((BASE + 10 + N)),remote.type=inet,remote.host=127.0.0.1,remote.port=$((BASE + 10 + other))" \
        -device "virtio-net-pci,netdev=wire,mac=52:54:00:00:01:1$N" "${dump[@]}" \
        </dev/null >"$WORK/n$N.qemu.log" 2>&1 &
    QPIDS+=($!)
done

SSH_OPTS=(-i "$WORK/id" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR
          -o ConnectTimeout=10 -o BatchMode=yes -o ControlMaster=auto -o "ControlPath=$WORK/ssh-%p"
          -o ControlPersist=900)
on() { local n=$1; shift; ssh "${SSH_OPTS[@]}" -p $((BASE + ${n#n})) root@127.0.0.1 "$@"; }
for N in $(seq $NODES); do
    for _ in $(seq 300); do
        on n$N true 2>/dev/null && break
        kill -0 "${QPIDS[$((N - 1))]}" 2>/dev/null || { tail -30 "$WORK/n$N.console"; die "n$N: qemu exited"; }
        sleep 1
    done
    on n$N true || { tail -30 "$WORK/n$N.console"; die "n$N: no SSH after 300 s"; }
    echo "n$N: up, SSH on 127.0.0.1:$((BASE + N)) ($(on n$N 'cut -d" " -f1 /proc/uptime') s uptime)"
done

# --- 4. Ansible -------------------------------------------------------------------------------
A=$WORK/ansible
mkdir -p "$A/group_vars/encryptd"
cp packaging/ansible/site.yml "$A/"
cat >"$A/ansible.cfg" <<EOF
[defaults]
roles_path = $ROOT/packaging/ansible/roles
inventory = $A/hosts.yml
vault_password_file = $A/vault-pass
host_key_checking = False
interpreter_python = /usr/bin/python3
forks = $NODES
stdout_callback = default
[ssh_connection]
pipelining = True
ssh_args = -o ControlMaster=auto -o ControlPersist=300s -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR
EOF
{
    echo "encryptd:"
    echo "  hosts:"
    for N in $(seq $NODES); do
        echo "    n$N:"
        echo "      ansible_host: 127.0.0.1"
        echo "      ansible_port: $((BASE + N))"
        echo "      ansible_user: root"
        echo "      ansible_ssh_private_key_file: $WORK/id"
        echo "      encryptd_addresses: [192.0.2.1$N]"
        echo "      encryptd_subnets: [10.99.$N.0/24]"
    done
} >"$A/hosts.yml"
cat >"$A/group_vars/encryptd/vars.yml" <<EOF
encryptd_mode: ipsec
encryptd_package_file: $DEB
encryptd_strict_enabled: true
encryptd_strict_cidrs: [10.99.0.0/16]
encryptd_ipsec_keys: "{{ vault_encryptd_ipsec_keys }}"
EOF
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$A/vault-pass"
newkey() { echo "$1+ rfc4106(gcm(aes)) $(head -c 20 /dev/urandom | od -An -tx1 | tr -d ' \n') 128"; }
KEY1=$(newkey 1) KEY2=$(newkey 2)
# WireGuard cluster preshared keys (h., i.), as `wg genpsk` prints them.
PSK1=$(head -c 32 /dev/urandom | base64) PSK2=$(head -c 32 /dev/urandom | base64)
VAULT_PSK="" VAULT_EXTRA=""
vault() {   # the vault file, encrypted, with the given key lines (and $VAULT_PSK, $VAULT_EXTRA if set)
    { echo "vault_encryptd_ipsec_keys:"; for k in "$@"; do echo "  - \"$k\""; done
      [ -z "$VAULT_PSK" ] || echo "vault_encryptd_wireguard_preshared_key: \"$VAULT_PSK\""
      [ -z "$VAULT_EXTRA" ] || printf '%s\n' "$VAULT_EXTRA"
    } >"$A/group_vars/encryptd/vault.yml"
    ansible-vault encrypt "$A/group_vars/encryptd/vault.yml" >/dev/null
}
export ANSIBLE_CONFIG=$A/ansible.cfg ANSIBLE_FORCE_COLOR=0 ANSIBLE_NOCOLOR=1
vault "$KEY1"
check "the vault file is encrypted" grep -q '^\$ANSIBLE_VAULT;' "$A/group_vars/encryptd/vault.yml"

PLAYS=0
play() {   # play NAME [ansible-playbook args]: runs site.yml, log in $WORK/play-NAME.log; sets PRC
    local name=$1; shift
    PLAYS=$((PLAYS + 1))
    local t=$SECONDS
    ( cd "$A" && ansible-playbook site.yml "$@" ) >"$WORK/play-$name.log" 2>&1 && PRC=0 || PRC=$?
    echo "       ansible-playbook ($name): exit $PRC in $((SECONDS - t)) s; $(grep -E '^n[0-9]+ +:' "$WORK/play-$name.log" | tr -s ' ' | paste -sd';')"
}
show_play() { sed 's/^/       | /' "$WORK/play-$1.log"; }
recap() {   # recap NAME HOST FIELD -> the number
    sed -n "s/^$2 *:.* $3=\([0-9]*\).*/\1/p" "$WORK/play-$1.log"
}
handler_ran() {   # handler_ran NAME HANDLER HOST: "changed: [HOST]" under RUNNING HANDLER [encryptd : HANDLER]
    awk -v h="RUNNING HANDLER [encryptd : $2]" -v host="[$3]" '
        index($0, "RUNNING HANDLER") { inh = index($0, h) > 0; next }
        /^(TASK|PLAY)/ { inh = 0 }
        inh && ($1 == "changed:" || $1 == "ok:") && index($0, host) { found = 1 }
        END { exit !found }' "$WORK/play-$1.log"
}
changed_tasks() {   # changed_tasks NAME HOST -> "task;task" that reported changed for HOST
    awk -v host="[$2]" '
        /^(TASK|RUNNING HANDLER) \[/ { t = $0; sub(/^[^[]*\[encryptd : /, "", t); sub(/\].*/, "", t); next }
        $1 == "changed:" && index($0, host) { print t }' "$WORK/play-$1.log" | paste -sd';'
}
reloads() { on "$1" "journalctl -b -u encryptd -o cat | grep -c '^Reloaded '" || true; }
mainpid() { on "$1" systemctl show -p MainPID --value encryptd; }
statustext() { on "$1" systemctl show -p StatusText --value encryptd; }
sums() { on "$1" 'cd /etc/encryptd && sha256sum encryptd.toml nodes.toml ipsec.keys 2>/dev/null; stat -c "%n %a %U:%G" encryptd.toml nodes.toml ipsec.keys 2>/dev/null'; }
wait_status() {   # wait_status NODE TEXT [SECONDS]
    local s
    for _ in $(seq "${3:-90}"); do s=$(statustext "$1"); [ "$s" = "$2" ] && return 0; sleep 1; done
    echo "       STATUS= \"$s\", want \"$2\""; return 1
}
e2e() {   # e2e NODE MODE: pings to the other nodes and their subnets, tcpdump on wire0
    local n=${1#n} targets="" M
    for M in $(seq $NODES); do [ $M = $n ] || targets+=" 192.0.2.1$M"; done
    targets+=" -I 10.99.$n.1"
    for M in $(seq $NODES); do [ $M = $n ] || targets+=" 10.99.$M.1"; done
    # The link given by its address, as tests/vagrant/check.sh does.
    on "$1" "bash /ctl/e2e-node.sh $2 192.0.2.1$n $targets" | sed 's/^/       | /'
    return "${PIPESTATUS[0]}"
}
file_is() {   # file_is NODE PATH "MODE OWNER:GROUP"
    eq "$(on "$1" stat -c "'%a %U:%G'" "$2")" "$3"
}
jcount() {   # jcount NODE REGEX: lines of encryptd's journal (this boot) matching REGEX
    on "$1" "journalctl -b -u encryptd -o cat | grep -cE '$2'" || true
}
hash16() { sha256sum | cut -c1-16; }
peer_psk() {   # peer_psk NODE PEER -> "(none)", or a hash of the preshared key NODE's kernel holds for PEER
    local pub; pub=$(eval echo "\$PUB_$2")
    on "$1" /ctl/wg show encryptd0 preshared-keys | awk -v k="$pub" '$1 == k { print $2 }' |
        while read -r p; do if [ "$p" = "(none)" ]; then echo "$p"; else printf %s "$p" | hash16; fi; done || true
}
psk_file_is() {   # psk_file_is NODE KEY: /etc/encryptd/wireguard.psk holds KEY (compared by hash)
    eq "$(on "$1" "tr -d '\n' </etc/encryptd/wireguard.psk" | hash16)" "$(printf %s "$2" | hash16)"
}
handshake_after() {   # handshake_after NODE PEER T [SECONDS]: NODE's latest handshake with PEER is after T (guest clock)
    local pub hs=0; pub=$(eval echo "\$PUB_$2")
    for _ in $(seq "${4:-150}"); do
        hs=$(on "$1" /ctl/wg show encryptd0 latest-handshakes | awk -v k="$pub" '$1 == k { print $2 }')
        [ "${hs:-0}" -gt "$3" ] && { echo "       $1-$2 handshake $((hs - $3)) s after the play"; return 0; }
        sleep 1
    done
    echo "       $1's latest handshake with $2: ${hs:-none}, want after $3"; return 1
}

# --- a. IPsec, first run ------------------------------------------------------------------------
say "a. IPsec: first run (install the .deb, write and validate the files, start)"
play first
[ $PRC = 0 ] || show_play first
check "ansible-playbook exits 0" eq "$PRC" 0
[ $PRC = 0 ] || { echo "$PASS passed, $FAIL failed (stopped: the first run failed)"; exit 1; }
for N in $(seq $NODES); do echo "       n$N changed: $(changed_tasks first n$N)"; done
for N in $(seq $NODES); do
    n=n$N
    check "$n: encryptd installed by apt (dpkg status)" eq "$(on $n "dpkg-query -W -f='\${Status}' encryptd")" "install ok installed"
    check "$n: the .deb was copied to /var/cache/encryptd-ansible" on $n test -s "/var/cache/encryptd-ansible/$(basename "$DEB")"
    check "$n: encryptd.toml 0644 root" file_is $n /etc/encryptd/encryptd.toml "644 root:root"
    check "$n: nodes.toml 0644 root" file_is $n /etc/encryptd/nodes.toml "644 root:root"
    check "$n: ipsec.keys 0600 root" file_is $n /etc/encryptd/ipsec.keys "600 root:root"
    check "$n: ipsec.keys holds the vaulted key" eq "$(on $n "grep -v '^#' /etc/encryptd/ipsec.keys")" "$KEY1"
    check "$n: encryptd.toml names this node" on $n grep -qx "'node = \"$n\"'" /etc/encryptd/encryptd.toml
    check "$n: nodes.toml lists all $NODES nodes" eq "$(on $n "grep -c '^name = ' /etc/encryptd/nodes.toml")" "$NODES"
    check "$n: nodes.toml is the same on every node" eq "$(on $n sha256sum /etc/encryptd/nodes.toml | cut -d' ' -f1)" \
        "$(on n1 sha256sum /etc/encryptd/nodes.toml | cut -d' ' -f1)"
    check "$n: encryptd check accepts the deployed files" on $n encryptd check
    check "$n: no staging directory left in /run" eq "$(on $n "ls -d /run/encryptd-ansible.* 2>/dev/null")" ""
    check "$n: unit enabled" eq "$(on $n systemctl is-enabled encryptd)" enabled
    check "$n: unit active" eq "$(on $n systemctl is-active encryptd)" active
    check "$n: started once, not reloaded (it started on the new files)" eq "$(reloads $n)" 0
done
check "handler 'Reload encryptd' skipped on the first run" eval '! handler_ran first "Reload encryptd" n1'
for N in $(seq $NODES); do
    check "n$N: STATUS= ipsec: $((NODES - 1))/$((NODES - 1)) peers up, key 1, strict on" \
        wait_status n$N "ipsec: $((NODES - 1))/$((NODES - 1)) peers up, key 1, strict on"
done
for N in $(seq $NODES); do check "n$N: pings; it sends only ESP on wire0; encryptd status 0" e2e n$N ipsec; done

# --- b. idempotence -----------------------------------------------------------------------------
say "b. IPsec: the same run again"
for N in $(seq $NODES); do eval "PID$N=\$(mainpid n$N); SUM$N=\$(sums n$N)"; done
play again
[ $PRC = 0 ] || show_play again
check "ansible-playbook exits 0" eq "$PRC" 0
for N in $(seq $NODES); do
    check "n$N: nothing changed (changed=0)" eq "$(recap again n$N changed)" 0
    check "n$N: no reload, same PID" eq "$(reloads n$N) $(mainpid n$N)" "0 $(eval echo \$PID$N)"
done

# --- c. a broken inventory ----------------------------------------------------------------------
say "c. a broken inventory is refused by validate"
play broken-inventory -e '{"encryptd_addresses": ["192.0.2.300"]}'
check "ansible-playbook fails" test "$PRC" != 0
check "it failed at 'Install nodes.toml'" grep -q 'TASK \[encryptd : Install nodes.toml\]' "$WORK/play-broken-inventory.log"
check "encryptd check's message is shown (file:line:col)" \
    grep -qE ':[0-9]+:[0-9]+: \\?"192\.0\.2\.300\\?" is not an IPv4 or IPv6 address' "$WORK/play-broken-inventory.log"
grep -E 'is not an IPv4' "$WORK/play-broken-inventory.log" | head -2 | cut -c1-300 | sed 's/^/       | /'
for N in $(seq $NODES); do
    check "n$N: deployed files unchanged (contents, modes)" eq "$(sums n$N)" "$(eval echo \"\$SUM$N\")"
    check "n$N: no reload, same PID" eq "$(reloads n$N) $(mainpid n$N)" "0 $(eval echo \$PID$N)"
    check "n$N: still up with the old files" eq "$(statustext n$N)" "ipsec: $((NODES - 1))/$((NODES - 1)) peers up, key 1, strict on"
    check "n$N: no staging directory left" eq "$(on n$N "ls -d /run/encryptd-ansible.* 2>/dev/null")" ""
done

# --- d. a broken key ---------------------------------------------------------------------------
say "d. a broken key line is refused by validate"
play broken-key -e '{"encryptd_ipsec_keys": ["16+ rfc4106(gcm(aes)) 00112233445566778899aabbccddeeff00112233 128"]}'
check "ansible-playbook fails" test "$PRC" != 0
check "it failed at 'Install ipsec.keys'" grep -q 'TASK \[encryptd : Install ipsec.keys\]' "$WORK/play-broken-key.log"
check "encryptd check's message is shown" grep -q 'key-id 16 is out of range 1..15' "$WORK/play-broken-key.log"
check "no key bytes in Ansible's output" eval "! grep -q -e 00112233445566778899 -e '${KEY1#1+ rfc4106(gcm(aes)) }' '$WORK/play-broken-key.log' '$WORK/play-first.log'"
for N in $(seq $NODES); do
    check "n$N: deployed files unchanged (ipsec.keys still 0600, key 1)" eq "$(sums n$N)" "$(eval echo \"\$SUM$N\")"
    check "n$N: no reload, same PID" eq "$(reloads n$N) $(mainpid n$N)" "0 $(eval echo \$PID$N)"
done

# --- e0. check mode ----------------------------------------------------------------------------
say "e0. --check --diff with key-id 2 appended in the vault: reports, changes nothing"
vault "$KEY1" "$KEY2"
play check-mode --check --diff
[ $PRC = 0 ] || show_play check-mode
check "ansible-playbook --check --diff exits 0" eq "$PRC" 0
for N in $(seq $NODES); do
    check "n$N: would change ipsec.keys (and reload)" eq "$(changed_tasks check-mode n$N)" "Install ipsec.keys;Reload encryptd"
    check "n$N: deployed files unchanged" eq "$(sums n$N)" "$(eval echo \"\$SUM$N\")"
    check "n$N: no reload, same PID" eq "$(reloads n$N) $(mainpid n$N)" "0 $(eval echo \$PID$N)"
done
check "no key bytes in the diff output" eval "! grep -q -e '${KEY1#1+ rfc4106(gcm(aes)) }' -e '${KEY2#2+ rfc4106(gcm(aes)) }' '$WORK/play-check-mode.log'"

# --- e. rotation ---------------------------------------------------------------------------------
say "e. rotation: key-id 2 appended in the vault"
on n1 "ping -n -i 0.2 -W 2 -I 10.99.1.1 10.99.2.1 >/run/rot-ping.out 2>&1 & echo \$! >/run/rot-ping.pid"
play rotate
[ $PRC = 0 ] || show_play rotate
check "ansible-playbook exits 0" eq "$PRC" 0
for N in $(seq $NODES); do
    check "n$N: changed: ipsec.keys, and the handler's reload" eq "$(changed_tasks rotate n$N)" "Install ipsec.keys;Reload encryptd"
    check "n$N: handler 'Reload encryptd' ran" handler_ran rotate "Reload encryptd" n$N
    check "n$N: systemd reloaded it once, same PID (no restart)" eq "$(reloads n$N) $(mainpid n$N)" "1 $(eval echo \$PID$N)"
    check "n$N: ipsec.keys: key 1 then key 2, 0600" eq "$(on n$N "grep -v '^#' /etc/encryptd/ipsec.keys; stat -c %a /etc/encryptd/ipsec.keys")" \
        "$KEY1
$KEY2
600"
done
for N in $(seq $NODES); do
    check "n$N: STATUS= ... key 2" wait_status n$N "ipsec: $((NODES - 1))/$((NODES - 1)) peers up, key 2, strict on" 120
done
sleep 2
pings=$(on n1 'kill -INT $(cat /run/rot-ping.pid); sleep 1; tail -3 /run/rot-ping.out' | sed -n 's/^\([0-9]*\) packets transmitted, \([0-9]*\) received.*/\1 \2/p')
check "no ping lost across the rotation (${pings#* } of ${pings% *} answered, every 200 ms, subnet to subnet)" \
    test -n "$pings" -a "${pings% *}" = "${pings#* }" -a "${pings% *}" -gt 0
for N in $(seq $NODES); do check "n$N: pings; it sends only ESP on wire0; encryptd status 0" e2e n$N ipsec; done

# --- f. WireGuard ------------------------------------------------------------------------------
say "f. mode switched to WireGuard (public keys collected through hostvars)"
sed -i 's/^encryptd_mode: ipsec$/encryptd_mode: wireguard/' "$A/group_vars/encryptd/vars.yml"
for N in $(seq $NODES); do eval "PID$N=\$(mainpid n$N)"; done
T_WG=$(date +%s.%N)
play wireguard
[ $PRC = 0 ] || show_play wireguard
check "ansible-playbook exits 0" eq "$PRC" 0
for N in $(seq $NODES); do
    n=n$N
    check "$n: the private key was made, 0600" file_is $n /var/lib/encryptd/wireguard.key "600 root:root"
    pub=$(on $n encryptd pubkey)
    for M in $(seq $NODES); do
        check "n$M's nodes.toml has $n's public key (encryptd pubkey on $n)" \
            on n$M "grep -A3 '^name = \"$n\"' /etc/encryptd/nodes.toml | grep -qxF 'wireguard_public_key = \"$pub\"'"
    done
    check "$n: encryptd.toml says wireguard" on $n grep -qx "'mode = \"wireguard\"'" /etc/encryptd/encryptd.toml
    check "$n: handler 'Restart encryptd for a change of mode' ran" handler_ran wireguard "Restart encryptd for a change of mode" $n
    check "$n: handler 'Reload encryptd' did not" eval "! handler_ran wireguard 'Reload encryptd' $n"
    check "$n: restarted (new PID)" test "$(mainpid $n)" != "$(eval echo \$PID$N)"
done
for N in $(seq $NODES); do
    n=n$N
    check "$n: STATUS= wireguard: $((NODES - 1))/$((NODES - 1)) peers up, strict on" \
        wait_status $n "wireguard: $((NODES - 1))/$((NODES - 1)) peers up, strict on" 120
    check "$n: no XFRM policies or states left (removed by the new daemon)" eq "$(on $n 'ip xfrm policy; ip xfrm state')" ""
    check "$n: encryptd0 is a WireGuard link" on $n "ip -d link show encryptd0 | grep -qw wireguard"
done
T_WG_UP=$(date +%s.%N)
for N in $(seq $NODES); do check "n$N: pings; it sends only WireGuard UDP on wire0; encryptd status 0" e2e n$N wireguard; done

say "g. WireGuard: the same run again"
play wireguard-again
[ $PRC = 0 ] || show_play wireguard-again
check "ansible-playbook exits 0" eq "$PRC" 0
for N in $(seq $NODES); do check "n$N: nothing changed (changed=0)" eq "$(recap wireguard-again n$N changed)" 0; done

# --- h. WireGuard preshared key -------------------------------------------------------------
say "h. WireGuard: a cluster preshared key set in the vault"
for N in $(seq $NODES); do
    eval "PUB_n$N=\$(on n$N encryptd pubkey) PID$N=\$(mainpid n$N) REL$N=\$(reloads n$N)"
    eval "JPSK$N=\$(jcount n$N 'changed: .*new preshared key')"
done
VAULT_PSK=$PSK1 vault "$KEY1" "$KEY2"
echo 'encryptd_wireguard_preshared_key: "{{ vault_encryptd_wireguard_preshared_key }}"' >>"$A/group_vars/encryptd/vars.yml"
play psk
[ $PRC = 0 ] || show_play psk
check "ansible-playbook exits 0" eq "$PRC" 0
for N in $(seq $NODES); do
    n=n$N
    check "$n: changed: wireguard.psk, encryptd.toml, and the handler's reload" \
        eq "$(changed_tasks psk $n)" "Install wireguard.psk;Install encryptd.toml;Reload encryptd"
    check "$n: wireguard.psk 0600 root" file_is $n /etc/encryptd/wireguard.psk "600 root:root"
    check "$n: wireguard.psk holds the vaulted key" psk_file_is $n "$PSK1"
    check "$n: encryptd.toml names it (and no userspace WireGuard)" \
        on $n "grep -qx 'preshared_key = \"/etc/encryptd/wireguard.psk\"' /etc/encryptd/encryptd.toml && grep -qx 'userspace = \"\"' /etc/encryptd/encryptd.toml"
    check "$n: encryptd check accepts the deployed files" on $n encryptd check
    check "$n: handler 'Reload encryptd' ran" handler_ran psk "Reload encryptd" $n
    check "$n: systemd reloaded it once, same PID (no restart)" eq "$(reloads $n) $(mainpid $n)" "$(($(eval echo \$REL$N) + 1)) $(eval echo \$PID$N)"
    check "$n: the journal says 'peer ... changed: new preshared key'" \
        test "$(jcount $n 'changed: .*new preshared key')" -gt "$(eval echo \$JPSK$N)"
    for M in $(seq $NODES); do
        if [ $M = $N ]; then continue; fi
        k=$(peer_psk $n n$M)
        check "$n: wg show: a preshared key for peer n$M (not \"(none)\")" test -n "$k" -a "$k" != "(none)"
        check "$n: the key for n$M is derived, not the cluster key itself" test "$k" != "$(printf %s "$PSK1" | hash16)"
        if [ $M -gt $N ]; then check "$n and n$M hold the same key for their pair" eq "$k" "$(peer_psk n$M $n)"; fi
        eval "PAIR_${N}_$M=\$k"
    done
done
for N in $(seq $NODES); do
    check "n$N: STATUS= wireguard: $((NODES - 1))/$((NODES - 1)) peers up, strict on" \
        wait_status n$N "wireguard: $((NODES - 1))/$((NODES - 1)) peers up, strict on" 120
done
for N in $(seq $NODES); do check "n$N: pings; it sends only WireGuard UDP on wire0; encryptd status 0" e2e n$N wireguard; done
check "no key bytes in Ansible's output" eval "! grep -qF -e '$PSK1' '$WORK/play-psk.log'"

# --- i. preshared key rotation ----------------------------------------------------------------
say "i. WireGuard: the cluster preshared key rotated (a new one in the vault)"
for N in $(seq $NODES); do eval "PID$N=\$(mainpid n$N) REL$N=\$(reloads n$N)"; done
VAULT_PSK=$PSK2 vault "$KEY1" "$KEY2"
on n1 "ping -n -i 0.2 -W 2 -I 10.99.1.1 10.99.2.1 >/run/psk-ping.out 2>&1 & echo \$! >/run/psk-ping.pid"
play psk-rotate
[ $PRC = 0 ] || show_play psk-rotate
T_PSK2=$(on n1 date +%s)
check "ansible-playbook exits 0" eq "$PRC" 0
for N in $(seq $NODES); do
    n=n$N
    check "$n: changed: wireguard.psk, and the handler's reload" eq "$(changed_tasks psk-rotate $n)" "Install wireguard.psk;Reload encryptd"
    check "$n: wireguard.psk 0600 root, the new key" eval "file_is $n /etc/encryptd/wireguard.psk '600 root:root' && psk_file_is $n '$PSK2'"
    check "$n: handler 'Reload encryptd' ran" handler_ran psk-rotate "Reload encryptd" $n
    check "$n: systemd reloaded it once, same PID (no restart)" eq "$(reloads $n) $(mainpid $n)" "$(($(eval echo \$REL$N) + 1)) $(eval echo \$PID$N)"
    for M in $(seq $NODES); do
        if [ $M = $N ]; then continue; fi
        k=$(peer_psk $n n$M)
        check "$n: wg show: a new preshared key for peer n$M" \
            test -n "$k" -a "$k" != "(none)" -a "$k" != "$(eval echo \$PAIR_${N}_$M)"
        if [ $M -gt $N ]; then check "$n and n$M hold the same new key for their pair" eq "$k" "$(peer_psk n$M $n)"; fi
    done
done
# The session in use goes on; the next handshake (every 2 min) is made with the new key.
check "n1-n2: a handshake under the new key" handshake_after n1 n2 "$T_PSK2" 150
pings=$(on n1 'kill -INT $(cat /run/psk-ping.pid); sleep 1; tail -3 /run/psk-ping.out' | sed -n 's/^\([0-9]*\) packets transmitted, \([0-9]*\) received.*/\1 \2/p')
check "no ping lost across the rotation and the next handshake (${pings#* } of ${pings% *} answered, every 200 ms, subnet to subnet)" \
    test -n "$pings" -a "${pings% *}" = "${pings#* }" -a "${pings% *}" -gt 0
for N in $(seq $NODES); do check "n$N: pings; it sends only WireGuard UDP on wire0; encryptd status 0" e2e n$N wireguard; done
check "no key bytes in Ansible's output" eval "! grep -qF -e '$PSK1' -e '$PSK2' '$WORK/play-psk-rotate.log'"

# --- j. preshared key removed ----------------------------------------------------------------
say "j. WireGuard: the preshared key variable emptied"
for N in $(seq $NODES); do eval "PID$N=\$(mainpid n$N) REL$N=\$(reloads n$N) JREM$N=\$(jcount n$N 'changed: .*preshared key removed')"; done
sed -i 's/^encryptd_wireguard_preshared_key: .*/encryptd_wireguard_preshared_key: ""/' "$A/group_vars/encryptd/vars.yml"
play psk-remove
[ $PRC = 0 ] || show_play psk-remove
check "ansible-playbook exits 0" eq "$PRC" 0
for N in $(seq $NODES); do
    n=n$N
    check "$n: changed: encryptd.toml, then wireguard.psk removed, and the handler's reload" \
        eq "$(changed_tasks psk-remove $n)" "Install encryptd.toml;Remove wireguard.psk;Reload encryptd"
    check "$n: wireguard.psk is gone" on $n test ! -e /etc/encryptd/wireguard.psk
    check "$n: encryptd.toml says preshared_key = \"\"" on $n grep -qx "'preshared_key = \"\"'" /etc/encryptd/encryptd.toml
    check "$n: handler 'Reload encryptd' ran" handler_ran psk-remove "Reload encryptd" $n
    check "$n: systemd reloaded it once, same PID (no restart)" eq "$(reloads $n) $(mainpid $n)" "$(($(eval echo \$REL$N) + 1)) $(eval echo \$PID$N)"
    check "$n: the journal says 'peer ... changed: preshared key removed'" \
        test "$(jcount $n 'changed: .*preshared key removed')" -gt "$(eval echo \$JREM$N)"
    for M in $(seq $NODES); do
        if [ $M = $N ]; then continue; fi
        check "$n: wg show: peer n$M has no preshared key (\"(none)\")" eq "$(peer_psk $n n$M)" "(none)"
    done
    check "$n: STATUS= wireguard: $((NODES - 1))/$((NODES - 1)) peers up, strict on" \
        wait_status $n "wireguard: $((NODES - 1))/$((NODES - 1)) peers up, strict on" 120
done
for N in $(seq $NODES); do check "n$N: pings; it sends only WireGuard UDP on wire0; encryptd status 0" e2e n$N wireguard; done
check "no key bytes in any of Ansible's output" eval "! grep -qF -e '$PSK1' -e '$PSK2' '$WORK'/play-*.log"

# --- k. the inventory from etcd --------------------------------------------------------------
say "k. WireGuard: the inventory from etcd (encryptd sync; one etcd member on n1, TLS, RBAC)"
E=$WORK/etcd; mkdir -p "$E"
# EC keys (RSA generation is slow under TCG). The nodes' client certificate has no Common
# Name: etcd's JSON gateway refuses one; RBAC goes by user and password (docs/sync.md).
EC="-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"
( cd "$E" && set -e
  openssl req -x509 $EC -keyout ca.key -out ca.pem -days 2 -subj /CN=encryptd-test-ca
  openssl req $EC -keyout member.key -out member.csr -subj /CN=etcd-member
  printf 'subjectAltName=IP:192.0.2.100\nextendedKeyUsage=serverAuth,clientAuth\n' >member.ext
  openssl x509 -req -in member.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out member.pem -days 2 -extfile member.ext
  openssl req $EC -keyout node.key -out node.csr -subj /O=encryptd-nodes
  printf 'extendedKeyUsage=clientAuth\n' >client.ext
  openssl x509 -req -in node.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out node.pem -days 2 -extfile client.ext
  openssl req $EC -keyout root.key -out root.csr -subj /CN=root
  openssl x509 -req -in root.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out root.pem -days 2 -extfile client.ext
) >"$E/openssl.log" 2>&1 || { cat "$E/openssl.log"; die "openssl failed"; }
cp "$E/ca.pem" "$E/member.pem" "$E/member.key" "$E/root.pem" "$E/root.key" "$E/node.pem" "$E/node.key" "$CTL/"
# etcd fallocates 64 MiB per WAL segment and a spare: ramfs refuses fallocate (sparse
# files instead), keeping the guest's RAM for the test.
# etcd outside the mesh, as it must be (docs/sync.md): its own address on n1's wire, not
# a node address, so that the syncs reach it whatever their inventories say.
on n1 "ip addr add 192.0.2.100/24 dev wire0 && mkdir -p /var/lib/etcd-test && mount -t ramfs -o mode=0700 ramfs /var/lib/etcd-test && \
  systemd-run --quiet --unit=etcd-test /ctl/etcd --name=e0 --data-dir=/var/lib/etcd-test/e0 \
  --listen-client-urls=https://192.0.2.100:2379 --advertise-client-urls=https://192.0.2.100:2379 \
  --listen-peer-urls=http://127.0.0.1:2380 --initial-advertise-peer-urls=http://127.0.0.1:2380 \
  --initial-cluster=e0=http://127.0.0.1:2380 --heartbeat-interval=250 --election-timeout=2500 \
  --cert-file=/ctl/member.pem --key-file=/ctl/member.key --trusted-ca-file=/ctl/ca.pem --client-cert-auth"
ETCDCTL="/ctl/etcdctl --endpoints=https://192.0.2.100:2379 --cacert=/ctl/ca.pem --dial-timeout=3s --command-timeout=10s"
ectl() { on n1 "$ETCDCTL --cert=/ctl/root.pem --key=/ctl/root.key $*"; }
etcd_up() {
    for _ in $(seq 60); do ectl endpoint health >/dev/null 2>&1 && return 0; sleep 1; done
    on n1 'journalctl -u etcd-test -o cat | tail -20' | sed 's/^/       | /'; return 1
}
check "etcd on n1 is healthy (TLS, client certificates)" etcd_up
SYNC_PW1=$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')
SYNC_PW2=$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')
rbac() {   # root, and a user per node that may write only its own key and read the prefix
    ectl user add root --new-user-password=rootpw-$SYNC_PW1 && ectl user grant-role root root || return 1
    local N pw
    for N in $(seq $NODES); do
        pw=$(eval echo "\$SYNC_PW$N")
        ectl role add node-n$N && ectl role grant-permission node-n$N readwrite /encryptd/test/nodes/n$N &&
            ectl role grant-permission node-n$N read --prefix=true /encryptd/test/nodes/ &&
            ectl user add n$N --new-user-password=$pw && ectl user grant-role n$N node-n$N || return 1
    done
    ectl auth enable
}
check "etcd RBAC on: a user per node that may write only its own key" eval 'rbac >"$WORK/rbac.log" 2>&1'
KEY_BODY=$(sed -n 2p "$E/node.key")
VAULT_EXTRA="vault_encryptd_sync_key: |
$(sed 's/^/  /' "$E/node.key")
vault_encryptd_sync_passwords:
  n1: \"$SYNC_PW1\"
  n2: \"$SYNC_PW2\""
vault "$KEY1" "$KEY2"
{
    echo "encryptd_inventory_source: etcd"
    echo "encryptd_sync_endpoints: [https://192.0.2.100:2379]"
    echo "encryptd_sync_prefix: /encryptd/test"
    echo "encryptd_sync_ca: \"{{ lookup('file', '$E/ca.pem') }}\""
    echo "encryptd_sync_cert: \"{{ lookup('file', '$E/node.pem') }}\""
    echo "encryptd_sync_key: \"{{ vault_encryptd_sync_key }}\""
    echo "encryptd_sync_password: \"{{ vault_encryptd_sync_passwords[inventory_hostname] }}\""
} >>"$A/group_vars/encryptd/vars.yml"
for N in $(seq $NODES); do eval "PID$N=\$(mainpid n$N)"; done
play etcd
[ $PRC = 0 ] || show_play etcd
check "ansible-playbook exits 0" eq "$PRC" 0
check "the play skipped the check that every host published an entry" \
    eval "grep -A1 'TASK \[encryptd : Check that every node of the group published its entry\]' '$WORK/play-etcd.log' | grep -q '^skipping:'"
for N in $(seq $NODES); do
    n=n$N
    check "$n: encryptd-sync is enabled and active" \
        eq "$(on $n systemctl is-enabled encryptd-sync) $(on $n systemctl is-active encryptd-sync)" "enabled active"
    check "$n: the etcd key is 0600 root" file_is $n /etc/encryptd/etcd/node.key "600 root:root"
    check "$n: the etcd password is 0600 root" file_is $n /etc/encryptd/etcd/password "600 root:root"
    check "$n: encryptd.toml has the [sync] table" on $n grep -qx "'\[sync\]'" /etc/encryptd/encryptd.toml
    pub=$(on $n encryptd pubkey)
    check "$n: its registration in etcd holds its public key" \
        eval "ectl get /encryptd/test/nodes/$n --print-value-only | grep -qF '\"wireguard_public_key\":\"$pub\"'"
    for M in $(seq $NODES); do
        check "n$M: nodes.toml, rendered by encryptd sync, has $n's public key" \
            on n$M "grep -q '^# Rendered by .encryptd sync.' /etc/encryptd/nodes.toml && grep -A4 '^name = \"$n\"' /etc/encryptd/nodes.toml | grep -qxF 'wireguard_public_key = \"$pub\"'"
    done
    check "$n: the daemon kept running (same PID)" eq "$(mainpid $n)" "$(eval echo \$PID$N)"
    check "$n: STATUS= wireguard: $((NODES - 1))/$((NODES - 1)) peers up, strict on" \
        wait_status $n "wireguard: $((NODES - 1))/$((NODES - 1)) peers up, strict on" 120
done
check "n2's etcd user cannot write n1's registration (etcd refuses it)" \
    eval "on n1 \"$ETCDCTL --cert=/ctl/node.pem --key=/ctl/node.key --user=n2:$SYNC_PW2 put /encryptd/test/nodes/n1 x\" 2>&1 | grep -q 'permission denied'"
for N in $(seq $NODES); do check "n$N: pings; it sends only WireGuard UDP on wire0; encryptd status 0" e2e n$N wireguard; done
check "no etcd key or password bytes in Ansible's output" \
    eval "! grep -qF -e '$KEY_BODY' -e '$SYNC_PW1' -e '$SYNC_PW2' '$WORK'/play-*.log"

say "k2. the inventory from etcd: a run limited to one host needs no other host's facts"
play etcd-limit --limit n1
[ $PRC = 0 ] || show_play etcd-limit
check "ansible-playbook --limit n1 exits 0" eq "$PRC" 0
check "n1: nothing changed (changed=0)" eq "$(recap etcd-limit n1 changed)" 0

say "the wire between n1 and n2 (qemu's capture of n1's link, host side, the whole run)"
tcpdump -n -tt -r "$WORK/wire.pcap" 2>/dev/null >"$WORK/wire.txt" || true
wire() {   # wire FROM TO REGEX: frames between the two times (epoch seconds) matching REGEX
    awk -v a="$1" -v b="$2" -v re="$3" '$1 >= a && $1 < b && $0 ~ re { n++ } END { print n + 0 }' "$WORK/wire.txt"
}
ESP_RE='ESP\\(' WG_RE='\\.51871[ :]' PING_RE='ICMP echo|ICMP6, echo'
echo "       $(wc -l <"$WORK/wire.txt") frames; IPsec phases: $(wire 0 "$T_WG" "$ESP_RE") ESP," \
     "$(wire 0 "$T_WG" "$PING_RE") plaintext pings; WireGuard phases: $(wire "$T_WG" 9e9 "$WG_RE") WireGuard UDP," \
     "$(wire "$T_WG" 9e9 "$ESP_RE") ESP, $(wire "$T_WG" 9e9 "$PING_RE") plaintext pings"
check "no plaintext ping ever crossed the wire (requests or replies)" eq "$(wire 0 9e9 "$PING_RE")" 0
check "IPsec phases: ESP on the wire" test "$(wire 0 "$T_WG" "$ESP_RE")" -gt 0
check "WireGuard phases: WireGuard UDP on the wire" test "$(wire "$T_WG" 9e9 "$WG_RE")" -gt 0
check "WireGuard, once up: no ESP on the wire" eq "$(wire "$T_WG_UP" 9e9 "$ESP_RE")" 0
grep -E 'ESP\(' "$WORK/wire.txt" | sed -n 1,2p | cut -c1-120 | sed 's/^/       | /'
grep -E '\.51871[ :]' "$WORK/wire.txt" | sed -n 1,2p | cut -c1-120 | sed 's/^/       | /'

say "the journal of n1's encryptd"
on n1 'journalctl -b -u encryptd -o short-monotonic --no-pager | tail -30' | sed 's/^/       | /'
for N in $(seq $NODES); do on n$N 'systemctl poweroff --no-block' >/dev/null 2>&1 || true; done
say "done: $PLAYS ansible-playbook runs"
echo "$PASS passed, $FAIL failed"
[ $FAIL = 0 ]
