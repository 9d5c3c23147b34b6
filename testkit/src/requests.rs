//! Data-plane requests and values as the tests build them: a channel to a plane, a
//! request carrying `x-tenant-id` (and a gRPC deadline), statements and `Value`s.
//! Everything here panics on bad input: it is test code, and the input is the test's.

use std::time::Duration;

use tenantry_proto::dataplane::v1 as dp;
use tonic::transport::Channel;

/// A connected channel to `url` (`http://host:port`).
pub async fn connect(url: &str) -> Channel {
    Channel::from_shared(url.to_owned())
        .unwrap_or_else(|e| panic!("{e}"))
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e}"))
}

/// `message` as a request for `tenant_id` (in `x-tenant-id`).
pub fn with_tenant<T>(message: T, tenant_id: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "x-tenant-id",
        tenant_id
            .parse()
            .unwrap_or_else(|e| panic!("metadata {tenant_id:?}: {e}")),
    );
    request
}

/// A statement with no parameters.
pub fn plain(sql: &str) -> Option<dp::Statement> {
    Some(dp::Statement {
        sql: sql.to_owned(),
        params: vec![],
    })
}

/// A request for `tenant_id` whose gRPC deadline is `timeout` away (none: no deadline).
pub fn with_deadline<T>(
    message: T,
    tenant_id: &str,
    timeout: Option<Duration>,
) -> tonic::Request<T> {
    let mut request = with_tenant(message, tenant_id);
    if let Some(timeout) = timeout {
        request.set_timeout(timeout);
    }
    request
}

/// An Execute request for `tenant_id` whose gRPC deadline is `timeout` away.
pub fn execute_within(
    sql: &str,
    tenant_id: &str,
    timeout: Duration,
) -> tonic::Request<dp::ExecuteRequest> {
    let statement = plain(sql);
    with_deadline(dp::ExecuteRequest { statement }, tenant_id, Some(timeout))
}

/// A Query request for `tenant_id` whose gRPC deadline is `timeout` away.
pub fn query_within(
    sql: &str,
    tenant_id: &str,
    timeout: Duration,
) -> tonic::Request<dp::QueryRequest> {
    let statement = plain(sql);
    with_deadline(dp::QueryRequest { statement }, tenant_id, Some(timeout))
}

pub fn int(v: i64) -> dp::Value {
    dp::Value {
        kind: Some(dp::value::Kind::Int64(v)),
    }
}

pub fn text(v: &str) -> dp::Value {
    dp::Value {
        kind: Some(dp::value::Kind::Text(v.to_owned())),
    }
}

pub fn null() -> dp::Value {
    dp::Value {
        kind: Some(dp::value::Kind::Null(true)),
    }
}
