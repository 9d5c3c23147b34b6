//! PostgreSQL tenant databases through the data plane's own wire-protocol client
//! (docs/adr/0001: the session reset travels in the same write and implicit transaction
//! as the request's statement, and waiting requests of a tenant go out together).
//!
//! By file: `connection` (opening, protocol I/O, idle check), `auth`, `statements` (the
//! statement cache), `reset` (the session reset), `run` (one statement), `pipeline`
//! (several requests' statements in one write), `waiting` (requests waiting for a
//! connection), `execute` (Execute, Query and Batch on a tenant's pool), `params` and
//! `decode` (values in and out), `error` (errors and their mapping by SQLSTATE).

mod auth;
mod connection;
mod decode;
mod error;
mod execute;
mod params;
mod pipeline;
mod reset;
mod run;
#[cfg(test)]
mod scripted_server;
mod statements;
mod tls;
mod waiting;

use futures::future::BoxFuture;
use tenantry_proto::dataplane::v1 as pb;

use crate::error::Result;
use crate::pool::{Call, TenantPool};

pub(crate) use connection::{PgBackend, PgConnectOptions, postgres_connected};
pub(crate) use execute::PgTenantPool;
pub(crate) use reset::reset_session;
pub(crate) use tls::TlsConfigs;

#[cfg(feature = "testing")]
pub use auth::channel_bound_logins;

impl TenantPool for PgTenantPool {
    fn execute<'a>(
        &'a self,
        statement: &'a pb::Statement,
        call: &'a Call<'a>,
    ) -> BoxFuture<'a, Result<pb::ExecuteResponse>> {
        Box::pin(execute::execute(self, statement, call))
    }

    fn query<'a>(
        &'a self,
        statement: &'a pb::Statement,
        call: &'a Call<'a>,
    ) -> BoxFuture<'a, Result<pb::QueryResponse>> {
        Box::pin(execute::query(self, statement, call))
    }

    fn batch<'a>(
        &'a self,
        statements: &'a [pb::Statement],
        call: &'a Call<'a>,
    ) -> BoxFuture<'a, Result<Vec<pb::ExecuteResponse>>> {
        Box::pin(execute::batch(self, statements, call))
    }

    fn pipelined(&self) -> u64 {
        self.shared().pipelined()
    }
}
