//! The two 32-byte digests snapsync speaks of: the [`BankHash`] of a state and the
//! [`ContentRoot`] of an archive.

use std::fmt;
use std::str::FromStr;

/// A 32-byte digest was expected but the input had another length or was not hex.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("expected a 32-byte digest ({expected}), got {got}")]
pub struct DigestError {
    /// What was expected, e.g. "64 hex characters".
    expected: &'static str,
    /// What was found instead.
    got: String,
}

macro_rules! digest_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
        pub struct $name(pub [u8; 32]);

        impl $name {
            /// The digest as bytes.
            pub fn as_bytes(&self) -> &[u8; 32] {
                &self.0
            }

            /// Parses a digest from exactly 32 raw bytes (as carried in protobuf messages).
            pub fn from_slice(bytes: &[u8]) -> Result<Self, DigestError> {
                <[u8; 32]>::try_from(bytes).map(Self).map_err(|_| DigestError {
                    expected: "32 bytes",
                    got: format!("{} bytes", bytes.len()),
                })
            }

            /// Lower-case hex, 64 characters.
            pub fn to_hex(&self) -> String {
                blake3::Hash::from_bytes(self.0).to_hex().to_string()
            }

            /// The first 8 hex characters, for log lines.
            pub fn short(&self) -> String {
                let mut hex = self.to_hex();
                hex.truncate(8);
                hex
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.to_hex())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.short())
            }
        }

        impl FromStr for $name {
            type Err = DigestError;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                blake3::Hash::from_hex(s)
                    .map(|h| Self(*h.as_bytes()))
                    .map_err(|_| DigestError {
                        expected: "64 hex characters",
                        got: format!("{s:?}"),
                    })
            }
        }

        impl From<blake3::Hash> for $name {
            fn from(h: blake3::Hash) -> Self {
                Self(*h.as_bytes())
            }
        }
    };
}

digest_type!(
    /// The bank hash: a deterministic commitment to the state of the DB at one slot.
    ///
    /// Two nodes whose DBs hold the same entries at the same slot have the same bank hash,
    /// whatever order the writes came in. See [`crate::bank_hash`] for the definition.
    BankHash
);

digest_type!(
    /// The content root of a snapshot archive: the plain BLAKE3 hash of the archive bytes, so
    /// `b3sum` on the archive prints it. Every chunk of the archive is checked against it.
    ContentRoot
);

impl ContentRoot {
    pub(crate) fn to_blake3(self) -> blake3::Hash {
        blake3::Hash::from_bytes(self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_errors() {
        let h = ContentRoot::from(blake3::hash(b"abc"));
        let parsed: ContentRoot = h.to_hex().parse().unwrap();
        assert_eq!(parsed, h);
        assert_eq!(h.short().len(), 8);
        assert!("zz".parse::<BankHash>().is_err());
        assert!(BankHash::from_slice(&[0u8; 31]).is_err());
        assert_eq!(BankHash::from_slice(&[7u8; 32]).unwrap().0, [7u8; 32]);
    }
}
