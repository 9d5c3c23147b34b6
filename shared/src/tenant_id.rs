//! `TenantId`: a tenant's id, parsed and validated once at the boundary, trusted after.
//!
//! The pattern is strict so that an id can be used as part of a PostgreSQL identifier, a
//! file name and a metric label without escaping: 1 to 48 characters, lowercase ASCII
//! letters, digits and `-`, starting with a letter and not ending with `-`
//! (`^[a-z]([a-z0-9-]{0,46}[a-z0-9])?$`).

use std::fmt;
use std::sync::Arc;

/// Longest tenant id accepted, in bytes.
pub const MAX_TENANT_ID_LEN: usize = 48;

/// A validated tenant id. Cheap to clone.
///
/// ```
/// use tenantry_shared::TenantId;
///
/// let acme = TenantId::parse("acme-eu").expect("a valid id");
/// assert_eq!(acme.as_str(), "acme-eu");
/// assert_eq!(acme.as_identifier_part(), "acme_eu");
/// assert!(TenantId::parse("Acme").is_err());
/// assert!(TenantId::parse("acme-").is_err());
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TenantId(Arc<str>);

/// Why a string is not a tenant id. The message says what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidTenantId {
    #[error("tenant id is empty")]
    Empty,
    #[error("tenant id is {len} bytes long; the limit is {MAX_TENANT_ID_LEN}")]
    TooLong { len: usize },
    #[error(
        "tenant id must start with a lowercase letter a-z and use only a-z, 0-9 and '-' \
         (pattern ^[a-z]([a-z0-9-]{{0,46}}[a-z0-9])?$); found {found} at byte {position}"
    )]
    BadCharacter { found: String, position: usize },
    #[error("tenant id must not end with '-'")]
    TrailingHyphen,
}

impl TenantId {
    /// Parses and validates a tenant id.
    pub fn parse(raw: &str) -> Result<Self, InvalidTenantId> {
        validate(raw.as_bytes())?;
        Ok(Self(Arc::from(raw)))
    }

    /// Parses raw bytes (for example a metadata value, which may not be UTF-8).
    pub fn parse_bytes(raw: &[u8]) -> Result<Self, InvalidTenantId> {
        validate(raw)?;
        // validate() admits ASCII only, so this cannot fail.
        let text = std::str::from_utf8(raw).map_err(|_| InvalidTenantId::BadCharacter {
            found: "a non-UTF-8 byte".to_owned(),
            position: 0,
        })?;
        Ok(Self(Arc::from(text)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The id with '-' replaced by '_': usable inside PostgreSQL identifiers. The mapping
    /// is one-to-one because ids never contain '_'.
    pub fn as_identifier_part(&self) -> String {
        self.0.replace('-', "_")
    }
}

fn validate(raw: &[u8]) -> Result<(), InvalidTenantId> {
    if raw.is_empty() {
        return Err(InvalidTenantId::Empty);
    }
    if raw.len() > MAX_TENANT_ID_LEN {
        return Err(InvalidTenantId::TooLong { len: raw.len() });
    }
    for (position, &byte) in raw.iter().enumerate() {
        let allowed = match position {
            0 => byte.is_ascii_lowercase(),
            _ => byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'-',
        };
        if !allowed {
            let found = if byte.is_ascii_graphic() {
                format!("'{}'", byte as char)
            } else {
                format!("byte 0x{byte:02x}")
            };
            return Err(InvalidTenantId::BadCharacter { found, position });
        }
    }
    if raw.last() == Some(&b'-') {
        return Err(InvalidTenantId::TrailingHyphen);
    }
    Ok(())
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TenantId({})", self.0)
    }
}

impl std::str::FromStr for TenantId {
    type Err = InvalidTenantId;
    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        Self::parse(raw)
    }
}

impl From<InvalidTenantId> for tonic::Status {
    fn from(error: InvalidTenantId) -> Self {
        tonic::Status::invalid_argument(error.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_valid_ids() {
        for id in ["a", "acme", "acme-corp", "t1", "a-b-c-9", &"a".repeat(48)] {
            assert_eq!(
                TenantId::parse(id).map(|t| t.to_string()),
                Ok(id.to_owned())
            );
        }
    }

    #[test]
    fn rejects_invalid_ids() {
        assert_eq!(TenantId::parse(""), Err(InvalidTenantId::Empty));
        assert_eq!(
            TenantId::parse(&"a".repeat(49)),
            Err(InvalidTenantId::TooLong { len: 49 })
        );
        assert_eq!(
            TenantId::parse("acme-"),
            Err(InvalidTenantId::TrailingHyphen)
        );
        for bad in [
            "Acme", "1acme", "-acme", "ac_me", "ac me", "acmé", "ac.me", "ac\0me",
        ] {
            assert!(
                matches!(
                    TenantId::parse(bad),
                    Err(InvalidTenantId::BadCharacter { .. })
                ),
                "{bad:?} was accepted"
            );
        }
        assert!(TenantId::parse_bytes(&[b'a', 0xff]).is_err());
    }

    #[test]
    fn identifier_part_is_one_to_one() {
        let id = TenantId::parse("a-b").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(id.as_identifier_part(), "a_b");
    }
}
