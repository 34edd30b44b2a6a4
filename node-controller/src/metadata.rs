//! The instance metadata service (what cloud-init reads), served by each node to its own
//! guests at 169.254.169.254: IMDSv1 and IMDSv2 (session tokens), `meta-data`, `user-data`
//! and the instance identity document.
//!
//! A request is the instance's whose private address it comes from; from any other address
//! it is 404, so no guest can read another's data. [`answer`] decides every response
//! without I/O; [`serve`] only finds the instance and writes the answer.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, Method, Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use canopy_common::HttpTokens;
use hmac::{KeyInit, Mac};
use sha2::Sha256;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{debug, info};

use crate::model::DesiredInstance;

pub const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";
pub const TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";
/// EC2's bounds on a token's lifetime, in seconds.
const TTL_RANGE: std::ops::RangeInclusive<u64> = 1..=21600;

/// Signs and checks session tokens. The key is made at start: tokens do not outlive the
/// node agent (clients ask for a new one when theirs is refused, as on EC2).
#[derive(Clone)]
pub struct TokenKey([u8; 32]);

impl TokenKey {
    pub fn random() -> TokenKey {
        use rand::Rng;
        TokenKey(rand::rng().random())
    }

    fn sign(&self, payload: &str) -> String {
        let mut mac =
            hmac::Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(payload.as_bytes());
        URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    }

    /// A token for `instance` valid until `expires` (Unix seconds).
    pub fn issue(&self, instance: &str, expires: u64) -> String {
        let payload = format!("{instance}|{expires}");
        format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(&payload),
            self.sign(&payload)
        )
    }

    /// Whether `token` was issued to `instance` and is still valid at `now`.
    pub fn check(&self, token: &str, instance: &str, now: u64) -> bool {
        let Some((payload, signature)) = token.split_once('.') else {
            return false;
        };
        let Some(payload) = URL_SAFE_NO_PAD
            .decode(payload)
            .ok()
            .and_then(|p| String::from_utf8(p).ok())
        else {
            return false;
        };
        // Constant time: the signature is compared through the MAC.
        let Ok(signature) = URL_SAFE_NO_PAD.decode(signature) else {
            return false;
        };
        let mut mac =
            hmac::Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(payload.as_bytes());
        if mac.verify_slice(&signature).is_err() {
            return false;
        }
        match payload.split_once('|') {
            Some((id, expires)) => id == instance && expires.parse::<u64>().is_ok_and(|e| now < e),
            None => false,
        }
    }
}

/// A response of the metadata service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
    /// For a token: its TTL, echoed as EC2 does.
    pub ttl: Option<u64>,
}

impl Answer {
    fn text(status: u16, body: impl Into<String>) -> Answer {
        Answer {
            status,
            body: body.into().into_bytes(),
            ttl: None,
        }
    }

    fn not_found() -> Answer {
        Answer::text(404, "Not Found")
    }
}

/// Answers one request from `instance` (`None`: the source address is no instance of this
/// node). `now` is Unix seconds.
pub fn answer(
    instance: Option<&DesiredInstance>,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    key: &TokenKey,
    now: u64,
) -> Answer {
    let Some(inst) = instance else {
        return Answer::not_found();
    };
    if !inst.metadata.http_endpoint_enabled {
        return Answer::not_found();
    }
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let id = inst.instance_id.as_str();
    if path == "/latest/api/token" {
        if method != Method::PUT {
            return Answer::text(405, "Method Not Allowed");
        }
        // EC2 refuses tokens to requests that went through a proxy.
        if headers.contains_key("x-forwarded-for") {
            return Answer::text(403, "Forbidden");
        }
        let Some(ttl) = header(TTL_HEADER).and_then(|t| t.trim().parse::<u64>().ok()) else {
            return Answer::text(400, "Bad Request: missing or invalid token TTL");
        };
        if !TTL_RANGE.contains(&ttl) {
            return Answer::text(400, "Bad Request: the token TTL must be 1 to 21600 seconds");
        }
        return Answer {
            status: 200,
            body: key.issue(id, now + ttl).into_bytes(),
            ttl: Some(ttl),
        };
    }
    if method != Method::GET && method != Method::HEAD {
        return Answer::text(405, "Method Not Allowed");
    }
    match header(TOKEN_HEADER) {
        Some(token) if !key.check(token, id, now) => return Answer::text(401, "Unauthorized"),
        Some(_) => {}
        None if inst.metadata.http_tokens == HttpTokens::Required => {
            return Answer::text(401, "Unauthorized");
        }
        None => {}
    }
    match lookup(inst, path) {
        Some(body) => Answer {
            status: 200,
            body,
            ttl: None,
        },
        None => Answer::not_found(),
    }
}

