//! Addresses and prefixes as the inventory and the kernel objects use them.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// An IP prefix whose host bits are zero (`10.1.0.0/24`, `fd00::/8`, `192.0.2.10/32`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    addr: IpAddr,
    len: u8,
}

/// Why a prefix did not parse; `HostBits` carries the prefix the user probably meant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CidrError {
    Syntax(String),
    HostBits { given: String, suggested: Cidr },
}

impl fmt::Display for CidrError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CidrError::Syntax(m) => f.write_str(m),
            CidrError::HostBits { given, suggested } => {
                write!(f, "{given} has host bits set; did you mean {suggested}?")
            }
        }
    }
}

impl Cidr {
    /// A prefix; `None` when `len` is too long for the family or host bits are set.
    pub fn new(addr: IpAddr, len: u8) -> Option<Cidr> {
        let c = Cidr { addr, len };
        (len <= max_len(addr) && c.network() == addr).then_some(c)
    }

    /// The single-address prefix (/32 or /128).
    pub fn host(addr: IpAddr) -> Cidr {
        Cidr {
            addr,
            len: max_len(addr),
        }
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix_len(&self) -> u8 {
        self.len
    }

    pub fn is_ipv4(&self) -> bool {
        self.addr.is_ipv4()
    }

    fn network(&self) -> IpAddr {
        mask(self.addr, self.len)
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.addr.is_ipv4() && mask(ip, self.len) == self.addr
    }

    /// Whether every address of `other` is in this prefix.
    pub fn covers(&self, other: &Cidr) -> bool {
        self.len <= other.len && self.contains(other.addr)
    }

    /// The prefix's last address (its broadcast address in IPv4).
    pub fn last(&self) -> IpAddr {
        match self.addr {
            IpAddr::V4(a) => {
                let host = u32::MAX.checked_shr(u32::from(self.len)).unwrap_or(0);
                IpAddr::V4((u32::from(a) | host).into())
            }
            IpAddr::V6(a) => {
                let host = u128::MAX.checked_shr(u32::from(self.len)).unwrap_or(0);
                IpAddr::V6((u128::from(a) | host).into())
            }
        }
    }

    /// Two prefixes overlap when one contains the other's network address.
    pub fn overlaps(&self, other: &Cidr) -> bool {
        self.contains(other.addr) || other.contains(self.addr)
    }
}

fn max_len(addr: IpAddr) -> u8 {
    if addr.is_ipv4() { 32 } else { 128 }
}

fn mask(addr: IpAddr, len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let m = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            IpAddr::V4((u32::from(a) & m).into())
        }
        IpAddr::V6(a) => {
            let m = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            IpAddr::V6((u128::from(a) & m).into())
        }
    }
}

impl FromStr for Cidr {
    type Err = CidrError;

