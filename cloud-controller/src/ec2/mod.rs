//! The EC2 Query API edge: SigV4, parameter decoding, dispatch to one module per
//! resource, EC2 XML out, AWS error codes for everything that goes wrong.

mod addresses;
mod catalog;
mod create_image;
mod error;
mod filters;
mod instances;
mod key_pairs;
mod paging;
mod render;
mod security_groups;
mod snapshots;
mod tags;
mod volumes;

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use canopy_common::AccountId;
use canopy_ec2_wire::params::Params;
use canopy_ec2_wire::xml;

pub use error::ApiError;

use crate::clc::Clc;

/// Bodies larger than this are refused before parsing (EC2's own limit is lower still for
/// most calls; user data is at most 16 KiB before base64).
const MAX_BODY: usize = 1 << 20;

pub fn router(clc: Arc<Clc>) -> axum::Router {
    axum::Router::new()
        .fallback(handle)
        .layer(axum::middleware::from_fn_with_state(
            (clc.clone(), crate::forward::Api::Ec2),
            crate::forward::to_leader,
        ))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(clc)
}

/// An EC2 error answer outside a request's normal path (e.g. from the forwarding layer).
pub fn error_response(status: u16, code: &str, message: &str) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
    (
        status,
        [(header::CONTENT_TYPE, "text/xml;charset=UTF-8")],
        xml::error_response(code, message, &request_id()),
    )
        .into_response()
}

/// Actions that only read: each is served after a read barrier, so it sees every write
/// acknowledged before it arrived, on whichever replica that write was made.
fn is_read(action: &str) -> bool {
    action.starts_with("Describe") || action == "GetConsoleOutput"
}

/// One authenticated request.
pub struct Ctx {
    pub clc: Arc<Clc>,
    pub account: AccountId,
    pub request_id: String,
    pub params: Params,
    /// The Host the client used, for DescribeRegions' endpoint.
    pub host: String,
}

impl Ctx {
    /// EC2's DryRun: after validation, answer DryRunOperation instead of acting.
    /// Refuses with `InvalidInstanceID.NotFound` unless the account owns every instance.
    pub async fn require_instances(
        &self,
        ids: &[canopy_common::InstanceId],
    ) -> Result<(), ApiError> {
        self.clc.store.owned_instances(&self.account, ids).await?;
        Ok(())
    }

    pub fn dry_run(&self) -> Result<(), ApiError> {
        if self.params.bool("DryRun")?.unwrap_or(false) {
            Err(ApiError::dry_run())
        } else {
            Ok(())
        }
    }
}

fn request_id() -> String {
    use rand::Rng;
    let b: [u8; 16] = rand::rng().random();
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

async fn handle(
    State(clc): State<Arc<Clc>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let request_id = request_id();
    let result = handle_inner(clc, &method, &uri, &headers, &body, &request_id).await;
    let (status, body) = match result {
        Ok(xml) => (StatusCode::OK, xml),
        Err(e) => {
            tracing::debug!(code = %e.code, message = %e.message, "EC2 request refused");
            let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_REQUEST);
            (
                status,
                xml::error_response(&e.code, &e.message, &request_id),
            )
        }
    };
    (
        status,
        [(header::CONTENT_TYPE, "text/xml;charset=UTF-8")],
        body,
    )
        .into_response()
}