/// The document at `path` (any API version: `latest` or a date such as `2009-04-04`).
fn lookup(inst: &DesiredInstance, path: &str) -> Option<Vec<u8>> {
    let text = |s: String| Some(s.into_bytes());
    if path == "/" {
        return text("latest\n".into());
    }
    let rest = path.strip_prefix('/')?;
    let (version, rest) = rest.split_once('/').unwrap_or((rest, ""));
    let dated = version.len() == 10 && version.chars().all(|c| c.is_ascii_digit() || c == '-');
    if version != "latest" && !dated {
        return None;
    }
    let m = &inst.metadata;
    let ip = inst.private_ip.map(|ip| ip.to_string()).unwrap_or_default();
    let hostname = format!("ip-{}.{}.compute.internal", ip.replace('.', "-"), m.region);
    match rest {
        "" => {
            let mut items = vec!["dynamic", "meta-data"];
            if !inst.user_data.is_empty() {
                items.push("user-data");
            }
            text(items.join("\n"))
        }
        "user-data" => (!inst.user_data.is_empty()).then(|| inst.user_data.clone()),
        "dynamic" | "dynamic/" => text("instance-identity/".into()),
        "dynamic/instance-identity" | "dynamic/instance-identity/" => text("document".into()),
        "dynamic/instance-identity/document" => Some(identity_document(inst).into_bytes()),
        "meta-data" | "meta-data/" => {
            let mut items = vec![
                "ami-id",
                "ami-launch-index",
                "block-device-mapping/",
                "hostname",
                "instance-id",
                "instance-type",
                "local-hostname",
                "local-ipv4",
                "placement/",
            ];
            if m.public_key.is_some() {
                items.push("public-keys/");
            }
            if m.public_ip.is_some() {
                items.push("public-ipv4");
            }
            items.extend(["reservation-id", "security-groups"]);
            if m.kernel_id.is_some() {
                items.push("kernel-id");
            }
            if m.ramdisk_id.is_some() {
                items.push("ramdisk-id");
            }
            items.sort_unstable();
            text(items.join("\n"))
        }
        "meta-data/ami-id" => text(inst.image_id.to_string()),
        "meta-data/ami-launch-index" => text(m.launch_index.to_string()),
        "meta-data/instance-id" => text(inst.instance_id.to_string()),
        "meta-data/instance-type" => text(inst.instance_type.clone()),
        "meta-data/hostname" | "meta-data/local-hostname" => text(hostname),
        "meta-data/local-ipv4" => inst.private_ip.and_then(|_| text(ip)),
        "meta-data/reservation-id" => text(m.reservation_id.clone()),
        "meta-data/public-ipv4" => m.public_ip.clone().and_then(text),
        "meta-data/security-groups" => text(m.security_groups.join("\n")),
        "meta-data/kernel-id" => m.kernel_id.clone().and_then(text),
        "meta-data/ramdisk-id" => m.ramdisk_id.clone().and_then(text),
        "meta-data/placement" | "meta-data/placement/" => text("availability-zone\nregion".into()),
        "meta-data/placement/availability-zone" => text(m.zone.clone()),
        "meta-data/placement/region" => text(m.region.clone()),
        "meta-data/block-device-mapping" | "meta-data/block-device-mapping/" => {
            text("ami\nroot".into())
        }
        "meta-data/block-device-mapping/ami" | "meta-data/block-device-mapping/root" => {
            text("/dev/sda1".into())
        }
        "meta-data/public-keys" | "meta-data/public-keys/" => {
            let name = inst.key_name.clone().unwrap_or_default();
            m.public_key
                .as_ref()
                .and_then(|_| text(format!("0={name}")))
        }
        "meta-data/public-keys/0" | "meta-data/public-keys/0/" => m
            .public_key
            .as_ref()
            .and_then(|_| text("openssh-key".into())),
        "meta-data/public-keys/0/openssh-key" => {
            m.public_key.as_ref().and_then(|k| text(format!("{k}\n")))
        }
        _ => None,
    }
}

/// EC2's instance identity document.
fn identity_document(inst: &DesiredInstance) -> String {
    let m = &inst.metadata;
    let doc = serde_json::json!({
        "accountId": m.account_id,
        "architecture": "x86_64",
        "availabilityZone": m.zone,
        "billingProducts": null,
        "devpayProductCodes": null,
        "marketplaceProductCodes": null,
        "imageId": inst.image_id.to_string(),
        "instanceId": inst.instance_id.to_string(),
        "instanceType": inst.instance_type,
        "kernelId": m.kernel_id,
        "pendingTime": m.launch_time,
        "privateIp": inst.private_ip.map(|ip| ip.to_string()),
        "ramdiskId": m.ramdisk_id,
        "region": m.region,
        "version": "2017-09-30",
    });
    serde_json::to_string_pretty(&doc).unwrap_or_default()
}

