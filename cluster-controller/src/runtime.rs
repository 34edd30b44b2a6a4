//! What the services and background loops share.

use std::sync::{Mutex, MutexGuard, PoisonError};

use canopy_common::ZoneName;
use tokio::sync::mpsc;

use crate::model::InstanceReport;
use crate::nodes::NodeClients;
use crate::zone::ZoneState;

/// How many report batches may wait for the uplink; beyond that batches are dropped and the
/// periodic full re-report carries them instead of memory growing while the CLC is away.
pub(crate) const REPORT_QUEUE: usize = 1024;

pub(crate) struct Shared {
    pub zone: ZoneName,
    state: Mutex<ZoneState>,
    pub nodes: NodeClients,
    reports: mpsc::Sender<Vec<InstanceReport>>,
}

impl Shared {
    pub(crate) fn new(
        state: ZoneState,
        reports: mpsc::Sender<Vec<InstanceReport>>,
        transport: canopy_pki::Transport,
    ) -> Self {
        Self {
            zone: state.zone().clone(),
            state: Mutex::new(state),
            nodes: NodeClients::new(transport),
            reports,
        }
    }

    /// Takes the cloud's revocation list. When it changed, the clients to the nodes are
    /// dropped, so no connection made before stays in use: each node's certificate is
    /// checked again (and a revoked node's refused) on the next push.
    pub(crate) fn revoke(&self, serials: impl IntoIterator<Item = String>) {
        let transport = self.nodes.transport();
        if transport.is_tls() && transport.revocations().replace(serials) {
            tracing::info!("the cloud's certificate revocation list changed");
            self.nodes.forget_all();
        }
    }

    /// The revocation list, for the nodes' heartbeat answers.
    pub(crate) fn revoked_serials(&self) -> Vec<String> {
        self.nodes.transport().revocations().list()
    }

    /// The zone state. The lock is never held across an await; and no `ZoneState` method
    /// leaves it half-updated on panic, so a poisoned lock is still safe to use.
    pub(crate) fn state(&self) -> MutexGuard<'_, ZoneState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues reports for the CLC without waiting for it.
    pub(crate) fn forward(&self, reports: Vec<InstanceReport>) {
        if reports.is_empty() {
            return;
        }
        if self.reports.try_send(reports).is_err() {
            tracing::debug!("report queue full; the next full re-report will carry these");
        }
    }
}
