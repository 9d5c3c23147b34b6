//! One huge value never takes the data plane's memory: three concurrent Queries each
//! asking for a 400 MB value are refused with RESOURCE_EXHAUSTED naming the limit, and
//! the process's peak resident memory grows by less than 64 MB meanwhile. PostgreSQL:
//! the server message's declared length is checked before its body is read; SQLite: the
//! connection's length limit refuses the value before SQLite makes it.
//!
//! Alone in its test binary: the peak (VmHWM) is the whole process's.

use std::time::Duration;

use tenantry_testkit::{Backend, Sandbox, backend::run_scenario};
use tonic::Code;

/// Allowed growth of the peak resident set over the whole scenario.
const MAX_GROWTH_KB: u64 = 64 * 1024;

/// `VmRSS` or `VmHWM` of this process, in KiB.
fn memory_kb(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status")
        .unwrap_or_else(|e| panic!("cannot read /proc/self/status: {e}"));
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status"))
}

#[test]
fn huge_values_do_not_take_the_memory() {
    run_scenario(async {
        for backend in [Backend::Postgres, Backend::Sqlite] {
            let sandbox = Sandbox::start(backend).await;
            let id = sandbox.tid("huge");
            sandbox.create(&id).await;
            // Warm: the pool, the statement path, the allocator's arenas.
            sandbox
                .query(&id, "SELECT 1 AS one", vec![])
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            let huge = match backend {
                Backend::Postgres => "SELECT repeat('x', 400000000) AS huge",
                Backend::Sqlite => "SELECT zeroblob(400000000) AS huge",
            };
            let before = memory_kb("VmRSS");
            // Resets VmHWM to the current resident set (Linux 4.0 and later); where that
            // is not allowed, the sampler below still sees the peak.
            let cleared = std::fs::write("/proc/self/clear_refs", "5").is_ok();
            let sampling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
            let sampler = {
                let sampling = sampling.clone();
                std::thread::spawn(move || {
                    let mut most = 0;
                    while sampling.load(std::sync::atomic::Ordering::Acquire) {
                        most = most.max(memory_kb("VmRSS"));
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    most
                })
            };
            let calls = (0..3).map(|_| sandbox.query(&id, huge, vec![]));
            let answers =
                tokio::time::timeout(Duration::from_secs(120), futures::future::join_all(calls))
                    .await
                    .unwrap_or_else(|_| panic!("{backend:?}: the huge values took over 2 minutes"));
            for answer in answers {
                let status = answer
                    .err()
                    .unwrap_or_else(|| panic!("{backend:?}: a 400 MB value was answered"));
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                assert!(
                    status.message().contains("max_response_bytes"),
                    "{backend:?}: the refusal does not name the limit: {status:?}"
                );
            }
            sampling.store(false, std::sync::atomic::Ordering::Release);
            let sampled = sampler
                .join()
                .unwrap_or_else(|_| panic!("the sampler panicked"));
            let peak = if cleared {
                sampled.max(memory_kb("VmHWM"))
            } else {
                sampled
            };
            let growth = peak.saturating_sub(before);
            assert!(
                growth < MAX_GROWTH_KB,
                "{backend:?}: resident memory peaked {growth} KiB above the {before} KiB \
                 before the calls"
            );
            // The tenant still serves.
            sandbox
                .query(&id, "SELECT 2 AS two", vec![])
                .await
                .unwrap_or_else(|e| panic!("{backend:?}: {e}"));
        }
    });
}
