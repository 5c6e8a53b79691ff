//! Addresses and prefixes as the inventory and the kernel objects use them.

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
}
