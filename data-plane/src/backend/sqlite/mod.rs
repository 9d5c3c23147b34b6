//! SQLite tenant databases through rusqlite (docs/adr/0002): one file per tenant, its
//! connections hardened when they open (`connection`: authorizer, progress handler,
//! limits), their switches set per request (`controls`), statements run on the request's
//! own thread or on tokio's blocking threads (`execute`), errors mapped by result code
//! (`error`).

mod connection;
mod controls;
mod error;
mod execute;

use futures::future::BoxFuture;
use tenantry_proto::dataplane::v1 as pb;

use crate::error::Result;
use crate::pool::{Call, TenantPool};

pub(crate) use connection::{SqliteConnectOptions, harden_connection};
pub(crate) use execute::SqliteTenantPool;

impl TenantPool for SqliteTenantPool {
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
}
