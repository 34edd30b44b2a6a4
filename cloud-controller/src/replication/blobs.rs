//! Image bytes on every replica. The image store is not in the Raft log (a log entry per
//! megabyte would be absurd): a replica stores the bytes it imports, its committed state then
//! references them, and every replica copies from its peers the referenced bytes it lacks
//! (`RaftTransport.FetchBlob`). Losing the replica that received an image thus no longer loses
//! the image once a copy has been made.
//!
//! [`run`] is a reconciler: each pass re-reads what the state references and what the store
//! holds, and fetches the difference one digest at a time. A failed fetch is retried on the
//! next pass. A single replica (no peers) has nothing to do.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use canopy_common::Sha256Digest;
use canopy_proto::v1 as pb;
use canopy_proto::v1::raft_transport_client::RaftTransportClient;
use tokio_stream::StreamExt;
use tonic::transport::{Channel, Endpoint};

use crate::images::{ImageChunks, ImageStore};
use crate::replication::raft::RaftLog;

/// How often a pass runs when nothing is committed in between.
const EVERY: Duration = Duration::from_secs(2);
/// The longest a digest no peer could give waits before it is asked for again.
const MAX_BACKOFF: Duration = Duration::from_secs(120);
/// A peer that sends nothing for this long has failed the fetch.
const STALL: Duration = Duration::from_secs(60);
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// Clients of the other replicas' `FetchBlob`, kept per address.
pub struct BlobPeers {
    replica: RaftLog,
    transport: canopy_pki::Transport,
    clients: std::sync::Mutex<HashMap<String, RaftTransportClient<Channel>>>,
}

impl BlobPeers {
    pub fn new(replica: RaftLog, transport: canopy_pki::Transport) -> Self {
        Self {
            replica,
            transport,
            clients: Default::default(),
        }
    }

    /// The addresses of the other members of the current membership.
    fn addresses(&self) -> Vec<String> {
        let me = self.replica.id();
        self.replica
            .metrics()
            .membership_config
            .membership()
            .nodes()
            .filter(|(id, _)| **id != me)
            .map(|(_, node)| node.addr.clone())
            .collect()
    }

    fn client(&self, addr: &str) -> Result<RaftTransportClient<Channel>, String> {
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = clients.get(addr) {
            return Ok(c.clone());
        }
        let endpoint = Endpoint::from_shared(addr.to_owned())
            .map_err(|e| format!("bad replica address {addr:?}: {e}"))?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true);
        let client =
            RaftTransportClient::new(self.transport.channel(endpoint, canopy_pki::Role::Clc));
        clients.insert(addr.to_owned(), client.clone());
        Ok(client)
    }

    /// Asks the peer at `addr` for the bytes of `digest`.
    async fn open_at(
        &self,
        addr: &str,
        digest: &Sha256Digest,
    ) -> Result<ImageChunks, tonic::Status> {
        let mut client = self.client(addr).map_err(tonic::Status::unavailable)?;
        let request = pb::FetchImageRequest {
            sha256: digest.to_string(),
        };
        Ok(Box::pin(client.fetch_blob(request).await?.into_inner()))
    }

    /// The bytes of `digest` from the first peer that holds them, or `None` when none does.
    /// The stream is what the peer sends, unverified (the node verifies what it caches).
    pub async fn open(&self, digest: &Sha256Digest) -> Option<ImageChunks> {
        for addr in self.addresses() {
            match self.open_at(&addr, digest).await {
                Ok(chunks) => return Some(chunks),
                Err(status) => {
                    tracing::debug!(peer = %addr, sha256 = %digest, %status, "peer did not serve image bytes");
                }
            }
        }
        None
    }

    /// Copies `digest` from a peer into `images`, verified; tries the next peer when one
    /// lacks it or fails midway. Returns whether the store now holds it.
    pub async fn fetch_into(&self, images: &ImageStore, digest: &Sha256Digest) -> bool {
        for addr in self.addresses() {
            let chunks = match self.open_at(&addr, digest).await {
                Ok(chunks) => chunks,
                Err(status) => {
                    tracing::debug!(peer = %addr, sha256 = %digest, %status, "peer did not serve image bytes");
                    continue;
                }
            };
            let body = chunks.timeout(STALL).map(|chunk| match chunk {
                Ok(Ok(chunk)) => Ok(chunk.data),
                Ok(Err(status)) => Err(status.to_string()),
                Err(_) => Err(format!("no bytes for {STALL:?}")),
            });
            match images.import_expected(digest, Box::pin(body)).await {
                Ok(copied) => {
                    tracing::info!(peer = %addr, sha256 = %digest, size = copied.size, "image bytes copied from a peer");
                    return true;
                }
                Err(e) => {
                    tracing::warn!(peer = %addr, sha256 = %digest, error = %e, "copying image bytes from a peer failed");
                }
            }
        }
        false
    }
}

