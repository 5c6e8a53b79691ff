//! The XFRM executor against a real kernel: states and policies installed through
//! encryptd's own netlink code carry traffic, dump back exactly, respect ownership, and
//! batch.

use std::net::{IpAddr, UdpSocket};
use std::time::Duration;

use encryptd::kernel::xfrm::{Xfrm, XfrmError};
use encryptd::objects::xfrm::{
    Action, Algorithm, Direction, DumpedPolicy, DumpedState, EncapMode, Key, PRIORITY_BLOCK,
    PRIORITY_EXEMPT, PRIORITY_TUNNEL, REQID_MIN, Selector, Template, XfrmPolicy, XfrmState,
};
use zeroize::Zeroizing;

use crate::Case;
use crate::rig::{Topo, ensure, in_netns};

pub const CASES: &[Case] = &[
    ("xfrm_esp_gcm_tunnel_ipv4", esp_gcm_tunnel_ipv4),
    ("xfrm_esp_cbc_hmac_tunnel_ipv6", esp_cbc_hmac_tunnel_ipv6),
    (
        "xfrm_dump_roundtrip_and_ownership",
        dump_roundtrip_and_ownership,
    ),
    ("xfrm_batch_and_named_errors", batch_and_named_errors),
];

const ICMPV6_NEIGHBOUR_SOLICITATION: u8 = 135;
const ICMPV6_NEIGHBOUR_ADVERTISEMENT: u8 = 136;
const HELLO_PORT: u16 = 4510;

/// Deterministic test key bytes (distinct per seed).
fn key(seed: u8, len: usize) -> Key {
    Zeroizing::new(
        (0..len)
            .map(|i| seed.wrapping_mul(31).wrapping_add(i as u8 * 7 + 1))
            .collect(),
    )
}

fn hex(k: &[u8]) -> String {
    k.iter().map(|b| format!("{b:02x}")).collect()
}

fn xfrm<T: Send>(
    ns: &str,
    f: impl FnOnce(&mut Xfrm) -> Result<T, String> + Send,
) -> Result<T, String> {
    in_netns(ns, || {
        let mut x = Xfrm::open().map_err(|e| e.to_string())?;
        f(&mut x)
    })
}

fn install(ns: &str, states: &[XfrmState], policies: &[XfrmPolicy]) -> Result<(), String> {
    xfrm(ns, |x| {
        x.add_states(states).map_err(|e| e.to_string())?;
        x.add_policies(policies).map_err(|e| e.to_string())
    })
}

fn dump(ns: &str) -> Result<(Vec<DumpedState>, Vec<DumpedPolicy>), String> {
    xfrm(ns, |x| {
        let s = x.dump_states().map_err(|e| e.to_string())?;
        let p = x.dump_policies().map_err(|e| e.to_string())?;
        Ok((s, p))
    })
}

/// Host-to-host tunnel policies of `me` towards `peer`.
fn tunnel_policies(me: IpAddr, peer: IpAddr, out_reqid: u32, in_reqid: u32) -> Vec<XfrmPolicy> {
    vec![
        XfrmPolicy {
            selector: Selector::hosts(me, peer),
            dir: Direction::Out,
            priority: PRIORITY_TUNNEL,
            action: Action::Allow,
            template: Some(Template {
                src: me,
                dst: peer,
                reqid: out_reqid,
                mode: EncapMode::Tunnel,
            }),
        },
        XfrmPolicy {
            selector: Selector::hosts(peer, me),
            dir: Direction::In,
            priority: PRIORITY_TUNNEL,
            action: Action::Allow,
            template: Some(Template {
                src: peer,
                dst: me,
                reqid: in_reqid,
                mode: EncapMode::Tunnel,
            }),
        },
    ]
}

