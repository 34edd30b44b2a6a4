//! The link to the CLC: registration (with backoff, since the CLC may start after us),
//! heartbeats with node summaries, prompt forwarding of instance reports, and the periodic
//! full re-report that lets a restarted CLC reconverge.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use canopy_pki::Role;
use canopy_proto::v1 as pb;
use canopy_proto::v1::cloud_controller_client::CloudControllerClient;
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};

use crate::convert;
use crate::model::{InstanceReport, Moment};
use crate::runtime::Shared;

const CLC_RPC_TIMEOUT: Duration = Duration::from_secs(5);
const CLC_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a heartbeat round waits for the other replicas once one has answered. The
/// uplink's one task also forwards reports: a replica cut off by a partition (its packets
/// dropped, not refused) must not hold them for a whole RPC timeout every round.
const STRAGGLER_GRACE: Duration = Duration::from_millis(300);
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// A client over several CLC endpoints that moves to the next one when the current one
/// cannot be reached (a replicated CLC answers "not leader" with UNAVAILABLE too).
pub(crate) struct ClcLink {
    endpoints: Vec<Endpoint>,
    current: usize,
    client: Option<CloudControllerClient<Channel>>,
    /// One lazily connected client per endpoint, for heartbeats (sent to every replica).
    every: Vec<CloudControllerClient<Channel>>,
    transport: canopy_pki::Transport,
}

impl ClcLink {
    /// Endpoints must be non-empty and already validated by `start`.
    pub(crate) fn new(endpoints: Vec<Endpoint>, transport: canopy_pki::Transport) -> Self {
        let endpoints: Vec<Endpoint> = endpoints
            .into_iter()
            .map(|e| {
                e.connect_timeout(CLC_CONNECT_TIMEOUT)
                    .timeout(CLC_RPC_TIMEOUT)
            })
            .collect();
        let every = endpoints
            .iter()
            .map(|e| CloudControllerClient::new(transport.channel(e.clone(), Role::Clc)))
            .collect();
        Self {
            endpoints,
            current: 0,
            client: None,
            every,
            transport,
        }
    }

    /// Calls the endpoints numbered in `targets` at once; the answers, one per endpoint in
    /// the order of the endpoints (endpoints not called count as failed). Once one has
    /// answered, the others get [`STRAGGLER_GRACE`]; those still silent then count as
    /// failed (their calls are dropped).
    async fn call_every<T, F, Fut>(&self, targets: &[usize], f: F) -> Vec<Result<T, tonic::Status>>
    where
        T: Send + 'static,
        F: Fn(CloudControllerClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>> + Send + 'static,
    {
        let mut calls = tokio::task::JoinSet::new();
        for &i in targets {
            let Some(client) = self.every.get(i) else {
                continue;
            };
            let call = f(client.clone());
            calls.spawn(async move { (i, call.await.map(tonic::Response::into_inner)) });
        }
        let mut answers: Vec<Result<T, tonic::Status>> = (0..self.every.len())
            .map(|_| Err(tonic::Status::cancelled("no answer")))
            .collect();
        let mut grace_until: Option<tokio::time::Instant> = None;
        loop {
            let joined = match grace_until {
                None => calls.join_next().await,
                Some(until) => match tokio::time::timeout_at(until, calls.join_next()).await {
                    Ok(joined) => joined,
                    Err(_) => break,
                },
            };
            let Some(joined) = joined else { break };
            if let Ok((i, answer)) = joined {
                if answer.is_ok() && grace_until.is_none() {
                    grace_until = Some(tokio::time::Instant::now() + STRAGGLER_GRACE);
                }
                answers[i] = answer;
            }
        }
        answers
    }

    /// How many endpoints there are.
    fn len(&self) -> usize {
        self.every.len()
    }

    /// Sends the next calls to endpoint `i` (the replica that says it leads).
    fn prefer(&mut self, i: usize) {
        if i != self.current && i < self.endpoints.len() {
            self.current = i;
            self.client = None;
        }
    }

    async fn call<T, F, Fut>(&mut self, f: F) -> Result<T, tonic::Status>
    where
        F: Fn(CloudControllerClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let mut last = tonic::Status::unavailable("no CLC endpoint configured");
        for _ in 0..self.endpoints.len() {
            let Some(endpoint) = self.endpoints.get(self.current) else {
                break;
            };
            let transport = &self.transport;
            let client = self
                .client
                .get_or_insert_with(|| {
                    CloudControllerClient::new(transport.channel(endpoint.clone(), Role::Clc))
                })
                .clone();
            match f(client).await {
                Ok(reply) => return Ok(reply.into_inner()),
                Err(status) if worth_another_endpoint(&status) => {
                    self.client = None;
                    self.current = (self.current + 1) % self.endpoints.len();
                    last = status;
                }
                Err(status) => return Err(status),
            }
        }
        Err(last)
    }
}

fn worth_another_endpoint(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Unknown
            | tonic::Code::Cancelled
    )
}

