//! `RoutingService`: what a data plane needs to reach a tenant, translated to the routes
//! module. The routes carry the tenant role's credentials, so this service is for data
//! planes only: the control-plane port must not be reachable by internal services.

use std::pin::Pin;

use tenantry_proto::controlplane::v1 as pb;
use tenantry_proto::controlplane::v1::routing_service_server::RoutingService;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};

use super::{parse_tenant_id, record_tenant};
use crate::routes::RouteTable;

pub(crate) struct RoutingApi {
    routes: RouteTable,
}

impl RoutingApi {
    pub(crate) fn new(routes: RouteTable) -> Self {
        Self { routes }
    }
}

type RouteStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::WatchRoutesResponse, Status>> + Send>>;

#[tonic::async_trait]
impl RoutingService for RoutingApi {
    type WatchRoutesStream = RouteStream;

    async fn watch_routes(
        &self,
        request: Request<pb::WatchRoutesRequest>,
    ) -> Result<Response<Self::WatchRoutesStream>, Status> {
        let feed = self
            .routes
            .watch(request.into_inner().after_version)
            .await?;
        Ok(Response::new(Box::pin(
            feed.map(|message| message.map_err(Into::into)),
        )))
    }

    async fn get_route(
        &self,
        request: Request<pb::GetRouteRequest>,
    ) -> Result<Response<pb::Route>, Status> {
        let tenant_id = parse_tenant_id(&request.get_ref().tenant_id)?;
        record_tenant(&tenant_id);
        Ok(Response::new(self.routes.route(&tenant_id).await?))
    }

    async fn get_routes(
        &self,
        request: Request<pb::GetRoutesRequest>,
    ) -> Result<Response<pb::GetRoutesResponse>, Status> {
        let tenant_ids = request.into_inner().tenant_ids;
        let routes = self.routes.routes(&tenant_ids).await?;
        Ok(Response::new(pb::GetRoutesResponse { routes }))
    }
}
