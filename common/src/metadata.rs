//! What the metadata service tells a guest about its instance, beyond the fields every
//! instance spec carries (id, image, type, user data, key name, private address): set by the
//! CLC, passed through the CC untouched, served by the node.

/// EC2's `HttpTokens`: whether IMDSv1 (no session token) is allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HttpTokens {
    #[default]
    Optional,
    Required,
}

impl HttpTokens {
    pub fn name(self) -> &'static str {
        match self {
            HttpTokens::Optional => "optional",
            HttpTokens::Required => "required",
        }
    }

    pub fn parse(s: &str) -> Option<HttpTokens> {
        match s {
            "optional" => Some(HttpTokens::Optional),
            "required" => Some(HttpTokens::Required),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct InstanceMetadata {
    pub account_id: String,
    pub reservation_id: String,
    pub launch_index: u32,
    pub zone: String,
    pub region: String,
    /// The key pair's OpenSSH public key line (with the key's name), if launched with one.
    pub public_key: Option<String>,
    /// The names of its security groups.
    pub security_groups: Vec<String>,
    /// RFC 3339, as the identity document's `pendingTime`.
    pub launch_time: String,
    pub kernel_id: Option<String>,
    pub ramdisk_id: Option<String>,
    pub http_tokens: HttpTokens,
    /// The Elastic IP associated with the instance, if any.
    pub public_ip: Option<String>,
    /// EC2's `HttpEndpoint`: `false` turns the service off for the instance.
    pub http_endpoint_enabled: bool,
}