/// What one pass found and did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Pass {
    /// Referenced digests the store lacked at the start of the pass.
    pub missing: usize,
    pub fetched: Vec<Sha256Digest>,
    pub failed: Vec<Sha256Digest>,
}

/// One pass: every referenced digest the store lacks, fetched from the peers.
pub async fn pass(peers: &BlobPeers, images: &ImageStore) -> Pass {
    pass_except(peers, images, |_| false).await
}

/// A [`pass`] that leaves out the digests `later` names (those still backing off).
async fn pass_except(
    peers: &BlobPeers,
    images: &ImageStore,
    later: impl Fn(&Sha256Digest) -> bool,
) -> Pass {
    let mut done = Pass::default();
    let referenced = match peers.replica.store().referenced_image_digests().await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "cannot list the image bytes in use");
            return done;
        }
    };
    let mut missing: Vec<Sha256Digest> = referenced
        .into_iter()
        .filter(|d| !images.contains(d) && !later(d))
        .collect();
    missing.sort();
    done.missing = missing.len();
    for digest in missing {
        if peers.fetch_into(images, &digest).await {
            done.fetched.push(digest);
        } else {
            done.failed.push(digest);
        }
    }
    done
}

/// Runs a [`pass`] every [`EVERY`], and as soon as this replica applies a command that
/// changes the catalogue (an import's image row, a snapshot's digest), until `shutdown`.
pub async fn run(
    peers: Arc<BlobPeers>,
    images: Arc<ImageStore>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut metrics = peers.replica.raft().metrics();
    let mut raft_stopped = false;
    // Digests no peer could give, and when to ask again: a copy that keeps failing (no peer
    // has it yet, or the only one has bad bytes) is retried less and less often, up to
    // [`MAX_BACKOFF`], rather than streamed again every pass.
    let mut backoff: HashMap<Sha256Digest, (u32, tokio::time::Instant)> = HashMap::new();
    loop {
        // Only commands that change the catalogue (images, snapshots) bring new digests:
        // other applies (launches, reports) must not cost a pass, whose query reads every
        // live instance.
        metrics.borrow_and_update();
        let epoch = peers.replica.store().catalog_epoch();
        let now = tokio::time::Instant::now();
        let done = pass_except(&peers, &images, |d| {
            backoff.get(d).is_some_and(|(_, at)| *at > now)
        })
        .await;
        for digest in &done.fetched {
            backoff.remove(digest);
        }
        // Forgotten: digests now held (an import brought them), and those whose retry is
        // long past without an attempt (no longer referenced).
        backoff.retain(|d, (_, at)| !images.contains(d) && *at + MAX_BACKOFF > now);
        for digest in done.failed {
            let failures = backoff.get(&digest).map_or(0, |(n, _)| *n) + 1;
            let wait = EVERY.saturating_mul(1 << failures.min(8)).min(MAX_BACKOFF);
            tracing::debug!(sha256 = %digest, failures, ?wait, "image bytes still missing; will retry");
            backoff.insert(digest, (failures, now + wait));
        }
        let tick = tokio::time::sleep(EVERY);
        tokio::pin!(tick);
        loop {
            tokio::select! {
                _ = &mut tick => break,
                _ = shutdown.changed() => return,
                changed = metrics.changed(), if !raft_stopped => {
                    // A stopped Raft leaves the periodic passes only.
                    raft_stopped = changed.is_err();
                    if !raft_stopped && peers.replica.store().catalog_epoch() != epoch {
                        break;
                    }
                }
            }
        }
    }
}
