//! Update versions `MM.mm.PP.BB` (major, minor, patch, build), compared numerically.
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::CoreError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
    pub build: u32,
}

impl Version {
    pub const fn new(major: u32, minor: u32, patch: u32, build: u32) -> Self {
        Self { major, minor, patch, build }
    }
}

impl FromStr for Version {
    type Err = CoreError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason: String| CoreError::Version { input: s.chars().take(64).collect(), reason };
        let parts: Vec<&str> = s.split('.').collect();
        if parts.len() != 4 {
            return Err(err(format!("has {} part(s)", parts.len())));
        }
        let mut n = [0u32; 4];
        for (i, p) in parts.iter().enumerate() {
            // Digits only: `u32::from_str` would also accept a leading '+'.
            if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
                return Err(err(format!("part {} ({p:?}) is not a number", i + 1)));
            }
            n[i] = p.parse().map_err(|_| err(format!("part {} ({p}) is too large", i + 1)))?;
        }
        Ok(Self::new(n[0], n[1], n[2], n[3]))
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}.{}", self.major, self.minor, self.patch, self.build)
    }
}

impl Serialize for Version {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Version {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_and_orders_numerically() {
        let a: Version = "1.2.10.0".parse().unwrap();
        let b: Version = "1.2.9.99".parse().unwrap();
        assert!(a > b);
        assert_eq!(a.to_string(), "1.2.10.0");
    }

    #[test]
    fn rejects_malformed() {
        for bad in ["", "1", "1.2.3", "1.2.3.4.5", "1.a.3.4", "1..3.4", "+1.2.3.4", "1.2.3.99999999999"] {
            let e = bad.parse::<Version>().unwrap_err().to_string();
            assert!(e.contains("malformed version"), "{bad}: {e}");
        }
    }

    proptest! {
        #[test]
        fn order_matches_tuple_order(a in any::<[u32; 4]>(), b in any::<[u32; 4]>()) {
            let va = Version::new(a[0], a[1], a[2], a[3]);
            let vb = Version::new(b[0], b[1], b[2], b[3]);
            prop_assert_eq!(va.cmp(&vb), a.cmp(&b));
            prop_assert_eq!(va.to_string().parse::<Version>().unwrap(), va);
        }
    }
}
