//! Validated identifiers: device ids and resource ids.
//!
//! Both are DNS-1123 labels, so they are valid Kubernetes object names, valid NATS subject
//! tokens (no `.`, `*`, `>` or whitespace) and valid podman container names all at once.

use std::{borrow::Borrow, fmt, str::FromStr};

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

/// Longest DNS-1123 label.
pub const MAX_LABEL_LEN: usize = 63;

/// The regular expression a DNS-1123 label matches, as used in JSON Schemas.
pub const DNS1123_LABEL_PATTERN: &str = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";

/// Why a name is not a DNS-1123 label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("{what} must not be empty")]
    Empty { what: &'static str },
    #[error("{what} {name:?} is {len} characters long; the limit is {MAX_LABEL_LEN}")]
    TooLong {
        what: &'static str,
        name: String,
        len: usize,
    },
    #[error(
        "{what} {name:?} has {found:?} at position {position}: only lowercase letters, digits and '-' are allowed"
    )]
    InvalidCharacter {
        what: &'static str,
        name: String,
        found: char,
        position: usize,
    },
    #[error("{what} {name:?} must start and end with a lowercase letter or digit")]
    BadEdge { what: &'static str, name: String },
}

/// Checks that `name` is a DNS-1123 label; `what` names the thing in the error.
pub fn validate_dns1123_label(what: &'static str, name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty { what });
    }
    if name.len() > MAX_LABEL_LEN {
        return Err(NameError::TooLong {
            what,
            name: name.to_owned(),
            len: name.len(),
        });
    }
    if let Some((position, found)) = name
        .chars()
        .enumerate()
        .find(|(_, c)| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(NameError::InvalidCharacter {
            what,
            name: name.to_owned(),
            found,
            position,
        });
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Err(NameError::BadEdge {
            what,
            name: name.to_owned(),
        });
    }
    Ok(())
}

macro_rules! label_newtype {
    ($(#[$meta:meta])* $name:ident, $what:literal) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Validates and wraps `name`.
            pub fn new(name: impl Into<String>) -> Result<Self, NameError> {
                let name = name.into();
                validate_dns1123_label($what, &name)?;
                Ok(Self(name))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = NameError;
            fn try_from(value: String) -> Result<Self, Self::Error> {
                Self::new(value)
            }
        }

        impl From<$name> for String {
            fn from(value: $name) -> Self {
                value.0
            }
        }

        impl FromStr for $name {
            type Err = NameError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::new(s)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl JsonSchema for $name {
            fn schema_name() -> std::borrow::Cow<'static, str> {
                stringify!($name).into()
            }

            fn inline_schema() -> bool {
                true
            }

            fn json_schema(_: &mut SchemaGenerator) -> Schema {
                json_schema!({
                    "type": "string",
                    "description": concat!("A ", $what, ": a DNS-1123 label (lowercase letters, digits and '-', at most 63 characters)."),
                    "minLength": 1,
                    "maxLength": MAX_LABEL_LEN,
                    "pattern": DNS1123_LABEL_PATTERN,
                })
            }
        }
    };
}

label_newtype!(
    /// The id of one device in the fleet; also its NATS key and its virtual Node's base name.
    DeviceId,
    "device id"
);
label_newtype!(
    /// The id of one resource within a device's manifest (unique per device).
    ResourceId,
    "resource id"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_labels() {
        for ok in ["pi-kitchen", "a", "0", "x1-2-3", &"a".repeat(63)] {
            assert!(DeviceId::new(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn rejects_each_rule_with_its_own_error() {
        assert_eq!(
            DeviceId::new(""),
            Err(NameError::Empty { what: "device id" })
        );
        assert!(matches!(
            DeviceId::new("a".repeat(64)),
            Err(NameError::TooLong { len: 64, .. })
        ));
        assert!(matches!(
            DeviceId::new("Pi"),
            Err(NameError::InvalidCharacter {
                found: 'P',
                position: 0,
                ..
            })
        ));
        // Subject wildcards and separators would let a key address other devices.
        for bad in ["a.b", "a*", "a>", "a b", "a/b", "é"] {
            assert!(
                matches!(
                    ResourceId::new(bad),
                    Err(NameError::InvalidCharacter { .. })
                ),
                "{bad}"
            );
        }
        assert!(matches!(
            DeviceId::new("-pi"),
            Err(NameError::BadEdge { .. })
        ));
        assert!(matches!(
            DeviceId::new("pi-"),
            Err(NameError::BadEdge { .. })
        ));
    }

    #[test]
    fn error_messages_name_the_field_and_value() {
        let msg = DeviceId::new("Kitchen.Pi").unwrap_err().to_string();
        assert!(msg.contains("device id"), "{msg}");
        assert!(msg.contains("Kitchen.Pi"), "{msg}");
    }

    #[test]
    fn deserializing_validates() {
        let err = serde_json::from_str::<DeviceId>("\"UPPER\"").unwrap_err();
        assert!(err.to_string().contains("only lowercase"), "{err}");
        let ok: DeviceId = serde_json::from_str("\"pi-1\"").unwrap();
        assert_eq!(ok.as_str(), "pi-1");
    }
}
