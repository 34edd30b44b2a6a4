//! In-process cluster tests: a CLC, a CC per zone and simulated NCs in one process,
//! talking over real gRPC on loopback port 0, driven through the signed EC2 API and
//! steered through the simulated nodes.

use std::time::{Duration, Instant};

use canopy::dev::{self, DevCloud, DevOptions};
use canopy_common::{InstanceId, Resources, ZoneName};

struct Ec2 {
    url: String,
    host: String,
    key: String,
    secret: String,
    http: reqwest::Client,
}

struct Reply {
    status: u16,
    body: String,
}

impl Reply {
    /// Text of every `<name>` element, in document order.
    fn all(&self, name: &str) -> Vec<String> {
        let open = format!("<{name}>");
        let close = format!("</{name}>");
        self.body
            .split(&open)
            .skip(1)
            .filter_map(|rest| rest.split_once(&close).map(|(v, _)| v.to_owned()))
            .collect()
    }

    fn one(&self, name: &str) -> String {
        self.all(name)
            .into_iter()
            .next()
            .unwrap_or_else(|| panic!("no <{name}> in {}", self.body))
    }

    fn error_code(&self) -> String {
        self.one("Code")
    }
}

impl Ec2 {
    fn new(cloud: &DevCloud) -> Self {
        let addr = cloud.clc.ec2_addr;
        Ec2 {
            url: format!("http://{addr}/"),
            host: addr.to_string(),
            key: cloud.admin.access_key_id.clone(),
            secret: cloud.admin.secret_access_key.clone(),
            http: canopy_cloud_controller::http::client(),
        }
    }

    async fn call(&self, action: &str, params: &[(&str, &str)]) -> Reply {
        let mut form = form_urlencoded::Serializer::new(String::new());
        form.append_pair("Action", action)
            .append_pair("Version", "2016-11-15");
        for (k, v) in params {
            form.append_pair(k, v);
        }
        let body = form.finish();
        let ct = "application/x-www-form-urlencoded; charset=utf-8";
        let headers = vec![("content-type".to_string(), ct.to_string())];
        let signed = canopy_ec2_wire::sigv4::sign(
            "POST",
            &self.host,
            "/",
            "",
            &headers,
            body.as_bytes(),
            &self.key,
            &self.secret,
            "canopy-1",
            "ec2",
            chrono::Utc::now(),
        );
        let mut req = self
            .http
            .post(&self.url)
            .header("content-type", ct)
            .body(body);
        for (k, v) in signed {
            req = req.header(k, v);
        }
        let resp = req.send().await.expect("EC2 API reachable");
        Reply {
            status: resp.status().as_u16(),
            body: resp.text().await.expect("body"),
        }
    }

    async fn ok(&self, action: &str, params: &[(&str, &str)]) -> Reply {
        let r = self.call(action, params).await;
        assert_eq!(r.status, 200, "{action} failed: {}", r.body);
        r
    }

    async fn state(&self, id: &str) -> String {
        let r = self.ok("DescribeInstances", &[("InstanceId.1", id)]).await;
        r.one("instanceState")
            .split("<name>")
            .nth(1)
            .and_then(|s| s.split('<').next())
            .unwrap_or_default()
            .to_owned()
    }

