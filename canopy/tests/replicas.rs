//! Replicated cloud controllers in one process, through their admin APIs: a replica joins a
//! running group, catches up, serves requests by forwarding them to the leader, and leaves;
//! a replica without a leader answers 503 after its wait bound instead of hanging.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use canopy::bootstrap;
use canopy_cloud_controller::admin::ClusterView;
use canopy_cloud_controller::{ClcConfig, ClcHandle};
use serde_json::json;

fn config(dir: &std::path::Path, id: u64, token: &str) -> ClcConfig {
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let mut c = ClcConfig::new(dir.to_path_buf());
    c.ec2_listen = any;
    c.admin_listen = any;
    c.grpc_listen = any;
    c.admin_token = Some(token.into());
    c.replica.id = id;
    c.replica.raft_listen = any;
    c.replica.timers.request_wait = Duration::from_millis(800);
    c
}

async fn admin(
    handle: &ClcHandle,
    token: &str,
    method: reqwest::Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    let url = format!("http://{}{path}", handle.admin_addr);
    let mut req = canopy_cloud_controller::http::client()
        .request(method, &url)
        .bearer_auth(token);
    if let Some(body) = body {
        req = req.json(&body);
    }
    let resp = req.send().await.expect("admin API answers");
    let status = resp.status().as_u16();
    (status, resp.json().await.expect("JSON body"))
}

async fn cluster(handle: &ClcHandle, token: &str, path: &str) -> ClusterView {
    let (status, body) = admin(handle, token, reqwest::Method::GET, path, None).await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_value(body).expect("a ClusterView")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_joins_catches_up_serves_through_the_leader_and_leaves() {
    let d1 = tempfile::tempdir().unwrap();
    let d2 = tempfile::tempdir().unwrap();
    let r1 = canopy_cloud_controller::start(config(d1.path(), 1, "tok1"))
        .await
        .unwrap();
    let creds = bootstrap::bootstrap(&r1.clc).await.unwrap();
    let mut c2 = config(d2.path(), 2, "tok2");
    c2.replica.join = true;
    let r2 = canopy_cloud_controller::start(c2).await.unwrap();

    // Not in a group yet: it knows no leader, so it answers 503 after its wait bound, and its
    // own view is still readable.
    let t0 = Instant::now();
    let (status, body) = admin(&r2, "tok2", reqwest::Method::GET, "/v1/cluster", None).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["code"], "ServiceUnavailable");
    assert!(
        t0.elapsed() >= Duration::from_millis(700),
        "{:?}",
        t0.elapsed()
    );
    let own = cluster(&r2, "tok2", "/v1/replica").await;
    assert_eq!((own.replica_id, own.leader), (2, None));

    // Added through the leader: a learner first, then a voter.
    let address = format!("http://{}", r2.raft_addr);
    let (status, body) = admin(
        &r1,
        "tok1",
        reqwest::Method::POST,
        "/v1/cluster/members",
        Some(json!({"id": 2, "address": address})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let view: ClusterView = serde_json::from_value(body).unwrap();
    let voters: Vec<u64> = view
        .members
        .iter()
        .filter(|m| m.voter)
        .map(|m| m.id)
        .collect();
    assert_eq!(voters, vec![1, 2]);

    // A replica that does not run (nothing listens there) is not made a voter: it never
    // catches up, and the change is given up with it left a learner.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_address = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    let (status, body) = admin(
        &r1,
        "tok1",
        reqwest::Method::POST,
        "/v1/cluster/members",
        Some(json!({"id": 7, "address": dead_address, "catch_up_secs": 1.0})),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["code"], "InvalidMembershipChange");
    let view = cluster(&r1, "tok1", "/v1/cluster").await;
    let seven = view
        .members
        .iter()
        .find(|m| m.id == 7)
        .expect("7 is a learner");
    assert!(!seven.voter);
    let (status, body) = admin(
        &r1,
        "tok1",
        reqwest::Method::DELETE,
        "/v1/cluster/members/7",
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");

    // It caught up: the admin account created before it joined is in its own store.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let accounts = r2.clc.store.accounts().await.unwrap();
        if accounts.iter().any(|a| a.account_id == creds.account_id) {
            break;
        }
        assert!(Instant::now() < deadline, "replica 2 never caught up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Asked through replica 2 (its own token), the cluster view is the leader's, with lags.
    let view = cluster(&r2, "tok2", "/v1/cluster").await;
    assert_eq!((view.replica_id, view.leader), (1, Some(1)));
    assert!(view.members.iter().all(|m| m.lag.is_some()), "{view:?}");
    // A wrong token is refused where it arrives, before anything is forwarded.
    let (status, _) = admin(&r2, "tok1", reqwest::Method::GET, "/v1/cluster", None).await;
    assert_eq!(status, 401);

    // Removing an unknown replica is refused; removing replica 2 (asked through itself) works.
    let (status, body) = admin(
        &r2,
        "tok2",
        reqwest::Method::DELETE,
        "/v1/cluster/members/9",
        None,
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("InvalidMembershipChange"))
    );
    let (status, body) = admin(
        &r1,
        "tok1",
        reqwest::Method::DELETE,
        "/v1/cluster/members/2",
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let view = cluster(&r1, "tok1", "/v1/cluster").await;
    assert_eq!(
        view.members.iter().map(|m| m.id).collect::<Vec<_>>(),
        vec![1]
    );

    r2.shutdown().await;
    r1.shutdown().await;
}
