//! Request values as statement parameters: the type each is prepared with, the key a
//! prepared statement is cached under (text plus type signature), and the binary
//! encoding of each value.

use postgres_types::{IsNull, ToSql, Type, to_sql_checked};
use tenantry_proto::dataplane::v1 as pb;
use tenantry_proto::dataplane::v1::value::Kind;

/// The type a parameter is prepared with; None lets PostgreSQL infer the type of a NULL
/// from its context.
pub(super) fn type_of(value: &pb::Value) -> Option<Type> {
    match &value.kind {
        Some(Kind::Int64(_)) => Some(Type::INT8),
        Some(Kind::Double(_)) => Some(Type::FLOAT8),
        Some(Kind::Text(_)) => Some(Type::TEXT),
        Some(Kind::Bytes(_)) => Some(Type::BYTEA),
        Some(Kind::Bool(_)) => Some(Type::BOOL),
        Some(Kind::Null(_)) | None => None,
    }
}

/// The key a prepared statement is cached under: the request's text plus its parameter
/// type signature.
pub(super) fn cache_key(statement: &pb::Statement) -> String {
    const MARK: &str = "\n-- tenantry params: ";
    if statement.params.is_empty() {
        return statement.sql.clone();
    }
    let mut key = String::with_capacity(statement.sql.len() + MARK.len() + statement.params.len());
    key.push_str(&statement.sql);
    key.push_str(MARK);
    key.extend(statement.params.iter().map(|value| match &value.kind {
        Some(Kind::Int64(_)) => 'i',
        Some(Kind::Double(_)) => 'd',
        Some(Kind::Text(_)) => 't',
        Some(Kind::Bytes(_)) => 'b',
        Some(Kind::Bool(_)) => 'o',
        Some(Kind::Null(_)) | None => 'n',
    }));
    key
}

/// A request value as a statement parameter, in the binary format of the type it was
/// prepared with (`type_of`).
#[derive(Debug)]
pub(super) struct Param<'a>(&'a pb::Value);

impl ToSql for Param<'_> {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> std::result::Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match &self.0.kind {
            Some(Kind::Int64(v)) => v.to_sql(ty, out),
            Some(Kind::Double(v)) => v.to_sql(ty, out),
            Some(Kind::Text(v)) => v.as_str().to_sql(ty, out),
            Some(Kind::Bytes(v)) => v.as_slice().to_sql(ty, out),
            Some(Kind::Bool(v)) => v.to_sql(ty, out),
            Some(Kind::Null(_)) | None => Ok(IsNull::Yes),
        }
    }

    /// The statement was prepared with this value's own type (or, for a NULL, any).
    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

pub(super) fn params(statement: &pb::Statement) -> impl ExactSizeIterator<Item = Param<'_>> {
    statement.params.iter().map(Param)
}
