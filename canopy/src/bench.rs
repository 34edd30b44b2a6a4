//! `canopy bench`: the project's own load tool. It drives a running cloud with signed raw
//! EC2 Query requests (no SDK in the way, so it measures the server, not the client) from
//! many concurrent clients, and reports throughput, latency percentiles and errors.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::sync::Mutex;

/// Where and as whom to send requests: the same environment canopyrc exports.
#[derive(Debug, Clone)]
pub struct Target {
    pub endpoint: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    pub region: String,
}

impl Target {
    pub fn from_env() -> Result<Self> {
        let var = |k: &str| {
            std::env::var(k).with_context(|| format!("{k} is not set (source canopyrc first)"))
        };
        Ok(Self {
            endpoint: var("AWS_ENDPOINT_URL_EC2")?
                .trim_end_matches('/')
                .to_owned(),
            access_key_id: var("AWS_ACCESS_KEY_ID")?,
            secret_access_key: var("AWS_SECRET_ACCESS_KEY")?,
            region: var("AWS_DEFAULT_REGION")?,
        })
    }
}

/// One signed EC2 call; returns the HTTP status and body.
pub async fn call(
    http: &reqwest::Client,
    t: &Target,
    params: &[(&str, &str)],
) -> Result<(u16, String)> {
    let url = reqwest::Url::parse(&t.endpoint).context("bad endpoint")?;
    let host = match url.port() {
        Some(p) => format!("{}:{p}", url.host_str().unwrap_or("localhost")),
        None => url.host_str().unwrap_or("localhost").to_owned(),
    };
    // The serializer is not Send: build the body before any await.
    let body = {
        let mut form = form_urlencoded::Serializer::new(String::new());
        for (k, v) in params {
            form.append_pair(k, v);
        }
        form.finish()
    };
    let ct = "application/x-www-form-urlencoded; charset=utf-8";
    let signed = canopy_ec2_wire::sigv4::sign(
        "POST",
        &host,
        "/",
        "",
        &[("content-type".to_owned(), ct.to_owned())],
        body.as_bytes(),
        &t.access_key_id,
        &t.secret_access_key,
        &t.region,
        "ec2",
        chrono::Utc::now(),
    );
    let mut req = http.post(url).header("content-type", ct).body(body);
    for (k, v) in signed {
        req = req.header(k, v);
    }
    let resp = req.send().await?;
    let status = resp.status().as_u16();
    Ok((status, resp.text().await?))
}

fn first_tag(body: &str, name: &str) -> Option<String> {
    let open = format!("<{name}>");
    let rest = body.split_once(&open)?.1;
    Some(rest.split_once(&format!("</{name}>"))?.0.to_owned())
}