/// Plaintext allow policies for IPv6 neighbour discovery between `me` and `peer`, in
/// both directions, ahead of the tunnel policies.
fn nd_exemptions(me: IpAddr, peer: IpAddr) -> Vec<XfrmPolicy> {
    let mut v = Vec::new();
    for t in [
        ICMPV6_NEIGHBOUR_SOLICITATION,
        ICMPV6_NEIGHBOUR_ADVERTISEMENT,
    ] {
        for (dir, sel) in [
            (Direction::Out, Selector::hosts(me, peer)),
            (Direction::In, Selector::hosts(peer, me)),
        ] {
            v.push(XfrmPolicy {
                selector: sel.icmp_type(t),
                dir,
                priority: PRIORITY_EXEMPT,
                action: Action::Allow,
                template: None,
            });
        }
    }
    v
}

/// Both nodes get mirrored policies (`extra` ones ahead of the tunnel), then `before_sas`
/// runs, then both nodes get both SAs (a→b, b→a) and node 0 pings node 1 while the wire
/// is captured. Checks: ping works, both SPIs on the wire, no cleartext echo, the SAs
/// counted the packets (read back through our dump), no XFRM errors.
fn run_pair(
    t: &Topo,
    ab: &XfrmState,
    ba: &XfrmState,
    extra: &dyn Fn(IpAddr, IpAddr) -> Vec<XfrmPolicy>,
    before_sas: &dyn Fn(&Topo) -> Result<(), String>,
    capture_filter: &str,
    cleartext_marks: &[&str],
) -> Result<(), String> {
    let (a, b) = (ab.src, ab.dst);
    for (i, (me, peer, out_rq, in_rq)) in [(a, b, ab.reqid, ba.reqid), (b, a, ba.reqid, ab.reqid)]
        .into_iter()
        .enumerate()
    {
        let mut pols = extra(me, peer);
        pols.extend(tunnel_policies(me, peer, out_rq, in_rq));
        install(t.ns(i), &[], &pols).map_err(|e| format!("policies in {}: {e}", t.ns(i)))?;
    }
    before_sas(t)?;
    for i in 0..2 {
        install(t.ns(i), &[ab.clone(), ba.clone()], &[])
            .map_err(|e| format!("states in {}: {e}", t.ns(i)))?;
    }
    let ping_cmd = if a.is_ipv4() { "ping" } else { "ping -6" };
    let cap = t.capture(capture_filter)?;
    let ping = t.exec(0, &format!("{ping_cmd} -c 3 -i 0.2 -W 2 {b}"));
    let lines = cap.stop();
    let wire = lines.join("\n");
    ping.map_err(|e| format!("ping through the tunnel failed: {e}\nwire:\n{wire}"))?;
    for s in [ab, ba] {
        let mark = format!("ESP(spi=0x{:08x}", s.spi);
        ensure(
            wire.contains(&mark),
            format!("no {mark} on the wire for {s}:\n{wire}"),
        )?;
    }
    for m in cleartext_marks {
        ensure(
            !wire.contains(m),
            format!("cleartext '{m}' on the wire:\n{wire}"),
        )?;
    }
    // Counters through our own dump: b's inbound a→b SA, a's outbound a→b SA.
    let (in_b, _) = dump(t.ns(1))?;
    let inbound = in_b
        .iter()
        .find(|d| d.id() == ab.id())
        .ok_or_else(|| format!("{ab} missing from node 1's dump"))?;
    ensure(
        inbound.counters.packets >= 3 && inbound.counters.bytes > 0 && inbound.counters.seq >= 3,
        format!(
            "node 1's inbound {ab} did not count the pings: {:?}",
            inbound.counters
        ),
    )?;
    let (in_a, _) = dump(t.ns(0))?;
    let outbound = in_a
        .iter()
        .find(|d| d.id() == ab.id())
        .ok_or_else(|| format!("{ab} missing from node 0's dump"))?;
    ensure(
        outbound.counters.oseq >= 3 && outbound.counters.packets >= 3,
        format!(
            "node 0's outbound {ab}: max sequence number not counted: {:?}",
            outbound.counters
        ),
    )?;
    for i in 0..2 {
        let stat = t.exec(i, "cat /proc/net/xfrm_stat")?;
        let bad: Vec<&str> = stat
            .lines()
            .filter(|l| l.split_whitespace().nth(1).is_some_and(|n| n != "0"))
            .collect();
        ensure(
            bad.is_empty(),
            format!("XFRM errors in {}: {bad:?}", t.ns(i)),
        )?;
    }
    Ok(())
}

