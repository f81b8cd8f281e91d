//! Identifiers: sandbox and container ids, and content digests.
//!
//! Each is a newtype validated when parsed, so that code below the facade
//! never sees an id that could escape a directory or collide by case.

use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::error::Error;

fn is_lower_hex(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn random_hex_id() -> String {
    let bytes: [u8; 32] = rand::random();
    hex::encode(bytes)
}

macro_rules! object_id {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// What kind of object this id names, for error messages.
            pub const KIND: &'static str = $kind;

            /// A fresh random id: 64 lowercase hex characters, like containerd's.
            pub fn generate() -> Self {
                Self(random_hex_id())
            }

            /// Parses an id given by a client. Only full ids (64 lowercase
            /// hex characters) are accepted.
            pub fn parse(s: &str) -> Result<Self, Error> {
                if s.len() == 64 && is_lower_hex(s) {
                    Ok(Self(s.to_owned()))
                } else if s.is_empty() {
                    Err(Error::InvalidArgument(format!("{} id is empty", $kind)))
                } else {
                    Err(Error::NotFound { kind: $kind, id: s.to_owned() })
                }
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl TryFrom<String> for $name {
            type Error = Error;
            fn try_from(s: String) -> Result<Self, Error> {
                Self::parse(&s)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }
    };
}

object_id!(
    /// The id of a pod sandbox.
    SandboxId,
    "pod sandbox"
);
object_id!(
    /// The id of a container.
    ContainerId,
    "container"
);

/// A sha256 content digest, `sha256:<64 lowercase hex>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Digest(String);

impl Digest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self::from_hasher(Sha256::new_with_prefix(bytes))
    }

    pub(crate) fn from_hasher(hasher: Sha256) -> Self {
        Self(format!("sha256:{}", hex::encode(hasher.finalize())))
    }

    /// Parses `sha256:<hex>`; other algorithms are rejected.
    pub fn parse(s: &str) -> Result<Self, Error> {
        match s.strip_prefix("sha256:") {
            Some(hex) if hex.len() == 64 && is_lower_hex(hex) => Ok(Self(s.to_owned())),
            _ => Err(Error::InvalidArgument(format!(
                "{s:?} is not a sha256 digest (sha256:<64 lowercase hex>)"
            ))),
        }
    }

    /// The hex part, which names the blob file.
    pub fn hex(&self) -> &str {
        &self.0["sha256:".len()..]
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for Digest {
    type Error = Error;
    fn try_from(s: String) -> Result<Self, Error> {
        Self::parse(&s)
    }
}

impl From<Digest> for String {
    fn from(d: Digest) -> String {
        d.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_parse_back() {
        let id = ContainerId::generate();
        assert_eq!(ContainerId::parse(id.as_str()).unwrap(), id);
        assert_ne!(ContainerId::generate(), id);
    }

    #[test]
    fn ids_reject_path_tricks_and_case() {
        assert!(matches!(
            SandboxId::parse(""),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            SandboxId::parse("../etc"),
            Err(Error::NotFound { .. })
        ));
        let upper = "A".repeat(64);
        assert!(SandboxId::parse(&upper).is_err());
    }

    #[test]
    fn digest_of_known_bytes() {
        assert_eq!(
            Digest::of(b"").as_str(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert!(Digest::parse("sha512:00").is_err());
        assert!(Digest::parse("sha256:xyz").is_err());
    }
}
