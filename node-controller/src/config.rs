//! The node controller's runtime configuration. Loading it (TOML, flags, environment) is
//! the binary's job; this is the validated shape the agent runs with.

use std::net::SocketAddr;
use std::time::Duration;

use canopy_common::NodeId;

use crate::error::NcError;

/// Configuration of one node controller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NcConfig {
    pub node_id: NodeId,
    /// Where the `NodeController` gRPC service listens; port 0 picks a free port.
    pub listen: SocketAddr,
    /// The endpoint the CC uses to reach this node. Default: `http://{bound address}`,
    /// which is only reachable from elsewhere when `listen` is a concrete address.
    pub advertise: Option<String>,
    /// The CC's `ZoneAgent` endpoint, e.g. `http://127.0.0.1:8775`.
    pub cc_endpoint: String,
    /// How often the node tells the CC it is alive.
    pub heartbeat_interval: Duration,
    /// How often the reconciler runs without being woken, and a full report is sent.
    pub resync_interval: Duration,
    /// How long a graceful (ACPI) stop may take before the domain is forced off.
    pub stop_timeout: Duration,
    /// Where the instance metadata service listens for this node's guests (normally
    /// `169.254.169.254:80` on the guests' network); `None`: not served.
    pub metadata_listen: Option<SocketAddr>,
    /// How its gRPC talks: mutual TLS with the node's certificate, or plaintext (dev only).
    pub transport: canopy_pki::Transport,
}

impl NcConfig {
    /// Default for `heartbeat_interval`.
    pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(2);
    /// Default for `resync_interval`.
    pub const DEFAULT_RESYNC_INTERVAL: Duration = Duration::from_secs(5);
    /// Default for `stop_timeout`.
    pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(30);

    /// A configuration with the default intervals.
    pub fn new(node_id: NodeId, listen: SocketAddr, cc_endpoint: impl Into<String>) -> Self {
        NcConfig {
            node_id,
            listen,
            advertise: None,
            cc_endpoint: cc_endpoint.into(),
            heartbeat_interval: Self::DEFAULT_HEARTBEAT_INTERVAL,
            resync_interval: Self::DEFAULT_RESYNC_INTERVAL,
            stop_timeout: Self::DEFAULT_STOP_TIMEOUT,
            metadata_listen: None,
            transport: canopy_pki::Transport::Plaintext,
        }
    }

    /// Checks what the types cannot: non-zero intervals and usable endpoints.
    pub fn validate(&self) -> Result<(), NcError> {
        for (key, value) in [
            ("heartbeat_interval", self.heartbeat_interval),
            ("resync_interval", self.resync_interval),
        ] {
            if value.is_zero() {
                return Err(NcError::Config(format!("{key} must be greater than zero")));
            }
        }
        check_endpoint("cc_endpoint", &self.cc_endpoint)?;
        if let Some(advertise) = &self.advertise {
            check_endpoint("advertise", advertise)?;
        }
        Ok(())
    }
}

fn check_endpoint(key: &str, value: &str) -> Result<(), NcError> {
    let uri: tonic::codegen::http::Uri = value
        .parse()
        .map_err(|e| NcError::Config(format!("{key} {value:?} is not a URI: {e}")))?;
    match uri.scheme_str() {
        Some("http" | "https") if uri.host().is_some() => Ok(()),
        _ => Err(NcError::Config(format!(
            "{key} {value:?} must be an http:// or https:// URL with a host"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> NcConfig {
        NcConfig::new(
            NodeId::parse("node-1").unwrap(),
            "127.0.0.1:0".parse().unwrap(),
            "http://127.0.0.1:8775",
        )
    }

    #[test]
    fn defaults_are_valid() {
        let c = config();
        assert_eq!(c.heartbeat_interval, Duration::from_secs(2));
        assert_eq!(c.resync_interval, Duration::from_secs(5));
        assert_eq!(c.stop_timeout, Duration::from_secs(30));
        c.validate().unwrap();
    }

    #[test]
    fn bad_values_name_the_key() {
        let mut c = config();
        c.heartbeat_interval = Duration::ZERO;
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("heartbeat_interval")
        );

        let mut c = config();
        c.cc_endpoint = "127.0.0.1:8775".into();
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("cc_endpoint")
        );

        let mut c = config();
        c.advertise = Some("not a url".into());
        assert!(c.validate().unwrap_err().to_string().contains("advertise"));
    }
}
