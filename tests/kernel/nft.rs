//! The nftables executor (`encryptd::kernel::nft`) against a real kernel: each case applies
//! tables through it from a thread inside a node's namespace (the `nft` it spawns inherits
//! that namespace) and watches packets between two nodes.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use encryptd::kernel::nft::{Nft, NftError, RuleCounter};

use crate::Case;
use crate::rig::{Topo, ensure, in_netns};

pub const CASES: &[Case] = &[
    (
        "nft_strict_rule_drops_and_counts",
        strict_rule_drops_and_counts,
    ),
    ("nft_replace_is_atomic", replace_is_atomic),
    (
        "nft_rejected_ruleset_keeps_the_previous_one",
        rejected_ruleset_keeps_the_previous_one,
    ),
    (
        "nft_delete_removes_only_our_table",
        delete_removes_only_our_table,
    ),
];

/// Run `f` with an executor whose `nft` runs in namespace `ns`.
fn nft_in<T: Send>(ns: &str, f: impl FnOnce(&Nft) -> T + Send) -> T {
    in_netns(ns, || f(&Nft::default()))
}

fn s(e: NftError) -> String {
    e.to_string()
}

/// The IPsec strict rules for the test underlay, in a chain `chain`, comments `{tag}-v4/6`.
fn strict_table(chain: &str, tag: &str) -> String {
    format!(
        r#"table inet encryptd {{
    chain {chain} {{
        type filter hook output priority 0; policy accept;
        ip daddr 10.77.0.0/24 ip protocol != esp rt ipsec missing counter drop comment "{tag}-v4"
        ip6 daddr fd77::/64 meta l4proto != esp rt ipsec missing counter drop comment "{tag}-v6"
    }}
}}
"#
    )
}

fn counter<'a>(cs: &'a [RuleCounter], comment: &str) -> Result<&'a RuleCounter, String> {
    cs.iter()
        .find(|c| c.comment.as_deref() == Some(comment))
        .ok_or_else(|| format!("no counter for rule {comment:?} in {cs:?}"))
}

fn pings(t: &Topo, from: usize, to: &str) -> bool {
    t.exec(from, &format!("ping -c 1 -W 1 {to}")).is_ok()
}

fn strict_rule_drops_and_counts() -> Result<(), String> {
    let t = Topo::new("nfd", 2)?;
    let (a, b6) = (t.ns(0), t.nodes[1].v6.to_string());
    ensure(pings(&t, 0, "10.77.0.2"), "no ping before any rule")?;
    ensure(pings(&t, 0, &b6), "no ping6 before any rule")?;
    nft_in(a, |n| n.apply(&strict_table("out", "strict"))).map_err(s)?;
    // no XFRM policy: everything to the protected ranges would leave in clear -> dropped
    ensure(
        !pings(&t, 0, "10.77.0.2"),
        "plaintext ping got through the strict rule",
    )?;
    ensure(
        !pings(&t, 0, &b6),
        "plaintext ping6 got through the strict rule",
    )?;
    let cs = nft_in(a, |n| n.counters()).map_err(s)?;
    for tag in ["strict-v4", "strict-v6"] {
        let c = counter(&cs, tag)?;
        ensure(c.chain == "out", format!("{tag} in chain {}", c.chain))?;
        ensure(
            c.packets > 0 && c.bytes > 0,
            format!("{tag} counted nothing: {c:?}"),
        )?;
    }
    // the table is per namespace: the other node has none and still answers
    ensure(
        nft_in(t.ns(1), |n| n.list()).map_err(s)?.is_none(),
        "table leaked into node 1",
    )?;
    Ok(())
}

