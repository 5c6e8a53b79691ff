//! `encryptd sync` against a real etcd: a 3-member cluster from Debian's etcd-server, each
//! member in a namespace of its own on the wire, TLS with client certificates on every
//! connection and RBAC on (a user per node that may write only its own key). The nodes'
//! inventories are whatever their syncs render; their daemons run on them.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::Case;
use crate::fleet::{self, Fleet, Kind, TestDaemon};
use crate::rig::{ensure, sh_within, wait_for};

pub const CASES: &[Case] = &[
    ("sync_ipsec_fleet_from_etcd", ipsec_fleet),
    ("sync_wireguard_fleet_from_etcd", wireguard_fleet),
];

const PREFIX: &str = "/encryptd/sy";

fn etcd_bin(name: &str) -> PathBuf {
    let cache = std::env::var("VM_CACHE").unwrap_or_else(|_| {
        format!(
            "{}/.cache/encryptd-kernel-vm",
            std::env::var("HOME").unwrap_or_else(|_| "/root".into())
        )
    });
    Path::new(&cache).join("etcd/usr/bin").join(name)
}

/// A cluster of etcd members on the fleet's wire, and the certificates of everyone.
struct Etcd {
    dir: PathBuf,
    ns: Vec<String>,
    addrs: Vec<Ipv4Addr>,
    members: Vec<Option<Child>>,
}

impl Etcd {
    fn start(f: &mut Fleet, n: usize) -> Result<Etcd, String> {
        for b in ["etcd", "etcdctl"] {
            ensure(
                etcd_bin(b).is_file(),
                format!(
                    "{} missing: tests/vm/setup.sh extracts it",
                    etcd_bin(b).display()
                ),
            )?;
        }
        let dir = f.dirs[0].parent().unwrap().join("etcd");
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        // etcd fallocates 64 MiB for each WAL segment and one spare: on the guest's tmpfs
        // that is ~128 MiB of its 1 GiB RAM per member, and two clusters in a run filled
        // the disk ("no space left on device"). ramfs refuses fallocate, so etcd falls
        // back to a sparse file; Drop unmounts it, so nothing outlives the case.
        let out = Command::new("mount")
            .args(["-t", "ramfs", "-o", "mode=0700", "ramfs"])
            .arg(&dir)
            .output()
            .map_err(|e| format!("mount: {e}"))?;
        ensure(
            out.status.success(),
            format!(
                "mount ramfs on {}: {}",
                dir.display(),
                String::from_utf8_lossy(&out.stderr)
            ),
        )?;
        let mut ns = Vec::new();
        let mut addrs = Vec::new();
        for i in 0..n {
            let a = Ipv4Addr::new(10, 77, 0, 201 + i as u8);
            ns.push(f.topo.add_wire_host(
                &format!("e{i}"),
                a,
                format!("fd77::2:{i}").parse().unwrap(),
            )?);
            addrs.push(a);
        }
        let sans: Vec<String> = addrs.iter().map(|a| format!("IP:{a}")).collect();
        // EC keys: RSA key generation is slow under emulation. The nodes' certificate has
        // no Common Name: etcd's JSON gateway refuses one (it cannot map it to a user).
        let ec = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
        sh_within(
            &format!(
                "cd {d} && openssl req -x509 {ec} -keyout ca.key -out ca.pem -days 2 -subj /CN=encryptd-test-ca 2>/dev/null \
                 && openssl req {ec} -keyout member.key -out member.csr -subj /CN=etcd-member 2>/dev/null \
                 && printf 'subjectAltName={sans}\\nextendedKeyUsage=serverAuth,clientAuth\\n' > member.ext \
                 && openssl x509 -req -in member.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out member.pem -days 2 -extfile member.ext 2>/dev/null \
                 && openssl req {ec} -keyout node.key -out node.csr -subj /O=encryptd-nodes 2>/dev/null \
                 && printf 'extendedKeyUsage=clientAuth\\n' > client.ext \
                 && openssl x509 -req -in node.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out node.pem -days 2 -extfile client.ext 2>/dev/null \
                 && openssl req {ec} -keyout root.key -out root.csr -subj /CN=root 2>/dev/null \
                 && openssl x509 -req -in root.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out root.pem -days 2 -extfile client.ext 2>/dev/null \
                 && chmod 600 *.key",
                d = dir.display(),
                sans = sans.join(",")
            ),
            Duration::from_secs(60),
        )?;
        let mut e = Etcd {
            dir,
            ns,
            addrs,
            members: (0..n).map(|_| None).collect(),
        };
        for i in 0..n {
            e.start_member(i, true)?;
        }
        let t0 = Instant::now();
        let healthy = wait_for(Duration::from_secs(90), || {
            e.ctl("endpoint health --cluster 2>&1")
                .is_ok_and(|s| s.matches("is healthy").count() == n)
        });
        ensure(
            healthy,
            format!("etcd cluster not healthy within 90 s:\n{}", e.logs()),
        )?;
        eprintln!(
            "    etcd: {n} members healthy in {} ms",
            t0.elapsed().as_millis()
        );
        Ok(e)
    }

