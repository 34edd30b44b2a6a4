//! Console output lives on the node; the CLC asks the instance's CC, which asks the node.

use std::time::Duration;

use canopy_proto::v1 as pb;

use crate::clc::Clc;
use crate::state::Instance;

/// The instance's console bytes, or `None` when its zone cannot be reached now (EC2 then
/// answers with no output, as it does before a console has anything to show).
pub async fn fetch(clc: &Clc, inst: &Instance) -> Option<Vec<u8>> {
    let endpoint = match clc.zones.get(&inst.zone) {
        Some(live) if !live.endpoint.is_empty() => live.endpoint,
        _ => {
            clc.store
                .zones()
                .await
                .ok()?
                .into_iter()
                .find(|z| z.zone == inst.zone)?
                .endpoint
        }
    };
    let mut client = clc.cc_clients.get(&endpoint).ok()?;
    let req = pb::ConsoleRequest {
        instance_id: inst.instance_id.to_string(),
    };
    match tokio::time::timeout(Duration::from_secs(5), client.get_console_output(req)).await {
        Ok(Ok(resp)) => Some(resp.into_inner().output),
        Ok(Err(status)) => {
            tracing::debug!(instance = %inst.instance_id, %status, "console output unavailable");
            None
        }
        Err(_) => None,
    }
}