fn replace_is_atomic() -> Result<(), String> {
    let t = Topo::new("nfr", 2)?;
    let a = t.ns(0);
    let (v1, v2) = (strict_table("out", "v1"), strict_table("egress", "v2"));
    nft_in(a, |n| n.apply(&v1)).map_err(s)?;
    nft_in(a, |n| n.apply(&v2)).map_err(s)?;
    // The JSON listing, one object per line (chains as `"name":"egress"`).
    let listing = nft_in(a, |n| n.list())
        .map_err(s)?
        .ok_or("table gone after v2")?
        .canonical();
    ensure(
        listing.contains("\"v2-v4\"") && listing.contains("\"name\":\"egress\""),
        format!("v2 not in the listing:\n{listing}"),
    )?;
    ensure(
        !listing.contains("\"v1-") && !listing.contains("\"name\":\"out\""),
        format!("v1 left over after the replace:\n{listing}"),
    )?;

    // No window: both versions drop everything to node 1, so while the table is replaced
    // over and over, not one echo request may get out. The same loop done the non-atomic
    // way (delete, then add: two transactions) shows that the check can see a window.
    let atomic = |n: &Nft, i: usize| n.apply(if i.is_multiple_of(2) { &v1 } else { &v2 });
    let (sent, got, rounds) = nft_in(a, |n| ping_during(n, atomic))?;
    ensure(
        got == 0,
        format!("{got} of {sent} echo replies during {rounds} atomic replaces"),
    )?;
    ensure(rounds >= 5, format!("only {rounds} replaces while pinging"))?;
    let two_step = |n: &Nft, i: usize| {
        n.delete()?;
        n.apply(if i.is_multiple_of(2) { &v1 } else { &v2 })
    };
    let (sent2, got2, rounds2) = nft_in(a, |n| ping_during(n, two_step))?;
    ensure(
        got2 > 0,
        format!(
            "the window check is blind: 0 of {sent2} replies got through \
             {rounds2} non-atomic replaces"
        ),
    )?;
    println!(
        "    atomic: 0/{sent} replies in {rounds} replaces; \
         delete+add: {got2}/{sent2} replies in {rounds2} replaces"
    );
    Ok(())
}

/// Ping node 1 every 10 ms for ~2 s from this thread's namespace while calling
/// `replace(nft, round)` in a loop; returns (sent, received, rounds).
fn ping_during(
    nft: &Nft,
    replace: impl Fn(&Nft, usize) -> Result<(), NftError>,
) -> Result<(usize, usize, usize), String> {
    let mut child = Command::new("ping")
        .args([
            "-n",
            "-q",
            "-c",
            "200",
            "-i",
            "0.01",
            "-W",
            "1",
            "10.77.0.2",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null()) // "sendmsg: Operation not permitted" per dropped packet
        .spawn()
        .map_err(|e| format!("ping: {e}"))?;
    let pid = child.id() as i32;
    let t0 = Instant::now();
    let mut rounds = 0;
    let mut result = Ok(());
    // until ping has exited (it stays a zombie, state Z, until waited for)
    while std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|st| !st.contains(") Z "))
        && t0.elapsed() < Duration::from_secs(60)
    {
        if let Err(e) = replace(nft, rounds) {
            result = Err(format!("replace #{rounds}: {e}"));
            break;
        }
        rounds += 1;
    }
    crate::rig::finish_child(&mut child, Duration::from_secs(30), "ping")?;
    let out = child.wait_with_output().map_err(|e| format!("ping: {e}"))?;
    result?;
    // "200 packets transmitted, 0 received, +10 errors, 100% packet loss, time 2012ms"
    let text = String::from_utf8_lossy(&out.stdout);
    let stat = text
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .ok_or_else(|| format!("no ping statistics in {text:?}"))?;
    let num = |word: &str| -> Result<usize, String> {
        let w: Vec<&str> = stat.split([' ', ',']).filter(|w| !w.is_empty()).collect();
        w.iter()
            .position(|x| *x == word)
            .and_then(|i| w.get(i - 1)?.parse().ok())
            .ok_or_else(|| format!("no `{word}` count in {stat:?}"))
    };
    Ok((num("packets")?, num("received")?, rounds))
}

