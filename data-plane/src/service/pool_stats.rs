//! `PoolService`: this data plane's pool figures (per database server and per tenant),
//! its route count and how far its route stream has got, translated into protobuf.

use std::sync::Arc;

use tenantry_proto::dataplane::v1 as pb;

use crate::pool::{PoolFigures, PoolManager};
use crate::routing::{Router, StreamProgress};

/// `PoolService`: the pool figures of this data plane.
pub(crate) struct PoolApi {
    pub(crate) pools: Arc<PoolManager>,
    pub(crate) router: Arc<Router>,
    pub(crate) route_stream: Arc<StreamProgress>,
}

fn figures_to_proto(figures: PoolFigures) -> pb::PoolFigures {
    pb::PoolFigures {
        open: figures.open,
        idle: figures.idle,
        in_use: figures.in_use,
        waiting: figures.waiting,
    }
}

#[tonic::async_trait]
impl pb::pool_service_server::PoolService for PoolApi {
    async fn get_pool_stats(
        &self,
        _request: tonic::Request<pb::GetPoolStatsRequest>,
    ) -> Result<tonic::Response<pb::GetPoolStatsResponse>, tonic::Status> {
        let (servers, tenants) = self.pools.stats();
        Ok(tonic::Response::new(pb::GetPoolStatsResponse {
            servers: servers
                .into_iter()
                .map(|server| pb::ServerPoolStats {
                    server: server.server,
                    budget: server.budget,
                    connections: Some(figures_to_proto(server.connections)),
                    pools: server.pools,
                    evictions: server.evictions,
                })
                .collect(),
            tenants: tenants
                .into_iter()
                .map(|tenant| pb::TenantPoolStats {
                    tenant_id: tenant.tenant_id.to_string(),
                    server: tenant.server,
                    max_connections: tenant.max_connections,
                    connections: Some(figures_to_proto(tenant.connections)),
                    pipelined_statements: tenant.pipelined_statements,
                })
                .collect(),
            routes: self.router.len() as u64,
            route_stream_live: *self.route_stream.live().borrow(),
            route_version: *self.route_stream.applied().borrow(),
        }))
    }
}
