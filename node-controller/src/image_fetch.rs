//! The production [`ImageFetcher`]: image bytes streamed from the node's cluster controller,
//! which relays them from a cloud controller replica that holds them.

use async_trait::async_trait;
use canopy_common::Sha256Digest;
use canopy_proto::v1 as pb;
use canopy_proto::v1::zone_agent_client::ZoneAgentClient;
use tokio_stream::StreamExt;
use tonic::transport::{Channel, Endpoint};

use crate::image_cache::{ImageFetcher, ImageStream};

pub struct CcImageFetcher {
    client: ZoneAgentClient<Channel>,
}

impl CcImageFetcher {
    /// A fetcher over `cc_endpoint` (connected on first use). The URL was validated with
    /// the node's configuration.
    pub fn new(cc_endpoint: &str, transport: &canopy_pki::Transport) -> Result<Self, String> {
        let endpoint = Endpoint::from_shared(cc_endpoint.to_owned())
            .map_err(|e| format!("{cc_endpoint:?} is not a URI: {e}"))?
            .connect_timeout(std::time::Duration::from_secs(2));
        Ok(Self {
            client: ZoneAgentClient::new(transport.channel(endpoint, canopy_pki::Role::Zone)),
        })
    }
}

#[async_trait]
impl ImageFetcher for CcImageFetcher {
    async fn fetch(&self, sha256: &Sha256Digest) -> Result<ImageStream, String> {
        let stream = self
            .client
            .clone()
            .fetch_image(pb::FetchImageRequest {
                sha256: sha256.to_string(),
            })
            .await
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
            .into_inner();
        Ok(Box::pin(stream.map(|chunk| {
            chunk
                .map(|c| c.data)
                .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
        })))
    }
}