#[derive(Debug, Default)]
struct Tally {
    latencies: Vec<Duration>,
    errors: BTreeMap<String, u64>,
    instance_ids: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct RunInstancesLoad {
    pub clients: usize,
    pub duration: Duration,
    pub instance_type: String,
    pub image_id: Option<String>,
    /// Terminate what was launched afterwards (not timed).
    pub cleanup: bool,
    /// More EC2 endpoints (other replicas of the same cloud): client `i` uses endpoint
    /// `i mod n`, the target's own first.
    pub extra_endpoints: Vec<String>,
}

/// Launches one instance per request, each with its own ClientToken, from `clients`
/// concurrent loops for `duration`; prints a report and returns it.
pub async fn run_instances(t: &Target, load: &RunInstancesLoad) -> Result<String> {
    let http = canopy_cloud_controller::http::builder()
        .pool_max_idle_per_host(load.clients)
        .tcp_nodelay(true)
        .build()?;
    let image = match &load.image_id {
        Some(i) => i.clone(),
        None => {
            let (status, body) = call(
                &http,
                t,
                &[("Action", "DescribeImages"), ("Version", "2016-11-15")],
            )
            .await?;
            if status != 200 {
                bail!("DescribeImages failed ({status}): {body}");
            }
            first_tag(&body, "imageId").context("the cloud has no image")?
        }
    };
    let tally = Arc::new(Mutex::new(Tally::default()));
    let start = Instant::now();
    let deadline = start + load.duration;
    let mut endpoints = vec![t.endpoint.clone()];
    endpoints.extend(
        load.extra_endpoints
            .iter()
            .map(|e| e.trim_end_matches('/').to_owned()),
    );
    let mut tasks = Vec::new();
    for client in 0..load.clients {
        let mut target = t.clone();
        target.endpoint = endpoints[client % endpoints.len()].clone();
        let (http, t, tally, image, itype) = (
            http.clone(),
            target,
            tally.clone(),
            image.clone(),
            load.instance_type.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < deadline {
                n += 1;
                let token = format!("bench-{}-{client}-{n}", start.elapsed().as_nanos());
                let params = [
                    ("Action", "RunInstances"),
                    ("Version", "2016-11-15"),
                    ("ImageId", image.as_str()),
                    ("InstanceType", itype.as_str()),
                    ("MinCount", "1"),
                    ("MaxCount", "1"),
                    ("ClientToken", token.as_str()),
                ];
                let t0 = Instant::now();
                let result = call(&http, &t, &params).await;
                let took = t0.elapsed();
                let mut tally = tally.lock().await;
                match result {
                    Ok((200, body)) => {
                        tally.latencies.push(took);
                        if let Some(id) = first_tag(&body, "instanceId") {
                            tally.instance_ids.push(id);
                        }
                    }
                    Ok((status, body)) => {
                        let code =
                            first_tag(&body, "Code").unwrap_or_else(|| format!("HTTP {status}"));
                        *tally.errors.entry(code).or_default() += 1;
                    }
                    Err(e) => *tally.errors.entry(format!("transport: {e}")).or_default() += 1,
                }
            }
        }));
    }
    for task in tasks {
        task.await?;
    }
    let elapsed = start.elapsed();
    let mut tally = Arc::try_unwrap(tally)
        .map_err(|_| anyhow::anyhow!("clients still running"))?
        .into_inner();
    tally.latencies.sort();
    let pct = |p: f64| -> Duration {
        if tally.latencies.is_empty() {
            return Duration::ZERO;
        }
        let i = ((tally.latencies.len() as f64 - 1.0) * p).round() as usize;
        tally.latencies[i]
    };
    let ok = tally.latencies.len();
    let mut report = format!(
        "RunInstances: {clients} clients over {endpoints} endpoint(s), {secs:.1} s: {ok} acknowledged, {rate:.0}/s; latency p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms\n",
        clients = load.clients,
        endpoints = endpoints.len(),
        secs = elapsed.as_secs_f64(),
        rate = ok as f64 / elapsed.as_secs_f64(),
        p50 = pct(0.5).as_secs_f64() * 1e3,
        p99 = pct(0.99).as_secs_f64() * 1e3,
        max = pct(1.0).as_secs_f64() * 1e3,
    );
    for (code, n) in &tally.errors {
        report += &format!("  error {code}: {n}\n");
    }
    if load.cleanup {
        for chunk in tally.instance_ids.chunks(500) {
            let keys: Vec<String> = (1..=chunk.len())
                .map(|i| format!("InstanceId.{i}"))
                .collect();
            let mut params: Vec<(&str, &str)> =
                vec![("Action", "TerminateInstances"), ("Version", "2016-11-15")];
            params.extend(
                keys.iter()
                    .map(String::as_str)
                    .zip(chunk.iter().map(String::as_str)),
            );
            let (status, body) = call(&http, t, &params).await?;
            if status != 200 {
                report += &format!(
                    "  cleanup failed ({status}): {}\n",
                    first_tag(&body, "Message").unwrap_or_default()
                );
                break;
            }
        }
    }
    Ok(report)
}