    async fn wait_state(&self, id: &str, want: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let got = self.state(id).await;
            if got == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{id} stuck in {got}, wanted {want}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn image(&self) -> String {
        self.ok("DescribeImages", &[]).await.one("imageId")
    }

    async fn run(&self, params: &[(&str, &str)]) -> Reply {
        let image = self.image().await;
        let mut p = vec![("ImageId", image.as_str()), ("InstanceType", "t2.micro")];
        p.extend_from_slice(params);
        self.call("RunInstances", &p).await
    }
}

async fn cloud(
    zones: &[&str],
    nodes_per_zone: u32,
    capacity: Resources,
) -> (tempfile::TempDir, DevCloud) {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = DevOptions::for_tests(dir.path().join("data"));
    opts.zones = zones.iter().map(|z| ZoneName::parse(z).unwrap()).collect();
    opts.nodes_per_zone = nodes_per_zone;
    opts.sim.capacity = capacity;
    let cloud = dev::start(opts).await.expect("dev cloud starts");
    (dir, cloud)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_converge_through_all_three_tiers() {
    let (_dir, cloud) = cloud(&["zone-a"], 2, Resources::new(4, 8192, 100)).await;
    let ec2 = Ec2::new(&cloud);
    let r = ec2
        .run(&[
            ("MinCount", "2"),
            ("MaxCount", "2"),
            ("ClientToken", "tok-1"),
        ])
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let ids = r.all("instanceId");
    assert_eq!(ids.len(), 2);
    assert!(r.all("name").iter().all(|s| s == "pending"));
    for id in &ids {
        ec2.wait_state(id, "running").await;
    }
    // The CC spread the two instances over both nodes (most free memory first).
    let instances: Vec<serde_json::Value> = canopy_cloud_controller::http::client()
        .get(format!("http://{}/v1/instances", cloud.clc.admin_addr))
        .bearer_auth(&cloud.admin_token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut nodes: Vec<&str> = instances
        .iter()
        .map(|i| i["node_id"].as_str().expect("placed"))
        .collect();
    nodes.sort();
    assert_eq!(nodes, vec!["zone-a-node-1", "zone-a-node-2"]);

    // The console comes from the node that runs the instance.
    let console = ec2
        .ok("GetConsoleOutput", &[("InstanceId", &ids[0])])
        .await
        .one("output");
    let text = String::from_utf8(base64_decode(&console)).unwrap();
    assert!(
        text.contains(&format!("booting instance {}", ids[0])),
        "{text}"
    );

    // Stop and start go down to the node and their results come back up.
    ec2.ok("StopInstances", &[("InstanceId.1", &ids[0])]).await;
    ec2.wait_state(&ids[0], "stopped").await;
    let boots_before = cloud
        .sims
        .iter()
        .map(|s| s.boots(&InstanceId::parse(&ids[0]).unwrap()))
        .sum::<u64>();
    ec2.ok("StartInstances", &[("InstanceId.1", &ids[0])]).await;
    ec2.wait_state(&ids[0], "running").await;
    let boots_after = cloud
        .sims
        .iter()
        .map(|s| s.boots(&InstanceId::parse(&ids[0]).unwrap()))
        .sum::<u64>();
    assert_eq!(boots_after, boots_before + 1);

    // Terminate reaches the node, frees the allocation, and the instance stays visible.
    ec2.ok(
        "TerminateInstances",
        &[("InstanceId.1", &ids[0]), ("InstanceId.2", &ids[1])],
    )
    .await;
    for id in &ids {
        ec2.wait_state(id, "terminated").await;
    }
    cloud.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_failures_are_reported_not_lost() {
    let (_dir, cloud) = cloud(&["zone-a"], 1, Resources::new(8, 16384, 100)).await;
    let ec2 = Ec2::new(&cloud);
    // A start that fails on the node ends the instance with the node's reason.
    cloud.sims[0].fail_next_start("disk image is corrupt");
    let r = ec2.run(&[("MinCount", "1"), ("MaxCount", "1")]).await;
    let id = r.one("instanceId");
    ec2.wait_state(&id, "terminated").await;
    let d = ec2.ok("DescribeInstances", &[("InstanceId.1", &id)]).await;
    assert_eq!(
        d.one("stateReason")
            .split("<code>")
            .nth(1)
            .unwrap()
            .split('<')
            .next()
            .unwrap(),
        "Server.InternalError"
    );

    // A guest that powers itself off is stopped, and stays stopped.
    let r = ec2.run(&[("MinCount", "1"), ("MaxCount", "1")]).await;
    let id = r.one("instanceId");
    ec2.wait_state(&id, "running").await;
    assert!(cloud.sims[0].guest_poweroff(&InstanceId::parse(&id).unwrap()));
    ec2.wait_state(&id, "stopped").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        ec2.state(&id).await,
        "stopped",
        "the node must not restart a guest that shut itself down"
    );
    let d = ec2.ok("DescribeInstances", &[("InstanceId.1", &id)]).await;
    assert!(
        d.body.contains("Client.InstanceInitiatedShutdown"),
        "{}",
        d.body
    );
    cloud.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capacity_is_checked_per_zone_and_launches_what_fits() {
    let (_dir, cloud) = cloud(&["zone-a", "zone-b"], 1, Resources::new(2, 4096, 100)).await;
    let ec2 = Ec2::new(&cloud);
    // Two 1-vCPU nodes per... one 2-vCPU node per zone: four t2.micro fit in all, two per zone.
    let r = ec2.run(&[("MinCount", "3"), ("MaxCount", "3")]).await;
    assert_eq!(r.status, 500, "{}", r.body);
    assert_eq!(r.error_code(), "InsufficientInstanceCapacity");
    let none = ec2.ok("DescribeInstances", &[]).await;
    assert!(
        none.all("instanceId").is_empty(),
        "a refused launch creates nothing"
    );

    let fill_b = [
        ("MinCount", "1"),
        ("MaxCount", "5"),
        ("Placement.AvailabilityZone", "zone-b"),
        ("ClientToken", "fill-b"),
    ];
    let r = ec2.run(&fill_b).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.all("instanceId").len(),
        2,
        "MaxCount is trimmed to what fits"
    );
    assert!(r.all("availabilityZone").iter().all(|z| z == "zone-b"));
    // zone-b is full now, yet a retry of that launch gets it back rather than a refusal.
    let again = ec2.run(&fill_b).await;
    assert_eq!(again.status, 200, "{}", again.body);
    assert_eq!(again.one("reservationId"), r.one("reservationId"));
    assert_eq!(again.all("instanceId"), r.all("instanceId"));
    let mut other = fill_b.to_vec();
    other[1] = ("MaxCount", "4");
    assert_eq!(
        ec2.run(&other).await.error_code(),
        "IdempotentParameterMismatch"
    );
    // The least loaded zone is now zone-a.
    let r = ec2.run(&[("MinCount", "1"), ("MaxCount", "1")]).await;
    assert_eq!(r.one("availabilityZone"), "zone-a");
    let r = ec2
        .run(&[
            ("MinCount", "1"),
            ("MaxCount", "1"),
            ("Placement.AvailabilityZone", "zone-q"),
        ])
        .await;
    assert_eq!(r.error_code(), "InvalidParameterValue");
    cloud.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_and_keys_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let cloud = dev::start(DevOptions::for_tests(data.clone()))
        .await
        .unwrap();
    let ec2 = Ec2::new(&cloud);
    let id = ec2
        .run(&[
            ("MinCount", "1"),
            ("MaxCount", "1"),
            ("ClientToken", "once"),
        ])
        .await
        .one("instanceId");
    ec2.wait_state(&id, "running").await;
    let key = cloud.admin.access_key_id.clone();
    cloud.shutdown().await;

    let cloud = dev::start(DevOptions::for_tests(data)).await.unwrap();
    assert_eq!(cloud.admin.access_key_id, key);
    let ec2 = Ec2::new(&cloud);
    let d = ec2.ok("DescribeInstances", &[("InstanceId.1", &id)]).await;
    assert_eq!(d.one("instanceId"), id);
    // The same client token after the restart still names the first launch.
    let again = ec2
        .run(&[
            ("MinCount", "1"),
            ("MaxCount", "1"),
            ("ClientToken", "once"),
        ])
        .await;
    assert_eq!(again.one("instanceId"), id);
    // The simulated node lost its guest with the process; the cloud starts it again.
    ec2.wait_state(&id, "running").await;
    cloud.shutdown().await;
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(s.trim())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_needs_admin_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = dev::start(DevOptions::for_tests(dir.path().join("data")))
        .await
        .unwrap();
    let addr = cloud.clc.admin_addr;
    let url = format!("http://{addr}/v1/nodes");
    let http = canopy_cloud_controller::http::client();

    let ok = http
        .get(&url)
        .bearer_auth(&cloud.admin_token)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let nodes: Vec<serde_json::Value> = ok.json().await.unwrap();
    assert_eq!(nodes.len(), 1);
    assert_eq!(nodes[0]["healthy"], true);
    assert_eq!(nodes[0]["capacity"]["vcpus"], 16);

    assert_eq!(http.get(&url).send().await.unwrap().status(), 401);
    assert_eq!(
        http.get(&url)
            .bearer_auth("wrong")
            .send()
            .await
            .unwrap()
            .status(),
        401
    );

    // SigV4 with the admin account's key, for the admin service, is accepted …
    let signed = |service: &str, secret: &str| {
        canopy_ec2_wire::sigv4::sign(
            "GET",
            &addr.to_string(),
            "/v1/nodes",
            "",
            &[],
            b"",
            &cloud.admin.access_key_id,
            secret,
            "canopy-1",
            service,
            chrono::Utc::now(),
        )
    };
    let mut req = http.get(&url);
    for (k, v) in signed("canopy-admin", &cloud.admin.secret_access_key) {
        req = req.header(k, v);
    }
    assert_eq!(req.send().await.unwrap().status(), 200);
    // … but not with a wrong secret, nor a signature made for the EC2 service.
    for (service, secret) in [
        ("canopy-admin", "not-the-secret"),
        ("ec2", cloud.admin.secret_access_key.as_str()),
    ] {
        let mut req = http.get(&url);
        for (k, v) in signed(service, secret) {
            req = req.header(k, v);
        }
        assert_eq!(req.send().await.unwrap().status(), 403, "{service}");
    }
    // The OpenAPI document is served to authorised callers and matches the checked-in one.
    let doc = http
        .get(format!("http://{addr}/openapi.json"))
        .bearer_auth(&cloud.admin_token)
        .send()
        .await
        .unwrap();
    assert_eq!(
        doc.text().await.unwrap(),
        canopy_cloud_controller::admin::openapi_json()
    );
    cloud.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_administrators_register_images_from_the_controllers_files() {
    use canopy_cloud_controller::state::Command;
    let dir = tempfile::tempdir().unwrap();
    let cloud = dev::start(DevOptions::for_tests(dir.path().join("data")))
        .await
        .unwrap();
    let file = dir.path().join("disk.raw");
    std::fs::write(&file, [0u8; 4096]).unwrap();
    let location = file.display().to_string();

    let user = canopy_common::AccountId::generate();
    cloud
        .clc
        .clc
        .submit(Command::CreateAccount {
            account_id: user.clone(),
            name: "alice".into(),
            is_admin: false,
            access_key_id: "AKIAALICE0000000000A".into(),
            secret_access_key: "alice-secret".into(),
            at: chrono::Utc::now(),
        })
        .await
        .unwrap();
    let mut alice = Ec2::new(&cloud);
    alice.key = "AKIAALICE0000000000A".into();
    alice.secret = "alice-secret".into();
    let refused = alice
        .call(
            "RegisterImage",
            &[("Name", "alices-disk"), ("ImageLocation", &location)],
        )
        .await;
    assert_eq!(refused.status, 403, "{}", refused.body);
    assert_eq!(refused.error_code(), "UnauthorizedOperation");
    let described = alice.call("DescribeImages", &[("Owner.1", "self")]).await;
    assert!(described.all("imageId").is_empty(), "{}", described.body);

    // The operator may.
    let admin = Ec2::new(&cloud);
    let ok = admin
        .call(
            "RegisterImage",
            &[("Name", "operator-disk"), ("ImageLocation", &location)],
        )
        .await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert!(ok.one("imageId").starts_with("ami-"));
    cloud.shutdown().await;
}