/// (a) ESP tunnel mode, rfc4106(gcm(aes)), IPv4 underlay.
fn esp_gcm_tunnel_ipv4() -> Result<(), String> {
    let t = Topo::new("xg", 2)?;
    let (a, b) = (IpAddr::V4(t.nodes[0].v4), IpAddr::V4(t.nodes[1].v4));
    let ab = XfrmState::tunnel(
        a,
        b,
        0xa101,
        REQID_MIN + 0x11,
        Algorithm::gcm_aes(key(1, 20), 128),
    );
    let ba = XfrmState::tunnel(
        b,
        a,
        0xb102,
        REQID_MIN + 0x12,
        Algorithm::gcm_aes(key(2, 20), 128),
    );
    run_pair(
        &t,
        &ab,
        &ba,
        &|_, _| Vec::new(),
        &|_| Ok(()),
        &format!("host {a} or host {b}"),
        &["ICMP"],
    )
}

/// Plaintext allow policies for the hello port (UDP 4510) between `me` and `peer`.
fn hello_exemptions(me: IpAddr, peer: IpAddr) -> Vec<XfrmPolicy> {
    [
        (Direction::Out, Selector::hosts(me, peer)),
        (Direction::In, Selector::hosts(peer, me)),
    ]
    .into_iter()
    .map(|(dir, sel)| XfrmPolicy {
        selector: sel.udp_dport(HELLO_PORT),
        dir,
        priority: PRIORITY_EXEMPT,
        action: Action::Allow,
        template: None,
    })
    .collect()
}