/// Timing of the uplink.
pub(crate) struct UplinkTiming {
    pub heartbeat: Duration,
    pub resync: Duration,
}

/// Runs forever: register, then heartbeat / forward / re-report until the CLC says it does
/// not know us, then register again.
pub(crate) async fn uplink_loop(
    shared: Arc<Shared>,
    mut link: ClcLink,
    mut reports: mpsc::Receiver<Vec<InstanceReport>>,
    advertise: String,
    timing: UplinkTiming,
) {
    let zone = shared.zone.to_string();
    loop {
        register(&mut link, &zone, &advertise, &mut reports).await;
        // A CLC that just (re)learnt of us gets everything at once.
        let all = shared.state().all_reports();
        send_reports(&mut link, &zone, all).await;
        let mut heartbeat = tokio::time::interval(timing.heartbeat);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut resync =
            tokio::time::interval_at(tokio::time::Instant::now() + timing.resync, timing.resync);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let every: Vec<usize> = (0..link.len()).collect();
        let mut retry = Retry::default();
        loop {
            // A round to every replica, or a retry of those the last round missed (a round
            // to every replica covers them too).
            let targets = tokio::select! {
                _ = heartbeat.tick() => every.clone(),
                _ = tokio::time::sleep_until(retry.at), if !retry.missed.is_empty() => {
                    std::mem::take(&mut retry.missed)
                }
                _ = resync.tick() => {
                    let all = shared.state().all_reports();
                    send_reports(&mut link, &zone, all).await;
                    continue;
                }
                Some(mut batch) = reports.recv() => {
                    // Whatever queued up meanwhile goes in the same call.
                    while let Ok(more) = reports.try_recv() {
                        batch.extend(more);
                    }
                    send_reports(&mut link, &zone, batch).await;
                    continue;
                }
            };
            let round = send_heartbeat(&shared, &mut link, &zone, &advertise, &targets).await;
            if !round.known {
                tracing::info!("the cloud controller does not know this zone; registering again");
                break;
            }
            retry.after_round(round.missed, timing.heartbeat);
        }
    }
}

