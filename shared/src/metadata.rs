//! gRPC metadata keys Tenantry reads, and `CallTenant`: what a call's `x-tenant-id`
//! names, parsed once by a server's outermost layer and kept in the request's extensions
//! for every later layer (trace, metrics, tenant resolution) to read.

use crate::tenant_id::{InvalidTenantId, TenantId};

/// The metadata entry that names the tenant a data-plane call acts for.
pub const TENANT_ID: &str = "x-tenant-id";

/// Why a call's metadata names no usable tenant. The message says what to fix.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TenantMetadataError {
    #[error("missing {TENANT_ID} metadata: say which tenant the call acts for")]
    Missing,
    #[error("{TENANT_ID} metadata is given more than once; give it once")]
    Repeated,
    #[error("{TENANT_ID}: {0}")]
    Invalid(InvalidTenantId),
}

/// The `x-tenant-id` of one call, parsed once.
#[derive(Clone, Debug)]
pub struct CallTenant {
    /// The first value, parsed (None: there is none).
    first: Option<Result<TenantId, InvalidTenantId>>,
    /// More than one value was given.
    repeated: bool,
}

impl CallTenant {
    /// Parses the call's `x-tenant-id` entries.
    pub fn from_headers(headers: &http::HeaderMap) -> Self {
        let mut values = headers.get_all(TENANT_ID).iter();
        let first = values
            .next()
            .map(|value| TenantId::parse_bytes(value.as_bytes()));
        Self {
            first,
            repeated: values.next().is_some(),
        }
    }

    /// The call's `CallTenant`: the one the outermost layer put in its extensions, or,
    /// where no such layer runs, parsed from its headers now.
    pub fn of<B>(request: &http::Request<B>) -> std::borrow::Cow<'_, Self> {
        match request.extensions().get::<Self>() {
            Some(parsed) => std::borrow::Cow::Borrowed(parsed),
            None => std::borrow::Cow::Owned(Self::from_headers(request.headers())),
        }
    }

    /// The tenant the call names, if its first value is a valid id (for labels and
    /// spans, which tell a refused call's tenant where they can).
    pub fn named(&self) -> Option<&TenantId> {
        self.first.as_ref().and_then(|first| first.as_ref().ok())
    }

    /// The tenant the call acts for: exactly one valid value.
    pub fn require(&self) -> Result<&TenantId, TenantMetadataError> {
        match &self.first {
            None => Err(TenantMetadataError::Missing),
            Some(_) if self.repeated => Err(TenantMetadataError::Repeated),
            Some(Err(error)) => Err(TenantMetadataError::Invalid(error.clone())),
            Some(Ok(tenant_id)) => Ok(tenant_id),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(values: &[&str]) -> http::HeaderMap {
        let mut headers = http::HeaderMap::new();
        for value in values {
            headers.append(
                TENANT_ID,
                http::HeaderValue::from_str(value).unwrap_or_else(|e| panic!("{e}")),
            );
        }
        headers
    }

    #[test]
    fn one_valid_value_is_required() {
        let one = CallTenant::from_headers(&headers(&["acme"]));
        assert_eq!(one.require().map(TenantId::as_str), Ok("acme"));
        let none = CallTenant::from_headers(&headers(&[]));
        assert_eq!(none.require(), Err(TenantMetadataError::Missing));
        assert!(none.named().is_none());
        let two = CallTenant::from_headers(&headers(&["acme", "globex"]));
        assert_eq!(two.require(), Err(TenantMetadataError::Repeated));
        assert_eq!(two.named().map(TenantId::as_str), Some("acme"));
        let bad = CallTenant::from_headers(&headers(&["Acme"]));
        assert!(matches!(
            bad.require(),
            Err(TenantMetadataError::Invalid(_))
        ));
        assert!(bad.named().is_none());
    }
}