/// How the server finds the instance a request comes from.
pub trait InstanceByAddress: Send + Sync + 'static {
    fn instance_at(&self, ip: IpAddr) -> Option<DesiredInstance>;
}

struct Served {
    instances: Arc<dyn InstanceByAddress>,
    key: TokenKey,
}

/// Serves the metadata service on `listener` until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    instances: Arc<dyn InstanceByAddress>,
    mut shutdown: watch::Receiver<bool>,
) {
    let state = Arc::new(Served {
        instances,
        key: TokenKey::random(),
    });
    let app = axum::Router::new()
        .fallback(handle)
        .with_state(state)
        .into_make_service_with_connect_info::<SocketAddr>();
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "metadata service listening");
    }
    let stop = async move {
        while !*shutdown.borrow() {
            if shutdown.changed().await.is_err() {
                break;
            }
        }
    };
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(stop)
        .await
    {
        tracing::warn!(error = %e, "metadata service stopped");
    }
}

async fn handle(
    State(served): State<Arc<Served>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request<Body>,
) -> Response {
    let ip = match peer.ip() {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    let instance = served.instances.instance_at(ip);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let a = answer(
        instance.as_ref(),
        request.method(),
        request.uri().path(),
        request.headers(),
        &served.key,
        now,
    );
    debug!(%ip, path = request.uri().path(), status = a.status, "metadata request");
    let status = StatusCode::from_u16(a.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (status, [(header::CONTENT_TYPE, "text/plain")], a.body).into_response();
    if let Some(ttl) = a.ttl
        && let Ok(v) = ttl.to_string().parse()
    {
        response.headers_mut().insert(TTL_HEADER, v);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use canopy_common::{ImageId, InstanceId, InstanceMetadata, PowerState, Resources};

    fn instance(n: u8, ip: &str) -> DesiredInstance {
        DesiredInstance {
            instance_id: InstanceId::parse(&format!("i-0123456789abcdef{n}")).unwrap(),
            instance_type: "t2.micro".into(),
            resources: Resources::new(1, 1024, 8),
            image_id: ImageId::parse("ami-0123456789abcdef0").unwrap(),
            user_data: b"#cloud-config\n".to_vec(),
            key_name: Some("laptop".into()),
            desired: PowerState::Running,
            reboot_seq: 0,
            start_seq: 0,
            private_ip: Some(ip.parse().unwrap()),
            metadata: InstanceMetadata {
                account_id: "123456789012".into(),
                reservation_id: "r-0123456789abcdef0".into(),
                launch_index: 0,
                zone: "canopy-1a".into(),
                region: "canopy-1".into(),
                public_key: Some("ssh-ed25519 AAAAC3Nz laptop".into()),
                security_groups: vec!["default".into(), "web".into()],
                launch_time: "2026-11-30T00:00:00Z".into(),
                kernel_id: None,
                ramdisk_id: None,
                http_tokens: HttpTokens::Optional,
                http_endpoint_enabled: true,
                public_ip: None,
            },
            boot: Default::default(),
            volumes: vec![],
        }
    }

    fn get(
        inst: Option<&DesiredInstance>,
        path: &str,
        token: Option<&str>,
        key: &TokenKey,
        now: u64,
    ) -> Answer {
        let mut headers = HeaderMap::new();
        if let Some(t) = token {
            headers.insert(TOKEN_HEADER, t.parse().unwrap());
        }
        answer(inst, &Method::GET, path, &headers, key, now)
    }

    fn body(a: &Answer) -> &str {
        std::str::from_utf8(&a.body).unwrap()
    }

    #[test]
    fn v1_reads_what_cloud_init_reads() {
        let key = TokenKey::random();
        let i = instance(1, "172.16.0.4");
        let ok = |path: &str| {
            let a = get(Some(&i), path, None, &key, 100);
            assert_eq!(a.status, 200, "{path}");
            body(&a).to_owned()
        };
        assert_eq!(ok("/latest/meta-data/instance-id"), "i-0123456789abcdef1");
        assert_eq!(
            ok("/2009-04-04/meta-data/instance-id"),
            "i-0123456789abcdef1"
        );
        assert_eq!(ok("/latest/meta-data/ami-id"), "ami-0123456789abcdef0");
        assert_eq!(ok("/latest/meta-data/local-ipv4"), "172.16.0.4");
        assert_eq!(
            ok("/latest/meta-data/hostname"),
            "ip-172-16-0-4.canopy-1.compute.internal"
        );
        assert_eq!(
            ok("/latest/meta-data/placement/availability-zone"),
            "canopy-1a"
        );
        assert_eq!(ok("/latest/meta-data/security-groups"), "default\nweb");
        assert_eq!(ok("/latest/meta-data/public-keys/"), "0=laptop");
        assert_eq!(
            ok("/latest/meta-data/public-keys/0/openssh-key"),
            "ssh-ed25519 AAAAC3Nz laptop\n"
        );
        assert_eq!(ok("/latest/user-data"), "#cloud-config\n");
        assert!(
            ok("/latest/meta-data/")
                .lines()
                .any(|l| l == "public-keys/")
        );
        let doc: serde_json::Value =
            serde_json::from_str(&ok("/latest/dynamic/instance-identity/document")).unwrap();
        assert_eq!(doc["instanceId"], "i-0123456789abcdef1");
        assert_eq!(doc["accountId"], "123456789012");
        assert_eq!(doc["privateIp"], "172.16.0.4");
        assert_eq!(
            get(Some(&i), "/latest/meta-data/nope", None, &key, 100).status,
            404
        );
        // No user data: 404, as on EC2.
        let bare = DesiredInstance {
            user_data: vec![],
            ..i.clone()
        };
        assert_eq!(
            get(Some(&bare), "/latest/user-data", None, &key, 100).status,
            404
        );
    }

    #[test]
    fn an_unknown_source_gets_404_and_a_disabled_endpoint_answers_nothing() {
        let key = TokenKey::random();
        assert_eq!(
            get(None, "/latest/meta-data/instance-id", None, &key, 1).status,
            404
        );
        let mut i = instance(1, "172.16.0.4");
        i.metadata.http_endpoint_enabled = false;
        assert_eq!(
            get(Some(&i), "/latest/meta-data/instance-id", None, &key, 1).status,
            404
        );
    }

    #[test]
    fn v2_tokens_are_per_instance_expire_and_can_be_required() {
        let key = TokenKey::random();
        let a = instance(1, "172.16.0.4");
        let b = instance(2, "172.16.0.5");
        let put = |inst: &DesiredInstance, ttl: Option<&str>, forwarded: bool| {
            let mut headers = HeaderMap::new();
            if let Some(ttl) = ttl {
                headers.insert(TTL_HEADER, ttl.parse().unwrap());
            }
            if forwarded {
                headers.insert("x-forwarded-for", "1.2.3.4".parse().unwrap());
            }
            answer(
                Some(inst),
                &Method::PUT,
                "/latest/api/token",
                &headers,
                &key,
                1000,
            )
        };
        let issued = put(&a, Some("60"), false);
        assert_eq!((issued.status, issued.ttl), (200, Some(60)));
        let token = body(&issued).to_owned();
        assert_eq!(
            get(
                Some(&a),
                "/latest/meta-data/instance-id",
                Some(&token),
                &key,
                1059
            )
            .status,
            200
        );
        // Expired, another instance's, forged: refused.
        assert_eq!(
            get(
                Some(&a),
                "/latest/meta-data/instance-id",
                Some(&token),
                &key,
                1060
            )
            .status,
            401
        );
        assert_eq!(
            get(
                Some(&b),
                "/latest/meta-data/instance-id",
                Some(&token),
                &key,
                1001
            )
            .status,
            401
        );
        assert_eq!(
            get(
                Some(&a),
                "/latest/meta-data/instance-id",
                Some("x.y"),
                &key,
                1001
            )
            .status,
            401
        );
        let other_key = TokenKey::random();
        assert_eq!(
            get(
                Some(&a),
                "/latest/meta-data/instance-id",
                Some(&token),
                &other_key,
                1001
            )
            .status,
            401
        );
        // A token request needs a TTL in range and must not come through a proxy.
        assert_eq!(put(&a, None, false).status, 400);
        assert_eq!(put(&a, Some("0"), false).status, 400);
        assert_eq!(put(&a, Some("21601"), false).status, 400);
        assert_eq!(put(&a, Some("60"), true).status, 403);
        assert_eq!(
            get(Some(&a), "/latest/api/token", None, &key, 1001).status,
            405
        );
        // HttpTokens required: no v1.
        let mut strict = a.clone();
        strict.metadata.http_tokens = HttpTokens::Required;
        assert_eq!(
            get(
                Some(&strict),
                "/latest/meta-data/instance-id",
                None,
                &key,
                1001
            )
            .status,
            401
        );
        assert_eq!(
            get(
                Some(&strict),
                "/latest/meta-data/instance-id",
                Some(&token),
                &key,
                1001
            )
            .status,
            200
        );
    }
}