    /// `ADDR/LEN`, or a bare address meaning a single host.
    fn from_str(s: &str) -> Result<Cidr, CidrError> {
        let (a, l) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = a
            .parse()
            .map_err(|_| CidrError::Syntax(format!("'{a}' is not an IPv4 or IPv6 address")))?;
        let len = match l {
            None => max_len(addr),
            Some(l) => match l.parse::<u8>() {
                Ok(n) if n <= max_len(addr) && !l.starts_with('+') => n,
                _ => {
                    return Err(CidrError::Syntax(format!(
                        "'{l}' is not a prefix length (0..={})",
                        max_len(addr)
                    )));
                }
            },
        };
        Cidr::new(addr, len).ok_or_else(|| CidrError::HostBits {
            given: s.to_string(),
            suggested: Cidr {
                addr: mask(addr, len),
                len,
            },
        })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// Prefixes, each with a value, asked which of them overlap a prefix or contain an
/// address in O(prefix length + answers): the inventory's and the sync's ownership checks
/// ask it once per node, and a scan of every prefix made those quadratic (1.8 s per
/// change at 10,000 nodes, docs/benchmarks.md).
#[derive(Debug, Clone)]
pub struct PrefixIndex<V> {
    by_start: BTreeMap<(IpAddr, u8), V>,
}

impl<V> Default for PrefixIndex<V> {
    fn default() -> Self {
        PrefixIndex {
            by_start: BTreeMap::new(),
        }
    }
}

impl<V> PrefixIndex<V> {
    /// Adds `c`; an equal prefix already there keeps its value.
    pub fn insert(&mut self, c: Cidr, v: V) {
        self.by_start.entry((c.addr, c.len)).or_insert(v);
    }

    /// The prefixes that overlap `c`: those that contain it (one per prefix length at
    /// most), then those whose network address lies inside it. `c` itself, if present,
    /// may come twice.
    pub fn overlapping(&self, c: &Cidr) -> impl Iterator<Item = (Cidr, &V)> {
        let covering = (0..=c.len).filter_map(move |l| {
            let k = (mask(c.addr, l), l);
            self.by_start
                .get(&k)
                .map(|v| (Cidr { addr: k.0, len: l }, v))
        });
        let inside = self
            .by_start
            .range((c.addr, 0)..=(c.last(), u8::MAX))
            .map(|(&(addr, len), v)| (Cidr { addr, len }, v));
        covering.chain(inside)
    }

    /// The prefixes that contain `ip`.
    pub fn containing(&self, ip: IpAddr) -> impl Iterator<Item = (Cidr, &V)> {
        let host = Cidr::host(ip);
        (0..=host.len).filter_map(move |l| {
            let k = (mask(ip, l), l);
            self.by_start
                .get(&k)
                .map(|v| (Cidr { addr: k.0, len: l }, v))
        })
    }
}

/// Addresses in `c`, from a map keyed by address (the inverse question of
/// [`PrefixIndex::containing`]).
pub fn addresses_in<'a, V>(
    map: &'a BTreeMap<IpAddr, V>,
    c: &Cidr,
) -> impl Iterator<Item = (IpAddr, &'a V)> {
    map.range(c.addr..=c.last()).map(|(a, v)| (*a, v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        assert_eq!(
            "10.1.0.0/24".parse::<Cidr>().unwrap().to_string(),
            "10.1.0.0/24"
        );
        assert_eq!("fd00::/8".parse::<Cidr>().unwrap().to_string(), "fd00::/8");
        assert_eq!(
            "192.0.2.1".parse::<Cidr>().unwrap().to_string(),
            "192.0.2.1/32"
        );
        assert_eq!("0.0.0.0/0".parse::<Cidr>().unwrap().prefix_len(), 0);
    }

    #[test]
    fn host_bits_suggest_the_network() {
        let e = "10.1.0.1/24".parse::<Cidr>().unwrap_err();
        assert_eq!(
            e.to_string(),
            "10.1.0.1/24 has host bits set; did you mean 10.1.0.0/24?"
        );
        let e = "fd00::1/64".parse::<Cidr>().unwrap_err();
        assert_eq!(
            e.to_string(),
            "fd00::1/64 has host bits set; did you mean fd00::/64?"
        );
    }

    #[test]
    fn rejects_garbage() {
        assert!(matches!(
            "10.1.0/24".parse::<Cidr>(),
            Err(CidrError::Syntax(_))
        ));
        assert!(matches!(
            "10.0.0.0/33".parse::<Cidr>(),
            Err(CidrError::Syntax(_))
        ));
        assert!(matches!(
            "10.0.0.0/+8".parse::<Cidr>(),
            Err(CidrError::Syntax(_))
        ));
    }

    #[test]
    fn containment_and_overlap() {
        let a: Cidr = "10.0.0.0/8".parse().unwrap();
        let b: Cidr = "10.1.0.0/24".parse().unwrap();
        let c: Cidr = "10.2.0.0/24".parse().unwrap();
        assert!(a.overlaps(&b) && b.overlaps(&a));
        assert!(!b.overlaps(&c));
        assert!(a.contains("10.9.9.9".parse().unwrap()));
        assert!(!a.contains("fd00::1".parse().unwrap()));
        let v6: Cidr = "fd00::/8".parse().unwrap();
        assert!(!v6.overlaps(&a));
    }
    /// The index answers what a scan of every prefix answers, nested and disjoint, both
    /// families (a small deterministic generator: no dependency for it).
    #[test]
    fn prefix_index_agrees_with_a_scan() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let random_cidr = |next: &mut dyn FnMut() -> u64| {
            let r = next();
            if r.is_multiple_of(4) {
                let a =
                    IpAddr::V6((u128::from(0xfd00u16) << 112 | u128::from(r >> 40) << 96).into());
                let len = 8 + (r % 57) as u8;
                Cidr::new(mask(a, len), len).unwrap()
            } else {
                // 10.0.0.0/8, lengths 8..=32: many nested pairs.
                let a = IpAddr::V4((0x0a00_0000 | (r as u32 & 0x00ff_ffff)).into());
                let len = 8 + ((r >> 32) % 25) as u8;
                Cidr::new(mask(a, len), len).unwrap()
            }
        };
        let mut index = PrefixIndex::default();
        let mut all: Vec<Cidr> = Vec::new();
        for i in 0..300 {
            let c = random_cidr(&mut next);
            if !all.contains(&c) {
                all.push(c);
            }
            index.insert(c, i);
        }
        for _ in 0..2000 {
            let q = random_cidr(&mut next);
            let mut want: Vec<Cidr> = all.iter().filter(|c| c.overlaps(&q)).copied().collect();
            let mut got: Vec<Cidr> = index.overlapping(&q).map(|(c, _)| c).collect();
            want.sort_by_key(|c| (c.addr, c.len));
            got.sort_by_key(|c| (c.addr, c.len));
            got.dedup();
            assert_eq!(got, want, "overlapping {q}");
            let ip = q.addr();
            let mut want: Vec<Cidr> = all.iter().filter(|c| c.contains(ip)).copied().collect();
            let mut got: Vec<Cidr> = index.containing(ip).map(|(c, _)| c).collect();
            want.sort_by_key(|c| (c.addr, c.len));
            got.sort_by_key(|c| (c.addr, c.len));
            assert_eq!(got, want, "containing {ip}");
        }
        assert_eq!(
            "10.1.0.0/16".parse::<Cidr>().unwrap().last(),
            "10.1.255.255".parse::<IpAddr>().unwrap()
        );
    }
}