/// Before any SA exists the tunnel policies cover all traffic between the nodes, but the
/// hello datagram must get through, in the clear: which needs neighbour discovery to
/// bypass the tunnel policies (node 1's NA to node 0 matches node 1's OUT tunnel policy,
/// for which there is no SA yet, and node 0's IN policy).
fn hello_before_sas(t: &Topo) -> Result<(), String> {
    let (a, b) = (t.nodes[0].v6, t.nodes[1].v6);
    // Sockets keep the namespace they were opened in.
    let rx = in_netns(t.ns(1), || UdpSocket::bind((b, HELLO_PORT)))
        .map_err(|e| format!("bind [{b}]:{HELLO_PORT} in node 1: {e}"))?;
    let tx = in_netns(t.ns(0), || UdpSocket::bind((a, 0)))
        .map_err(|e| format!("bind [{a}]:0 in node 0: {e}"))?;
    rx.set_read_timeout(Some(Duration::from_secs(3)))
        .map_err(|e| e.to_string())?;
    let cap = t.capture(&format!("ip6 and udp port {HELLO_PORT}"))?;
    // Stop the capture before returning on any error: it does not stop on drop.
    let mut sent = Ok(0);
    for _ in 0..3 {
        sent = tx.send_to(b"hello", (b, HELLO_PORT));
        if sent.is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut buf = [0u8; 16];
    let got = rx.recv_from(&mut buf);
    let lines = cap.stop();
    let wire = lines.join("\n");
    sent.map_err(|e| format!("sending the hello before any SA: {e}"))?;
    ensure(
        matches!(got, Ok((5, from)) if from.ip() == IpAddr::V6(a)) && &buf[..5] == b"hello",
        format!(
            "hello from {a} to [{b}]:{HELLO_PORT} did not arrive before the SAs exist \
             (neighbour discovery blocked by the tunnel policies?): {got:?}\nwire:\n{wire}\n\
             neighbours of node 0:\n{}",
            t.exec(0, "ip -6 neigh").unwrap_or_default()
        ),
    )?;
    ensure(
        wire.contains(&format!("{b}.{HELLO_PORT}: UDP")),
        format!("the hello is not on the wire in the clear:\n{wire}"),
    )
}

/// (b) ESP tunnel mode, cbc(aes) + hmac(sha256), IPv6 underlay, with neighbour discovery
/// and the hello port exempted from the tunnel policies (checked before the SAs exist).
fn esp_cbc_hmac_tunnel_ipv6() -> Result<(), String> {
    let t = Topo::new("xc", 2)?;
    let (a, b) = (IpAddr::V6(t.nodes[0].v6), IpAddr::V6(t.nodes[1].v6));
    let alg = |s| Algorithm::cbc_aes_hmac_sha256(key(s, 16), key(s + 1, 32), 128);
    let ab = XfrmState::tunnel(a, b, 0xc201, REQID_MIN + 0x21, alg(3));
    let ba = XfrmState::tunnel(b, a, 0xc202, REQID_MIN + 0x22, alg(5));
    run_pair(
        &t,
        &ab,
        &ba,
        &|me, peer| {
            let mut v = nd_exemptions(me, peer);
            v.extend(hello_exemptions(me, peer));
            v
        },
        &hello_before_sas,
        "ip6",
        &["echo request", "echo reply"],
    )
}

/// (c) What the dump returns is exactly what was installed; foreign objects are listed but
/// flagged, refused by the mutating calls, and survive the deletion of ours.
fn dump_roundtrip_and_ownership() -> Result<(), String> {
    let t = Topo::new("xd", 1)?;
    let me = IpAddr::V4(t.nodes[0].v4);
    let me6 = IpAddr::V6(t.nodes[0].v6);
    let peer: IpAddr = "10.77.0.9".parse().unwrap();
    let peer6: IpAddr = "fd77::9".parse().unwrap();
    let s1 = XfrmState::tunnel(
        me,
        peer,
        0x3001,
        REQID_MIN + 0x31,
        Algorithm::gcm_aes(key(7, 20), 128),
    );
    let mut s2 = XfrmState::tunnel(
        me6,
        peer6,
        0x3002,
        REQID_MIN + 0x32,
        Algorithm::cbc_aes_hmac_sha256(key(8, 32), key(9, 32), 128),
    );
    s2.replay_window = 1024;
    let mut s3 = XfrmState::tunnel(
        peer,
        me,
        0x3003,
        REQID_MIN + 0x33,
        Algorithm::gcm_aes(key(10, 36), 96),
    );
    s3.esn = false;
    s3.replay_window = 32;
    let ours_states = vec![s1.clone(), s2.clone(), s3.clone()];
    let mut ours_policies = tunnel_policies(me, peer, s1.reqid, s3.reqid);
    ours_policies.push(XfrmPolicy {
        selector: Selector::new(
            "10.99.0.0/16".parse().unwrap(),
            "10.98.0.0/16".parse().unwrap(),
        ),
        dir: Direction::Out,
        priority: PRIORITY_BLOCK,
        action: Action::Block,
        template: None,
    });
    ours_policies.push(XfrmPolicy {
        selector: Selector::hosts(me, peer).udp_dport(4510),
        dir: Direction::Out,
        priority: PRIORITY_EXEMPT,
        action: Action::Allow,
        template: None,
    });
    ours_policies.extend(nd_exemptions(me6, peer6));
    install(t.ns(0), &ours_states, &ours_policies)?;

    let foreign_key = key(42, 20);
    t.exec(
        0,
        &format!(
            "ip xfrm state add src {me} dst 10.77.0.8 proto esp spi 0x4001 reqid 7 mode tunnel \
             aead 'rfc4106(gcm(aes))' 0x{} 128",
            hex(&foreign_key)
        ),
    )?;
    t.exec(
        0,
        &format!(
            "ip xfrm policy add src 10.66.0.0/16 dst 10.67.0.0/16 dir out priority 100 \
             tmpl src {me} dst 10.77.0.8 proto esp reqid 7 mode tunnel"
        ),
    )?;

    let (states, policies) = dump(t.ns(0))?;
    ensure(
        states.len() == ours_states.len() + 1,
        format!(
            "expected {} states, dump has {}: {states:#?}",
            ours_states.len() + 1,
            states.len()
        ),
    )?;
    for s in &ours_states {
        let d = states
            .iter()
            .find(|d| d.id() == s.id())
            .ok_or_else(|| format!("{s} missing from the dump"))?;
        ensure(d.is_ours(), format!("{s} not flagged ours"))?;
        ensure(
            d.extras.is_empty(),
            format!("{s} has extras {:?}", d.extras),
        )?;
        ensure(
            d.state == *s,
            format!(
                "{s} dumped differently:\ninstalled {s:?}\ndumped    {:?}",
                d.state
            ),
        )?;
    }
    // Equality covers keys; say so explicitly for the record.
    let d1 = states.iter().find(|d| d.id() == s1.id()).unwrap();
    ensure(
        d1.state.algorithm == s1.algorithm && d1.state.esn && d1.state.replay_window == 4096,
        "s1 keys/ESN/window",
    )?;
    let foreign = states
        .iter()
        .find(|d| d.state.spi == 0x4001)
        .ok_or("foreign state missing from the dump")?;
    ensure(!foreign.is_ours(), "foreign state flagged ours")?;
    ensure(
        foreign.state.reqid == 7
            && foreign.state.algorithm == Algorithm::gcm_aes(foreign_key.clone(), 128),
        format!("foreign state parsed wrong: {:?}", foreign.state),
    )?;

    ensure(
        policies.len() == ours_policies.len() + 1,
        format!(
            "expected {} policies, dump has {}: {policies:#?}",
            ours_policies.len() + 1,
            policies.len()
        ),
    )?;
    for p in &ours_policies {
        let d = policies
            .iter()
            .find(|d| d.id() == p.id())
            .ok_or_else(|| format!("{p} missing from the dump"))?;
        ensure(d.is_ours(), format!("{p} not flagged ours"))?;
        ensure(
            d.extras.is_empty(),
            format!("{p} has extras {:?}", d.extras),
        )?;
        ensure(
            d.policy == *p,
            format!("{p} dumped differently:\n{p:?}\n{:?}", d.policy),
        )?;
    }
    let fpol = policies
        .iter()
        .find(|d| d.policy.priority == 100)
        .ok_or("foreign policy missing from the dump")?;
    ensure(!fpol.is_ours(), "foreign policy flagged ours")?;
    ensure(
        fpol.policy.template.is_some_and(|t| t.reqid == 7)
            && fpol.policy.selector.src.to_string() == "10.66.0.0/16",
        format!("foreign policy parsed wrong: {:?}", fpol.policy),
    )?;

    // The executor refuses to touch foreign objects, and sends nothing.
    let (fs, fp) = (foreign.state.clone(), fpol.policy);
    let refused = xfrm(t.ns(0), |x| {
        let before = x.stats();
        let e1 = x.delete_states(std::slice::from_ref(&fs));
        let e2 = x.delete_policies(&[fp]);
        Ok((e1, e2, x.stats().messages_sent - before.messages_sent))
    })?;
    ensure(
        matches!(refused.0, Err(XfrmError::Refused { .. }))
            && matches!(refused.1, Err(XfrmError::Refused { .. }))
            && refused.2 == 0,
        format!("deleting foreign objects was not refused: {refused:?}"),
    )?;

    // UPDSA keeps an existing SA's keys (only lifetimes/encap/marks change), and names a
    // missing SA; UPDPOLICY replaces a policy's priority in place.
    let mut rekeyed = s1.clone();
    rekeyed.algorithm = Algorithm::gcm_aes(key(99, 20), 128);
    let mut missing = s1.clone();
    missing.spi = 0x3999;
    let mut moved = ours_policies[0];
    moved.priority = PRIORITY_TUNNEL + 7;
    let (upd, upd_missing, upd_pol) = xfrm(t.ns(0), |x| {
        Ok((
            x.update_states(std::slice::from_ref(&rekeyed)),
            x.update_states(std::slice::from_ref(&missing)),
            x.update_policies(&[moved]),
        ))
    })?;
    ensure(upd.is_ok(), format!("UPDSA of an existing state: {upd:?}"))?;
    match &upd_missing {
        Err(XfrmError::Rejected { rejected, .. })
            if rejected.len() == 1
                && rejected[0].error.errno == libc::ESRCH
                && rejected[0].object.contains("spi 0x00003999") => {}
        other => return Err(format!("UPDSA of a missing state: {other:?}")),
    }
    ensure(upd_pol.is_ok(), format!("UPDPOLICY: {upd_pol:?}"))?;
    let (states_now, policies_now) = dump(t.ns(0))?;
    ensure(
        states_now.iter().any(|d| d.state == s1),
        "UPDSA changed the keys of an existing state (expected the kernel to keep them)",
    )?;
    ensure(
        policies_now.iter().any(|d| d.policy == moved),
        format!("UPDPOLICY did not move {moved}"),
    )?;
    ours_policies[0] = moved;

    // Delete ours: the foreign ones remain.
    xfrm(t.ns(0), |x| {
        x.delete_policies(&ours_policies)
            .map_err(|e| e.to_string())?;
        x.delete_states(&ours_states).map_err(|e| e.to_string())
    })?;
    let (states, policies) = dump(t.ns(0))?;
    ensure(
        states.len() == 1 && states[0].state.spi == 0x4001,
        format!("after deleting ours, states left: {states:#?}"),
    )?;
    ensure(
        policies.len() == 1 && policies[0].policy.priority == 100,
        format!("after deleting ours, policies left: {policies:#?}"),
    )?;
    let ip = t.exec(0, "ip xfrm state list")?;
    ensure(
        ip.contains("spi 0x00004001"),
        format!("ip does not see the foreign state:\n{ip}"),
    )?;
    Ok(())
}

fn batch_state(i: u32, spi_base: u32) -> XfrmState {
    let dst = IpAddr::V4(std::net::Ipv4Addr::new(
        10,
        78,
        (i / 250) as u8,
        (i % 250 + 1) as u8,
    ));
    XfrmState::tunnel(
        "10.77.0.1".parse().unwrap(),
        dst,
        spi_base + i,
        REQID_MIN + 0x1000 + i,
        Algorithm::gcm_aes(key(i as u8, 20), 128),
    )
}

/// (d) 200 states in few sendmsg calls; a batch with bad objects reports exactly those,
/// by name, and applies the rest.
fn batch_and_named_errors() -> Result<(), String> {
    let t = Topo::new("xb", 1)?;
    let states: Vec<XfrmState> = (0..200).map(|i| batch_state(i, 0x5000)).collect();
    let policies: Vec<XfrmPolicy> = states
        .iter()
        .map(|s| XfrmPolicy {
            selector: Selector::hosts(s.src, s.dst),
            dir: Direction::Out,
            priority: PRIORITY_TUNNEL,
            action: Action::Allow,
            template: Some(Template {
                src: s.src,
                dst: s.dst,
                reqid: s.reqid,
                mode: EncapMode::Tunnel,
            }),
        })
        .collect();
    let (sent, calls) = xfrm(t.ns(0), |x| {
        let before = x.stats();
        x.add_states(&states).map_err(|e| e.to_string())?;
        x.add_policies(&policies).map_err(|e| e.to_string())?;
        let after = x.stats();
        Ok((
            after.messages_sent - before.messages_sent,
            after.send_calls - before.send_calls,
        ))
    })?;
    ensure(
        sent == 400,
        format!("{sent} messages for 200 states + 200 policies"),
    )?;
    ensure(
        calls * 10 <= sent,
        format!("{calls} sendmsg calls for {sent} messages: not batched"),
    )?;
    println!("    400 objects: {sent} messages in {calls} sendmsg calls");

    let (dumped, dumped_pol) = dump(t.ns(0))?;
    let ours = dumped.iter().filter(|d| d.is_ours()).count();
    ensure(
        ours == 200,
        format!("dump has {ours} of our states, want 200"),
    )?;
    for s in &states {
        ensure(
            dumped.iter().any(|d| d.state == *s),
            format!("{s} not dumped back exactly"),
        )?;
    }
    ensure(
        dumped_pol.len() == 200,
        format!("dump has {} policies", dumped_pol.len()),
    )?;

    // A batch of 20 where #5 has a bad key and #12 exists already.
    let mut bad: Vec<XfrmState> = (0..20).map(|i| batch_state(i, 0x6000)).collect();
    bad[5].algorithm = Algorithm::gcm_aes(key(1, 7), 128);
    bad[12] = states[3].clone();
    let mut dup_pol = vec![policies[0]];
    dup_pol[0].priority = PRIORITY_TUNNEL + 1;
    let (es, ep) = xfrm(t.ns(0), |x| {
        Ok((x.add_states(&bad), x.add_policies(&dup_pol)))
    })?;
    let msg = match &es {
        Err(
            e @ XfrmError::Rejected {
                rejected,
                attempted,
                ..
            },
        ) => {
            ensure(
                *attempted == 20 && rejected.len() == 2,
                format!("expected 2 of 20 rejected: {e}"),
            )?;
            let (r0, r1) = (&rejected[0], &rejected[1]);
            ensure(
                r0.index == 5
                    && r0.object.contains("spi 0x00006005")
                    && r0.error.errno == libc::EINVAL,
                format!("first rejection should name #5 (spi 0x00006005, EINVAL): {r0}"),
            )?;
            ensure(
                r1.index == 12
                    && r1.object.contains("spi 0x00005003")
                    && r1.error.errno == libc::EEXIST,
                format!("second rejection should name #12 (spi 0x00005003, EEXIST): {r1}"),
            )?;
            e.to_string()
        }
        other => return Err(format!("bad batch not rejected as expected: {other:?}")),
    };
    ensure(
        msg.contains("10.77.0.1→10.78.0.6 spi 0x00006005")
            && msg.contains("10.77.0.1→10.78.0.4 spi 0x00005003 reqid 0xe0001003"),
        format!("error message does not name the objects: {msg}"),
    )?;
    println!("    {msg}");
    match &ep {
        Err(XfrmError::Rejected { rejected, .. })
            if rejected.len() == 1
                && rejected[0].error.errno == libc::EEXIST
                && rejected[0].object == "policy out 10.77.0.1/32 → 10.78.0.1/32" => {}
        other => return Err(format!("duplicate policy not rejected by name: {other:?}")),
    }
    let (dumped, _) = dump(t.ns(0))?;
    let ours = dumped.iter().filter(|d| d.is_ours()).count();
    ensure(
        ours == 218,
        format!("after the bad batch {ours} states, want 200 + 18"),
    )?;

    // Delete everything of ours, batched as well.
    let all: Vec<XfrmState> = dumped.into_iter().map(|d| d.state).collect();
    let calls = xfrm(t.ns(0), |x| {
        let before = x.stats();
        x.delete_policies(&policies).map_err(|e| e.to_string())?;
        x.delete_states(&all).map_err(|e| e.to_string())?;
        Ok(x.stats().send_calls - before.send_calls)
    })?;
    ensure(
        calls <= 10,
        format!("{calls} sendmsg calls to delete 418 objects"),
    )?;
    let (s, p) = dump(t.ns(0))?;
    ensure(
        s.is_empty() && p.is_empty(),
        format!("left after delete: {s:?} {p:?}"),
    )?;
    Ok(())
}