fn rejected_ruleset_keeps_the_previous_one() -> Result<(), String> {
    let t = Topo::new("nfe", 2)?;
    let a = t.ns(0);
    let v1 = strict_table("out", "v1");
    nft_in(a, |n| n.apply(&v1)).map_err(s)?;

    // a syntax error on line 5 of our text (the prelude nft also sees is not counted)
    let bad = v1.replacen(
        "        ip6 daddr",
        "        ip daddr 10.77.0.0/24 frobnicate drop comment \"bad\"\n        ip6 daddr",
        1,
    );
    let e = nft_in(a, |n| n.apply(&bad))
        .err()
        .ok_or("a syntax error was applied")?;
    let msg = e.to_string();
    ensure(
        msg.contains("ruleset:5:") && msg.contains("rror") && msg.contains("frobnicate"),
        format!("the error does not say where and what: {msg}"),
    )?;
    // accepted by the parser, refused by the kernel: the transaction is all or nothing
    let dangling = v1.replacen(
        "        ip6 daddr",
        "        ip daddr 10.77.0.9 jump nosuch\n        ip6 daddr",
        1,
    );
    let e = nft_in(a, |n| n.apply(&dangling))
        .err()
        .ok_or("a jump to nowhere was applied")?;
    ensure(
        e.to_string().contains("nosuch"),
        format!("unclear error: {e}"),
    )?;
    // `nft -c` rejects the same, and accepts a good ruleset without applying it
    ensure(
        nft_in(a, |n| n.check(&bad)).is_err(),
        "check passed a syntax error",
    )?;
    nft_in(a, |n| n.check(&strict_table("egress", "v2"))).map_err(s)?;

    let listing = nft_in(a, |n| n.list())
        .map_err(s)?
        .ok_or("the table is gone")?
        .canonical();
    ensure(
        listing.contains("\"v1-v4\"") && !listing.contains("\"v2-") && !listing.contains("nosuch"),
        format!("not exactly v1 after the failures and the check:\n{listing}"),
    )?;
    // and v1 still works
    ensure(
        !pings(&t, 0, "10.77.0.2"),
        "ping got through after a failed replace",
    )?;
    let cs = nft_in(a, |n| n.counters()).map_err(s)?;
    ensure(
        counter(&cs, "v1-v4")?.packets > 0,
        format!("v1 counted nothing: {cs:?}"),
    )?;
    Ok(())
}

fn delete_removes_only_our_table() -> Result<(), String> {
    let t = Topo::new("nfx", 2)?;
    let a = t.ns(0);
    // someone else's table in the same namespace
    t.exec(
        0,
        "nft add table inet other \\; add chain inet other c '{ type filter hook output priority 10; }' \\; \
         add rule inet other c counter comment foreign",
    )?;
    nft_in(a, |n| n.apply(&strict_table("out", "strict"))).map_err(s)?;
    ensure(!pings(&t, 0, "10.77.0.2"), "strict rule not in force")?;
    let foreign = nft_in(a, |n| n.apply("flush ruleset")).err();
    ensure(
        matches!(foreign, Some(NftError::Foreign { .. })),
        format!("`flush ruleset` was not refused: {foreign:?}"),
    )?;

    nft_in(a, |n| n.delete()).map_err(s)?;
    ensure(
        nft_in(a, |n| n.list()).map_err(s)?.is_none(),
        "table still there",
    )?;
    ensure(
        nft_in(a, |n| n.counters()).map_err(s)?.is_empty(),
        "counters without a table",
    )?;
    ensure(pings(&t, 0, "10.77.0.2"), "no ping after the delete")?;
    nft_in(a, |n| n.delete()).map_err(|e| format!("second delete: {e}"))?;
    let other = t.exec(0, "nft list table inet other")?;
    ensure(
        other.contains("comment \"foreign\""),
        format!("the foreign table was touched:\n{other}"),
    )?;
    Ok(())
}