async fn handle_inner(
    clc: Arc<Clc>,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
    request_id: &str,
) -> Result<String, ApiError> {
    let query = uri.query().unwrap_or("");
    let mut params = Params::parse(query.as_bytes());
    if *method == Method::POST {
        params.extend_urlencoded(body);
    } else if *method != Method::GET {
        return Err(ApiError::new(
            405,
            "InvalidAction",
            format!("The HTTP method {method} is not supported"),
        ));
    }

    // Canopy issues no temporary credentials, so no session token can be valid.
    if headers.contains_key("x-amz-security-token") || params.get("X-Amz-Security-Token").is_some()
    {
        return Err(ApiError::new(
            401,
            "AuthFailure",
            "The security token included in the request is invalid.",
        ));
    }
    let (_, account) = clc.verify_sigv4("ec2", method, uri, headers, body)?;

    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("localhost")
        .to_owned();
    let action = params
        .action()
        .map(str::to_owned)
        .ok_or_else(|| ApiError::missing("Action"))?;
    if is_read(&action) {
        clc.replica.read_barrier().await?;
    }
    let ctx = Ctx {
        clc,
        account,
        request_id: request_id.to_owned(),
        params,
        host,
    };
    match action.as_str() {
        "RunInstances" => instances::run_instances(&ctx).await,
        "DescribeInstances" => instances::describe_instances(&ctx).await,
        "TerminateInstances" => {
            instances::change_instances(&ctx, crate::state::InstanceAction::Terminate).await
        }
        "StopInstances" => {
            instances::change_instances(&ctx, crate::state::InstanceAction::Stop).await
        }
        "StartInstances" => {
            instances::change_instances(&ctx, crate::state::InstanceAction::Start).await
        }
        "RebootInstances" => {
            instances::change_instances(&ctx, crate::state::InstanceAction::Reboot).await
        }
        "DescribeInstanceStatus" => instances::describe_instance_status(&ctx).await,
        "GetConsoleOutput" => instances::get_console_output(&ctx).await,
        "DescribeInstanceAttribute" => instances::describe_instance_attribute(&ctx).await,
        "ModifyInstanceAttribute" => instances::modify_instance_attribute(&ctx).await,
        "ModifyInstanceMetadataOptions" => instances::modify_instance_metadata_options(&ctx).await,
        "DescribeImages" => catalog::describe_images(&ctx).await,
        "RegisterImage" => catalog::register_image(&ctx).await,
        "DeregisterImage" => catalog::deregister_image(&ctx).await,
        "CreateImage" => create_image::create_image(&ctx).await,
        "ModifyImageAttribute" => catalog::modify_image_attribute(&ctx).await,
        "DescribeImageAttribute" => catalog::describe_image_attribute(&ctx).await,
        "ResetImageAttribute" => catalog::reset_image_attribute(&ctx).await,
        "DescribeAvailabilityZones" => catalog::describe_availability_zones(&ctx).await,
        "DescribeRegions" => catalog::describe_regions(&ctx).await,
        "DescribeAccountAttributes" => catalog::describe_account_attributes(&ctx).await,
        "DescribeInstanceTypes" => catalog::describe_instance_types(&ctx).await,
        "AllocateAddress" => addresses::allocate_address(&ctx).await,
        "AssociateAddress" => addresses::associate_address(&ctx).await,
        "DisassociateAddress" => addresses::disassociate_address(&ctx).await,
        "ReleaseAddress" => addresses::release_address(&ctx).await,
        "DescribeAddresses" => addresses::describe_addresses(&ctx).await,
        "CreateVolume" => volumes::create_volume(&ctx).await,
        "DescribeVolumes" => volumes::describe_volumes(&ctx).await,
        "DeleteVolume" => volumes::delete_volume(&ctx).await,
        "AttachVolume" => volumes::attach_volume(&ctx).await,
        "DetachVolume" => volumes::detach_volume(&ctx).await,
        "CreateSnapshot" => snapshots::create_snapshot(&ctx).await,
        "DescribeSnapshots" => snapshots::describe_snapshots(&ctx).await,
        "DeleteSnapshot" => snapshots::delete_snapshot(&ctx).await,
        "CreateKeyPair" => key_pairs::create_key_pair(&ctx).await,
        "ImportKeyPair" => key_pairs::import_key_pair(&ctx).await,
        "DescribeKeyPairs" => key_pairs::describe_key_pairs(&ctx).await,
        "DeleteKeyPair" => key_pairs::delete_key_pair(&ctx).await,
        "CreateSecurityGroup" => security_groups::create_security_group(&ctx).await,
        "DeleteSecurityGroup" => security_groups::delete_security_group(&ctx).await,
        "DescribeSecurityGroups" => security_groups::describe_security_groups(&ctx).await,
        "DescribeSecurityGroupRules" => security_groups::describe_security_group_rules(&ctx).await,
        "AuthorizeSecurityGroupIngress" => security_groups::authorize(&ctx, false).await,
        "AuthorizeSecurityGroupEgress" => security_groups::authorize(&ctx, true).await,
        "RevokeSecurityGroupIngress" => security_groups::revoke(&ctx, false).await,
        "RevokeSecurityGroupEgress" => security_groups::revoke(&ctx, true).await,
        "CreateTags" => tags::create_tags(&ctx).await,
        "DeleteTags" => tags::delete_tags(&ctx).await,
        "DescribeTags" => tags::describe_tags(&ctx).await,
        other => Err(ApiError::new(
            400,
            "InvalidAction",
            format!("The action {other} is not valid for this web service."),
        )),
    }
}