    fn start_member(&mut self, i: usize, new: bool) -> Result<(), String> {
        let cluster: Vec<String> = self
            .addrs
            .iter()
            .enumerate()
            .map(|(j, a)| format!("e{j}=https://{a}:2380"))
            .collect();
        let d = &self.dir;
        let a = self.addrs[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(d.join(format!("e{i}.log")))
            .map_err(|e| e.to_string())?;
        let tls = |kind: &str| {
            let p = if kind.is_empty() {
                String::new()
            } else {
                format!("{kind}-")
            };
            vec![
                format!("--{p}cert-file={}", d.join("member.pem").display()),
                format!("--{p}key-file={}", d.join("member.key").display()),
                format!("--{p}trusted-ca-file={}", d.join("ca.pem").display()),
                format!("--{p}client-cert-auth"),
            ]
        };
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns[i]])
            .arg(etcd_bin("etcd"))
            .args([
                format!("--name=e{i}"),
                format!("--data-dir={}", d.join(format!("e{i}.data")).display()),
                format!("--listen-client-urls=https://{a}:2379"),
                format!("--advertise-client-urls=https://{a}:2379"),
                format!("--listen-peer-urls=https://{a}:2380"),
                format!("--initial-advertise-peer-urls=https://{a}:2380"),
                format!("--initial-cluster={}", cluster.join(",")),
                format!(
                    "--initial-cluster-state={}",
                    if new { "new" } else { "existing" }
                ),
                "--initial-cluster-token=encryptd-sync-test".into(),
                // Emulated CPUs: raft's defaults (100 ms, 1 s) make leaders flap.
                "--heartbeat-interval=250".into(),
                "--election-timeout=2500".into(),
            ])
            .args(tls(""))
            .args(tls("peer"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("etcd e{i}: {e}"))?;
        self.members[i] = Some(child);
        Ok(())
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn endpoints(&self) -> Vec<String> {
        self.addrs
            .iter()
            .map(|a| format!("https://{a}:2379"))
            .collect()
    }

    /// etcdctl from the first member's namespace; `as_user`: "name:password", else root
    /// by its certificate's Common Name (gRPC maps it to the user).
    fn ctl_as(&self, as_user: Option<&str>, args: &str) -> Result<String, String> {
        let d = self.dir.display();
        let (cert, user) = match as_user {
            Some(u) => ("node", format!("--user={u}")),
            None => ("root", String::new()),
        };
        sh_within(
            &format!(
                "ip netns exec {ns} {ctl} --endpoints={eps} --cacert={d}/ca.pem --cert={d}/{cert}.pem --key={d}/{cert}.key {user} --dial-timeout=3s --command-timeout=10s {args}",
                ns = self.ns[0],
                ctl = etcd_bin("etcdctl").display(),
                eps = self.endpoints().join(","),
            ),
            Duration::from_secs(30),
        )
    }

    fn ctl(&self, args: &str) -> Result<String, String> {
        self.ctl_as(None, args)
    }

    /// Auth on: root, and a user per node name that may write `<prefix>/nodes/<name>` only
    /// and read every registration.
    fn rbac(&self, names: &[String]) -> Result<(), String> {
        let mut script = vec![
            "user add root --new-user-password=rootpw".to_string(),
            "user grant-role root root".into(),
        ];
        for n in names {
            script.extend([
                format!("role add node-{n}"),
                format!("role grant-permission node-{n} readwrite {PREFIX}/nodes/{n}"),
                format!("role grant-permission node-{n} read --prefix=true {PREFIX}/nodes/"),
                format!("user add {n} --new-user-password=pw-{n}"),
                format!("user grant-role {n} node-{n}"),
            ]);
        }
        script.push("auth enable".into());
        for line in script {
            self.ctl(&line)?;
        }
        Ok(())
    }

    fn logs(&self) -> String {
        (0..self.addrs.len())
            .map(|i| {
                let l =
                    std::fs::read_to_string(self.dir.join(format!("e{i}.log"))).unwrap_or_default();
                let tail: Vec<&str> = l.lines().rev().take(15).collect();
                format!(
                    "---- etcd e{i}\n{}\n",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// A running `encryptd sync`, its log in a file.
struct SyncProc {
    child: Option<Child>,
    log: PathBuf,
}

impl SyncProc {
    fn spawn(dir: &Path, ns: &str) -> Result<SyncProc, String> {
        SyncProc::spawn_notifying(dir, ns, None)
    }

    /// With `notify`: the socket standing in for systemd's NOTIFY_SOCKET.
    fn spawn_notifying(dir: &Path, ns: &str, notify: Option<&Path>) -> Result<SyncProc, String> {
        let log = dir.join("sync.log");
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(|e| e.to_string())?;
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                ns,
                env!("CARGO_BIN_EXE_encryptd"),
                "sync",
                "--config",
            ])
            .arg(dir.join("encryptd.toml"))
            .env_remove("JOURNAL_STREAM")
            .env_remove("NOTIFY_SOCKET")
            .envs(notify.map(|p| ("NOTIFY_SOCKET", p)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(out)
            .spawn()
            .map_err(|e| format!("spawn encryptd sync: {e}"))?;
        Ok(SyncProc {
            child: Some(child),
            log,
        })
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for SyncProc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Node i's `[sync]`: the cluster, its addresses and subnet, its etcd user.
fn sync_table(e: &Etcd, i: usize) -> String {
    let eps: Vec<String> = e.endpoints().iter().map(|s| format!("\"{s}\"")).collect();
    let d = e.dir.display();
    format!(
        "\n[sync]\nendpoints = [{}]\nprefix = \"{PREFIX}\"\naddresses = [\"10.77.0.{a}\", \"fd77::{a}\"]\nsubnets = [\"10.1.{i}.0/24\"]\nca = \"{d}/ca.pem\"\ncert = \"{d}/node.pem\"\nkey = \"{d}/node.key\"\nuser = \"n{i}\"\npassword_file = \"pw\"\n",
        eps.join(", "),
        a = i + 1
    )
}

fn configure_node(e: &Etcd, dir: &Path, i: usize) -> Result<(), String> {
    let p = dir.join("encryptd.toml");
    let s = std::fs::read_to_string(&p).map_err(|e| e.to_string())?;
    fleet::write(&p, &(s + &sync_table(e, i)))?;
    fleet::write_keys(&dir.join("pw"), &format!("pw-n{i}\n"))?;
    // The inventory is the sync's to write.
    let _ = std::fs::remove_file(dir.join("nodes.toml"));
    Ok(())
}

/// The node names an inventory file lists.
fn names_in(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("nodes.toml"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            l.strip_prefix("name = \"")?
                .strip_suffix('"')
                .map(String::from)
        })
        .collect()
}

fn wait_names(
    dirs: &[&Path],
    want: &[&str],
    timeout: Duration,
    syncs: &[&SyncProc],
) -> Result<Duration, String> {
    let t0 = Instant::now();
    let ok = wait_for(timeout, || {
        dirs.iter().all(|d| {
            let mut n = names_in(d);
            n.sort();
            let mut w: Vec<String> = want.iter().map(|s| s.to_string()).collect();
            w.sort();
            n == w
        })
    });
    if ok {
        return Ok(t0.elapsed());
    }
    let mut msg = format!("inventories do not list exactly {want:?} within {timeout:?}:\n");
    for d in dirs {
        msg += &format!("  {}: {:?}\n", d.display(), names_in(d));
    }
    for (i, s) in syncs.iter().enumerate() {
        msg += &format!("---- sync {i}\n{}", s.log());
    }
    Err(msg)
}

fn ping(f: &Fleet, from: usize, dst: &str) -> Result<(), String> {
    f.topo
        .exec(from, &format!("ping -c 2 -i 0.2 -W 2 {dst}"))
        .map(|_| ())
        .map_err(|e| format!("n{from} -> {dst}: {e}"))
}

/// Every pair of `nodes` pings over both families under a capture of the node addresses'
/// traffic (etcd's own TLS connections excluded): the lines that were not ESP or hellos.
fn mesh_plaintext(f: &Fleet, nodes: &[usize], allowed: &[&str]) -> Result<usize, String> {
    let cap = f
        .topo
        .capture("not port 2379 and not port 2380 and not net 10.77.0.200/29")?;
    let mut fails = Vec::new();
    for &i in nodes {
        for &j in nodes.iter().filter(|j| **j != i) {
            for dst in [format!("10.77.0.{}", j + 1), format!("fd77::{}", j + 1)] {
                if let Err(e) = ping(f, i, &dst) {
                    fails.push(e);
                }
            }
        }
    }
    let lines = cap.stop();
    ensure(
        fails.is_empty(),
        format!("{}\n{}", fails.join("\n"), f.logs()),
    )?;
    let clear = fleet::plaintext(&lines, allowed);
    fleet::no_plaintext(&clear)?;
    Ok(lines.len())
}

fn wait_up(d: &mut TestDaemon, peers: usize) -> Result<(), String> {
    d.wait_notify("READY=1", Duration::from_secs(60))?;
    let want = format!("{peers}/{peers} peers up");
    if !d.notes.last().is_some_and(|n| n.contains(&want)) {
        d.wait_notify(&want, Duration::from_secs(60))?;
    }
    Ok(())
}

fn count(log: &str, needle: &str) -> usize {
    log.matches(needle).count()
}

fn ipsec_fleet() -> Result<(), String> {
    // n0..n3 from the start, n4 joins; n5 registers while etcd is down (no namespace:
    // its sync runs in n4's, and no daemon runs for it).
    let mut f = Fleet::new_with("sy", 5, Kind::Ipsec(fleet::KEY1))?;
    let mut e = Etcd::start(&mut f, 3)?;
    let names: Vec<String> = (0..6).map(|i| format!("n{i}")).collect();
    e.rbac(&names)?;
    let n5 = f.dirs[0].parent().unwrap().join("n5");
    std::fs::create_dir_all(&n5).map_err(|e| e.to_string())?;
    fleet::write(
        &n5.join("encryptd.toml"),
        "mode = \"ipsec\"\nnode = \"n5\"\nruntime_dir = \"run\"\n",
    )?;
    for i in 0..5 {
        configure_node(&e, &f.dirs[i], i)?;
    }
    configure_node(&e, &n5, 5)?;
    let dirs: Vec<PathBuf> = f.dirs.clone();
    let d = |v: &[usize]| -> Vec<&Path> { v.iter().map(|&i| dirs[i].as_path()).collect() };

    // 1. Four nodes register; every inventory holds all four; the mesh is up.
    let t0 = Instant::now();
    let mut syncs: Vec<SyncProc> = Vec::new();
    for i in 0..4 {
        syncs.push(SyncProc::spawn(&f.dirs[i], f.topo.ns(i))?);
    }
    let rendered = wait_names(
        &d(&[0, 1, 2, 3]),
        &["n0", "n1", "n2", "n3"],
        Duration::from_secs(30),
        &syncs.iter().collect::<Vec<_>>(),
    )?;
    for i in 0..4 {
        f.start(i)?;
    }
    for i in 0..4 {
        wait_up(f.daemon(i), 3)?;
    }
    let up = t0.elapsed();
    let packets = mesh_plaintext(&f, &[0, 1, 2, 3], crate::ipsec::IPSEC_WIRE)?;
    eprintln!(
        "    4 nodes registered, every inventory rendered in {} ms, mesh up in {} ms; {packets} packets on the wire, 0 plaintext",
        rendered.as_millis(),
        up.as_millis()
    );

    // 2. A fifth node joins by starting its sync: everyone has it, traffic to it flows.
    let t1 = Instant::now();
    syncs.push(SyncProc::spawn(&f.dirs[4], f.topo.ns(4))?);
    let all5 = ["n0", "n1", "n2", "n3", "n4"];
    let seen = wait_names(
        &d(&[0, 1, 2, 3, 4]),
        &all5,
        Duration::from_secs(10),
        &syncs.iter().collect::<Vec<_>>(),
    )?;
    f.start(4)?;
    let flows = wait_for(Duration::from_secs(10), || {
        (0..4).all(|i| ping(&f, i, "10.77.0.5").is_ok())
    });
    ensure(
        flows,
        format!(
            "no traffic to n4 within 10 s of its inventory\n{}",
            f.logs()
        ),
    )?;
    let joined = t1.elapsed();
    ensure(
        joined < Duration::from_secs(10) + seen,
        format!("n4 took {joined:?} to join"),
    )?;
    eprintln!(
        "    n4 joined: in every inventory {} ms after its sync started, pinged by all {} ms after",
        seen.as_millis(),
        joined.as_millis()
    );

    // 3. One member killed (the one every sync watches through): nothing changes.
    let before: Vec<String> = (0..5)
        .map(|i| std::fs::read_to_string(dirs[i].join("nodes.toml")).unwrap_or_default())
        .collect();
    let warns0: Vec<usize> = syncs.iter().map(|s| count(&s.log(), "WARN")).collect();
    e.kill(0);
    // Past the sync's quiet failover (10 s), when a warning would have been logged.
    std::thread::sleep(Duration::from_secs(12));
    for (i, s) in syncs.iter().enumerate() {
        let log = s.log();
        ensure(
            count(&log, "WARN") == warns0[i],
            format!("n{i}'s sync warned when one member of three stopped:\n{log}"),
        )?;
    }
    for i in 0..5 {
        ensure(
            std::fs::read_to_string(dirs[i].join("nodes.toml")).unwrap_or_default() == before[i],
            format!("n{i}'s inventory changed when one etcd member stopped"),
        )?;
    }

    // 4. All killed: inventories unchanged, traffic flows, one WARN per sync.
    e.kill(1);
    e.kill(2);
    let t_down = Instant::now();
    // n5 starts registering while etcd is down (its sync retries).
    let n5_sync = SyncProc::spawn(&n5, f.topo.ns(4))?;
    std::thread::sleep(Duration::from_secs(14));
    for i in 0..5 {
        ensure(
            std::fs::read_to_string(dirs[i].join("nodes.toml")).unwrap_or_default() == before[i],
            format!("n{i}'s inventory changed while etcd was down"),
        )?;
    }
    for (i, s) in syncs.iter().enumerate() {
        let log = s.log();
        let new = count(&log, "WARN") - warns0[i];
        ensure(
            new == 1 && log.contains("WARN etcd unreachable"),
            format!(
                "n{i}'s sync logged {new} WARN lines for a {} s outage (want one):\n{log}",
                t_down.elapsed().as_secs()
            ),
        )?;
    }
    mesh_plaintext(&f, &[0, 2, 4], crate::ipsec::IPSEC_WIRE)
        .map_err(|x| format!("traffic while etcd is down: {x}"))?;

    // 5. etcd back: the node registered meanwhile appears.
    let outage = t_down.elapsed();
    for i in 0..3 {
        e.start_member(i, false)?;
    }
    let all6 = ["n0", "n1", "n2", "n3", "n4", "n5"];
    let back = wait_names(
        &d(&[0, 1, 2, 3, 4]),
        &all6,
        Duration::from_secs(90),
        &syncs.iter().chain([&n5_sync]).collect::<Vec<_>>(),
    )
    .map_err(|x| format!("{x}\n{}", e.logs()))?;
    for (i, s) in syncs.iter().enumerate() {
        ensure(
            s.log().contains("INFO etcd reachable at"),
            format!("n{i}'s sync did not say etcd is back:\n{}", s.log()),
        )?;
    }
    eprintln!(
        "    etcd: one member down: no change, no warning; all down for {} s: inventories kept, traffic flowed, one WARN per sync; back: n5 (registered meanwhile) everywhere {} ms after the restart",
        outage.as_secs(),
        back.as_millis()
    );

    // 6. Hostile registrations, left out by name on every node; n2 cannot write n3's key.
    e.ctl(&format!(
        "put {PREFIX}/nodes/evil '{{\"name\":\"evil\",\"addresses\":[\"10.77.0.2\"]}}'"
    ))?;
    e.ctl(&format!(
        "put {PREFIX}/nodes/badkey '{{\"name\":\"badkey\",\"addresses\":[\"10.77.0.99\"],\"wireguard_public_key\":\"AAAA\"}}'"
    ))?;
    let denied = e.ctl_as(
        Some("n2:pw-n2"),
        &format!("put {PREFIX}/nodes/n3 '{{\"name\":\"n3\",\"addresses\":[\"10.77.0.2\"]}}'"),
    );
    ensure(
        denied
            .as_ref()
            .is_err_and(|x| x.contains("permission denied")),
        format!("n2's user wrote n3's key: {denied:?}"),
    )?;
    let named = wait_for(Duration::from_secs(15), || {
        syncs.iter().all(|s| {
            let l = s.log();
            l.contains("left out of the inventory: /encryptd/sy/nodes/evil: address 10.77.0.2 is node \"n1\"'s (registered first)")
                && l.contains("left out of the inventory: /encryptd/sy/nodes/badkey: wireguard_public_key must be 32 bytes")
        })
    });
    ensure(
        named,
        format!(
            "the hostile entries were not left out by name everywhere:\n{}",
            syncs
                .iter()
                .map(|s| s.log())
                .collect::<Vec<_>>()
                .join("----\n")
        ),
    )?;
    wait_names(&d(&[0, 1, 2, 3, 4]), &all6, Duration::from_secs(5), &[])?;
    mesh_plaintext(&f, &[1, 3], crate::ipsec::IPSEC_WIRE)?;

    // 7. Deregistration removes a node everywhere.
    drop(n5_sync);
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            f.topo.ns(4),
            env!("CARGO_BIN_EXE_encryptd"),
            "sync",
            "--deregister",
            "--config",
        ])
        .arg(n5.join("encryptd.toml"))
        .output()
        .map_err(|x| x.to_string())?;
    ensure(
        out.status.success(),
        format!(
            "--deregister failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
    )?;
    let gone = wait_names(
        &d(&[0, 1, 2, 3, 4]),
        &all5,
        Duration::from_secs(10),
        &syncs.iter().collect::<Vec<_>>(),
    )?;
    eprintln!(
        "    hostile entries (n1's address, a malformed key) left out by name on all 5 nodes; n2's user refused n3's key; n5 deregistered: gone everywhere in {} ms",
        gone.as_millis()
    );
    Ok(())
}

fn wireguard_fleet() -> Result<(), String> {
    let mut f = Fleet::new_with("sw", 3, Kind::Wireguard)?;
    let e = Etcd::start(&mut f, 3)?;
    let names: Vec<String> = (0..3).map(|i| format!("n{i}")).collect();
    e.rbac(&names)?;
    for i in 0..3 {
        configure_node(&e, &f.dirs[i], i)?;
    }
    let t0 = Instant::now();
    // n0's sync tells "systemd" READY=1 only once its inventory is written (the unit
    // orders the daemon after it, and the daemon's start needs the file).
    let sock = f.dirs[0].join("sync-notify.sock");
    let _ = std::fs::remove_file(&sock);
    let manager = std::os::unix::net::UnixDatagram::bind(&sock).map_err(|e| e.to_string())?;
    manager
        .set_read_timeout(Some(Duration::from_millis(200)))
        .map_err(|e| e.to_string())?;
    let mut syncs = vec![SyncProc::spawn_notifying(
        &f.dirs[0],
        f.topo.ns(0),
        Some(&sock),
    )?];
    for i in 1..3 {
        syncs.push(SyncProc::spawn(&f.dirs[i], f.topo.ns(i))?);
    }
    let mut notes = Vec::new();
    let mut buf = [0u8; 512];
    let ready = wait_for(Duration::from_secs(30), || {
        if let Ok(n) = manager.recv(&mut buf) {
            let m = String::from_utf8_lossy(&buf[..n]).into_owned();
            let ready = m.contains("READY=1");
            notes.push(m);
            // Checked the moment READY arrives: the file must already be there.
            if ready {
                return true;
            }
        }
        false
    });
    let listed = names_in(&f.dirs[0]);
    ensure(
        ready && !listed.is_empty(),
        format!("n0's sync: READY=1 {ready}, inventory then {listed:?}; notifications {notes:?}"),
    )?;
    let dirs: Vec<&Path> = f.dirs.iter().map(|p| p.as_path()).collect();
    wait_names(
        &dirs,
        &["n0", "n1", "n2"],
        Duration::from_secs(30),
        &syncs.iter().collect::<Vec<_>>(),
    )?;
    // The public keys came from the registrations: each node's own key, as `pubkey` prints.
    for i in 0..3 {
        let inv = std::fs::read_to_string(dirs[0].join("nodes.toml")).unwrap_or_default();
        ensure(
            inv.contains(&fleet::wg_public(i)),
            format!("n0's inventory lacks n{i}'s public key:\n{inv}"),
        )?;
    }
    for i in 0..3 {
        f.start(i)?;
    }
    for i in 0..3 {
        wait_up(f.daemon(i), 2)?;
    }
    let packets = mesh_plaintext(&f, &[0, 1, 2], &[".51871: UDP"])?;
    eprintln!(
        "    WireGuard: 3 nodes registered with their public keys, mesh up in {} ms with no key collected by hand; {packets} packets, 0 plaintext",
        t0.elapsed().as_millis()
    );
    Ok(())
}
