//! Requests of one tenant waiting for a connection while every connection of its pool is
//! lent out (the pool's `WaitQueue`). A request that gets a connection takes the waiting
//! requests whose statement that connection has prepared and sends them in the same
//! write as its own (`PgConnection::run_pipelined`). Each still runs in an implicit
//! transaction of its own with the session reset ahead of it, so the server does exactly
//! what it would one request after the other, but reads and answers them in one go: less
//! work per request for the server and the data plane.

use std::sync::Arc;

use tenantry_proto::dataplane::v1 as pb;
use tenantry_shared::TenantId;
use tokio::sync::oneshot;

use super::connection::PgConnection;
use super::decode::{Decoder, decoders_of};
use super::execute::check_params;
use super::params::cache_key;
use super::statements::Prepared;
use crate::error::Result;
use crate::pool::{Call, Pick, Queued, WaitQueue};

/// What a one-statement request asks for.
#[derive(Clone, Copy)]
pub(super) enum Wanted {
    /// Its rows (Query), in at most this many response bytes.
    Rows { max_response_bytes: usize },
    /// The count of rows it affected (Execute).
    Count,
}

pub(super) enum Answer {
    Rows(pb::QueryResponse),
    Count(pb::ExecuteResponse),
}

/// A one-statement request to run in a write shared with others, and where its answer
/// goes.
pub(super) struct StatementRequest {
    pub(super) statement: pb::Statement,
    pub(super) wanted: Wanted,
    pub(super) deadline: Option<std::time::Instant>,
    pub(super) tenant: TenantId,
    pub(super) answer: oneshot::Sender<Result<Answer>>,
}

impl StatementRequest {
    pub(super) fn new(
        statement: &pb::Statement,
        call: &Call<'_>,
        wanted: Wanted,
    ) -> (Self, oneshot::Receiver<Result<Answer>>) {
        let (answer, answered) = oneshot::channel();
        let request = Self {
            statement: statement.clone(),
            wanted,
            deadline: call.deadline,
            tenant: call.tenant.clone(),
            answer,
        };
        (request, answered)
    }
}

/// A request waiting for a connection while all of its tenant's are lent out.
pub(crate) struct Job {
    /// Its statement's cache key (`cache_key`).
    key: String,
    request: StatementRequest,
}

/// A request taken by a connection that has its statement prepared.
pub(super) struct Taken {
    pub(super) request: StatementRequest,
    pub(super) prepared: Arc<Prepared>,
    pub(super) decoders: Vec<Decoder>,
}

impl Taken {
    /// Checks `request` against the statement prepared for it: parameter count, and for
    /// rows a Value mapping for every column. A request that fails gets its error now.
    pub(super) fn check(request: StatementRequest, prepared: Arc<Prepared>) -> Option<Self> {
        let decoders =
            check_params(&prepared, &request.statement).and_then(|()| match request.wanted {
                Wanted::Rows { .. } => decoders_of(&prepared),
                Wanted::Count => Ok(Vec::new()),
            });
        match decoders {
            Ok(decoders) => Some(Self {
                request,
                prepared,
                decoders,
            }),
            Err(error) => {
                let _ = request.answer.send(Err(error));
                None
            }
        }
    }
}

/// Queues `statement`; its answer comes on the receiver if a connection takes it.
pub(super) fn enqueue<'q>(
    queue: &'q WaitQueue<Job>,
    statement: &pb::Statement,
    call: &Call<'_>,
    wanted: Wanted,
) -> (Queued<'q, Job>, oneshot::Receiver<Result<Answer>>) {
    let (request, answered) = StatementRequest::new(statement, call, wanted);
    let job = Job {
        key: cache_key(statement),
        request,
    };
    (queue.push(job), answered)
}

/// Takes up to `room` waiting jobs whose statement `connection` has prepared, oldest
/// first; drops those whose request is gone.
pub(super) fn take_for(
    queue: &WaitQueue<Job>,
    connection: &PgConnection,
    room: usize,
) -> Vec<Taken> {
    queue.take(room, |job, has_room| {
        if job.request.answer.is_closed() {
            return Pick::Drop;
        }
        if !has_room {
            return Pick::Keep(job);
        }
        match connection.cached(&job.key) {
            Some(prepared) => Pick::Take(Taken::check(job.request, prepared)),
            None => Pick::Keep(job),
        }
    })
}