/// Registers, retrying with exponential backoff until the CLC answers.
async fn register(
    link: &mut ClcLink,
    zone: &str,
    advertise: &str,
    reports: &mut mpsc::Receiver<Vec<InstanceReport>>,
) {
    let mut backoff = FIRST_BACKOFF;
    loop {
        let request = pb::RegisterZoneRequest {
            zone: zone.to_owned(),
            endpoint: advertise.to_owned(),
        };
        match link
            .call(|mut c| {
                let r = request.clone();
                async move { c.register_zone(r).await }
            })
            .await
        {
            Ok(reply) => {
                tracing::info!(zone, endpoint = advertise, region = %reply.region, "registered with the cloud controller");
                return;
            }
            Err(status) => {
                tracing::debug!(zone, %status, ?backoff, "cloud controller not reachable; retrying")
            }
        }
        tokio::time::sleep(backoff).await;
        // Reports queued while unregistered are dropped: the full set follows registration.
        while reports.try_recv().is_ok() {}
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// The replicas a heartbeat missed, and when they are tried again.
///
/// Heartbeats go to every replica so that whichever leads next already knows the zone's
/// nodes and can schedule at once. A replica that just restarted knows nothing until one
/// reaches it: waiting for the next round would make it, if elected meanwhile, hold every
/// launch for up to a heartbeat interval. So the replicas a round missed are tried again
/// alone, soon, and then less and less often, at most once a heartbeat interval (a replica
/// that stays away costs no more than it did in the rounds).
struct Retry {
    missed: Vec<usize>,
    at: tokio::time::Instant,
    backoff: Duration,
}

/// The first retry of a missed replica comes this soon after the round that missed it.
const FIRST_RETRY: Duration = Duration::from_millis(200);

impl Default for Retry {
    fn default() -> Self {
        Self {
            missed: Vec::new(),
            at: tokio::time::Instant::now(),
            backoff: FIRST_RETRY,
        }
    }
}

impl Retry {
    /// Takes note of a round that missed `missed`. Every round tries every replica a retry
    /// was waiting for, so what it missed is all that is left to retry.
    fn after_round(&mut self, missed: Vec<usize>, interval: Duration) {
        self.missed = missed;
        if self.missed.is_empty() {
            self.backoff = FIRST_RETRY;
            return;
        }
        self.at = tokio::time::Instant::now() + self.backoff.min(interval);
        self.backoff = (self.backoff * 2).min(interval);
    }
}

/// What a heartbeat round found.
struct Round {
    /// False when a replica answered that it does not know the zone (only the leader
    /// answers that).
    known: bool,
    /// The replicas that did not answer.
    missed: Vec<usize>,
}

/// Sends one heartbeat to each CLC replica numbered in `targets`, so that whichever leads
/// (or leads next) has a fresh view of the zone. A failed call counts as known: the CLC may
/// just be restarting, and the next heartbeat tells.
async fn send_heartbeat(
    shared: &Shared,
    link: &mut ClcLink,
    zone: &str,
    advertise: &str,
    targets: &[usize],
) -> Round {
    let request = {
        let state = shared.state();
        pb::ZoneHeartbeatRequest {
            zone: zone.to_owned(),
            endpoint: advertise.to_owned(),
            nodes: state
                .summaries(Moment::now())
                .iter()
                .map(convert::summary_to_proto)
                .collect(),
            applied_generation: state.applied_generation(),
        }
    };
    let answers = link
        .call_every(targets, |mut c| {
            let r = request.clone();
            async move { c.zone_heartbeat(r).await }
        })
        .await;
    let missed: Vec<usize> = targets
        .iter()
        .copied()
        .filter(|&i| answers.get(i).is_none_or(Result::is_err))
        .collect();
    if missed.len() == link.len() {
        if let Some(Err(status)) = answers.into_iter().next() {
            tracing::warn!(%status, "zone heartbeat failed on every cloud controller replica");
        }
        return Round {
            known: true,
            missed,
        };
    }
    if let Some(leader) = answers
        .iter()
        .position(|a| a.as_ref().is_ok_and(|r| r.leader))
    {
        link.prefer(leader);
        if let Some(Ok(answer)) = answers.get(leader) {
            shared.revoke(answer.revoked_serials.iter().cloned());
        }
    }
    Round {
        known: answers.iter().all(|a| a.as_ref().map_or(true, |r| r.known)),
        missed,
    }
}

async fn send_reports(link: &mut ClcLink, zone: &str, reports: Vec<InstanceReport>) {
    if reports.is_empty() {
        return;
    }
    let request = pb::ZoneInstanceReports {
        zone: zone.to_owned(),
        reports: reports.iter().map(convert::report_to_proto).collect(),
    };
    if let Err(status) = link
        .call(|mut c| {
            let r = request.clone();
            async move { c.report_instances(r).await }
        })
        .await
    {
        // Not fatal: the periodic full re-report carries the same facts.
        tracing::warn!(%status, count = reports.len(), "forwarding instance reports failed");
    }
}
