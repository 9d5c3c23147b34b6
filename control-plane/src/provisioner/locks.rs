//! One lock per tenant, so a tenant runs one step sequence (or lifecycle change) at a
//! time. The map holds only tenants someone holds or waits for: the last one to let go
//! removes the entry, so the map stays as small as the work in flight instead of growing
//! with every tenant ever touched.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use tenantry_shared::TenantId;
use tokio::sync::OwnedMutexGuard;

#[derive(Default)]
struct Slot {
    lock: Arc<tokio::sync::Mutex<()>>,
    /// Holders and waiters of `lock`. Counted under the map's mutex (rather than read off
    /// the `Arc`'s count), so a waiter whose future is dropped is forgotten too.
    users: usize,
}

type Slots = Arc<Mutex<HashMap<TenantId, Slot>>>;

#[derive(Clone, Default)]
pub(crate) struct TenantLocks {
    slots: Slots,
}

/// Holds a tenant's lock; dropping it lets the next waiter in.
pub(crate) struct TenantLockGuard {
    // Declared first, so it is released before `_user` leaves the map.
    _guard: OwnedMutexGuard<()>,
    _user: User,
}

/// A holder or waiter of a tenant's lock; leaving removes the slot if it was the last.
struct User {
    slots: Slots,
    tenant_id: TenantId,
}

impl Drop for User {
    fn drop(&mut self) {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(slot) = slots.get_mut(&self.tenant_id) {
            slot.users -= 1;
            if slot.users == 0 {
                slots.remove(&self.tenant_id);
            }
        }
    }
}

impl TenantLocks {
    /// Waits for the tenant's lock.
    pub(crate) async fn lock(&self, tenant_id: &TenantId) -> TenantLockGuard {
        let (lock, user) = {
            let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
            let slot = slots.entry(tenant_id.clone()).or_default();
            slot.users += 1;
            let user = User {
                slots: self.slots.clone(),
                tenant_id: tenant_id.clone(),
            };
            (slot.lock.clone(), user)
        };
        // If this future is dropped while waiting, `user` is dropped with it.
        let guard = lock.lock_owned().await;
        TenantLockGuard {
            _guard: guard,
            _user: user,
        }
    }

    /// Tenants in the map: those whose lock is held or waited for.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn tenant(raw: &str) -> TenantId {
        TenantId::parse(raw).unwrap_or_else(|e| panic!("{e}"))
    }

    #[tokio::test]
    async fn an_idle_tenant_is_forgotten() {
        let locks = TenantLocks::default();
        let acme = tenant("acme");
        let held = locks.lock(&acme).await;
        assert_eq!(locks.len(), 1);

        // A second caller waits while the first holds the lock.
        let waiter = tokio::spawn({
            let locks = locks.clone();
            let acme = acme.clone();
            async move {
                let _guard = locks.lock(&acme).await;
            }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "the lock let two holders in");
        drop(held);
        // The entry stays while the waiter needs it, and goes when the waiter is done.
        waiter.await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(locks.len(), 0);
    }

    #[tokio::test]
    async fn a_waiter_that_gives_up_is_forgotten() {
        let locks = TenantLocks::default();
        let acme = tenant("acme");
        let held = locks.lock(&acme).await;
        let gave_up = tokio::time::timeout(Duration::from_millis(20), locks.lock(&acme)).await;
        assert!(gave_up.is_err(), "the lock let two holders in");
        assert_eq!(locks.len(), 1);
        drop(held);
        assert_eq!(locks.len(), 0);
    }

    #[tokio::test]
    async fn tenants_do_not_wait_for_each_other() {
        let locks = TenantLocks::default();
        let _acme = locks.lock(&tenant("acme")).await;
        let globex = tokio::time::timeout(Duration::from_secs(5), locks.lock(&tenant("globex")))
            .await
            .unwrap_or_else(|_| panic!("another tenant's lock blocked"));
        assert_eq!(locks.len(), 2);
        drop(globex);
        assert_eq!(locks.len(), 1);
    }
}
