//! AWS Signature Version 4: verifying requests from EC2 clients, and signing Canopy's own.
//!
//! Two forms are accepted, as on AWS: the `Authorization: AWS4-HMAC-SHA256 …` header that every SDK
//! sends, and presigned URLs whose `X-Amz-*` parameters sit in the query string.
//!
//! The canonical request follows the published SigV4 rules for services other than S3 (EC2 is one):
//! the path has its dot segments and repeated slashes removed and is then percent-encoded as
//! received (so `%20` on the wire is signed as `%2520`); query keys and values are decoded and
//! re-encoded with only the RFC 3986 unreserved characters left bare, then sorted; header values
//! are trimmed with inner runs of whitespace folded, repeated headers joined with `,`.
//!
//! # Error codes
//!
//! EC2 answers authentication failures with these codes and HTTP statuses; each [`AuthError`]
//! variant documents its evidence. botocore does not retry any of them, so the choice of status
//! mostly matters to tools that look at it (it must be non-2xx).

use std::time::Duration;

use chrono::{DateTime, NaiveDateTime, TimeDelta, Utc};
use hmac::{Hmac, KeyInit, Mac};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode, percent_encode};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The only signing algorithm SigV4 defines.
pub const ALGORITHM: &str = "AWS4-HMAC-SHA256";

/// The payload hash a presigned request may carry instead of the SHA-256 of its body.
pub const UNSIGNED_PAYLOAD: &str = "UNSIGNED-PAYLOAD";

/// The longest validity a presigned URL may ask for (7 days), as on AWS.
pub const MAX_PRESIGN_EXPIRES: u64 = 7 * 24 * 3600;

const TERMINATOR: &str = "aws4_request";
const AMZ_DATE_FORMAT: &str = "%Y%m%dT%H%M%SZ";

/// RFC 3986 unreserved characters stay bare; everything else is `%XX` with upper-case hex.
const ENCODE_COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');
/// As [`ENCODE_COMPONENT`], but `/` separates path segments and stays bare.
const ENCODE_PATH: &AsciiSet = &ENCODE_COMPONENT.remove(b'/');

/// Headers a signer must leave out because proxies may change them; the list is botocore's.
const UNSIGNABLE_HEADERS: &[&str] = &[
    "authorization",
    "connection",
    "expect",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "user-agent",
    "x-amzn-trace-id",
];

/// One received HTTP request, as plain strings so that any server framework can provide it.
#[derive(Debug, Clone, Copy)]
pub struct RequestParts<'a> {
    /// `GET`, `POST`, … exactly as received.
    pub method: &'a str,
    /// The raw (still percent-encoded) path, e.g. `/`.
    pub path: &'a str,
    /// The raw query string without `?`; may be empty.
    pub query: &'a str,
    /// `(lower-case name, value)` in arrival order; a repeated header appears repeatedly.
    pub headers: &'a [(String, String)],
    /// The request body.
    pub body: &'a [u8],
}

/// What a request must be signed for.
#[derive(Debug, Clone, Copy)]
pub struct VerifyConfig<'a> {
    /// The region this endpoint serves; the credential scope must name it.
    pub region: &'a str,
    /// The signing service name, `ec2` for the EC2 API.
    pub service: &'a str,
    /// The current time.
    pub now: DateTime<Utc>,
    /// How far the request's timestamp may be from `now`, either way (AWS allows 15 minutes).
    pub max_skew: Duration,
}

/// Why a request was not authenticated. [`code`](Self::code) and [`http_status`](Self::http_status)
/// give what EC2 sends; `Display` gives the message for the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// The request carries no signature at all.
    ///
    /// Code `MissingAuthenticationToken`, HTTP 403: listed in EC2's API reference under "Common
    /// error types" ("The request must contain either a valid (registered) AWS access key ID or
    /// X.509 certificate", 403). The message is the one AWS services send.
    #[error("Request is missing Authentication Token")]
    MissingAuthenticationToken,

    /// The signature is present but malformed: an unparsable `Authorization` header, a missing
    /// component or date, a signed header that is absent, an unsigned `host`.
    ///
    /// Code `IncompleteSignature`, HTTP 400: EC2's "Common error types" page gives 400. Messages
    /// follow AWS's wording where known, e.g. "Authorization header requires 'Signature'
    /// parameter." and "'x' is named as a SignedHeader, but it does not exist in the HTTP request."
    #[error("{0}")]
    IncompleteSignature(String),

    /// The access key id is unknown.
    ///
    /// Code `AuthFailure`, HTTP 401: EC2 (unlike IAM, STS or SQS, which say
    /// `InvalidClientTokenId`) answers an unknown key with `AuthFailure` "AWS was not able to
    /// validate the provided access credentials" and status 401, as seen in reports from the AWS
    /// Java SDK ("Status Code: 401; Error Code: AuthFailure"), Terraform and Packer.
    #[error("AWS was not able to validate the provided access credentials")]
    AuthFailure,

    /// The signature does not verify, or the credential scope names the wrong date, region,
    /// service or terminator, or the declared payload hash does not match the body.
    ///
    /// Code `SignatureDoesNotMatch`, HTTP 403: EC2 returns it with `403 Forbidden` in its
    /// `<Response><Errors>` envelope (seen through fog/vagrant-aws against an EC2 endpoint). AWS's
    /// SigV4 troubleshooting guide lists the scope problems ("Credential should be scoped to a
    /// valid Region, not …", "Date in Credential scope does not match YYYYMMDD from ISO-8601
    /// version of date from HTTP") as failures of this same verification step, and the Query
    /// protocol services (IAM, SQS) answer them as `SignatureDoesNotMatch` 403; Canopy does the
    /// same and adds the expected value, because a Canopy user most often gets there by
    /// configuring the wrong region.
    #[error("{message}")]
    SignatureDoesNotMatch {
        /// The message for the client.
        message: String,
        /// The canonical request Canopy computed, when it got that far. For the server's log only:
        /// comparing it with the client's (e.g. botocore's debug log) pinpoints the difference.
        canonical_request: Option<String>,
    },

    /// The request's timestamp is too far from the server's clock, or a presigned URL expired.
    ///
    /// Code `RequestExpired`, HTTP 400: EC2 answers "Request has expired." with 400, as seen in
    /// reports from the AWS Java SDK ("Status Code: 400; Error Code: RequestExpired") and boto.
    #[error("{0}")]
    RequestExpired(String),
}

impl AuthError {
    /// The EC2 error code.
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::MissingAuthenticationToken => "MissingAuthenticationToken",
            AuthError::IncompleteSignature(_) => "IncompleteSignature",
            AuthError::AuthFailure => "AuthFailure",
            AuthError::SignatureDoesNotMatch { .. } => "SignatureDoesNotMatch",
            AuthError::RequestExpired(_) => "RequestExpired",
        }
    }

    /// The HTTP status EC2 sends with [`code`](Self::code).
    pub fn http_status(&self) -> u16 {
        match self {
            AuthError::MissingAuthenticationToken => 403,
            AuthError::IncompleteSignature(_) => 400,
            AuthError::AuthFailure => 401,
            AuthError::SignatureDoesNotMatch { .. } => 403,
            AuthError::RequestExpired(_) => 400,
        }
    }

    fn mismatch(message: impl Into<String>) -> AuthError {
        AuthError::SignatureDoesNotMatch {
            message: message.into(),
            canonical_request: None,
        }
    }
}

/// The message AWS sends when the signature itself is wrong.
const MISMATCH_MESSAGE: &str = "The request signature we calculated does not match the signature \
    you provided. Check your AWS Secret Access Key and signing method. Consult the service \
    documentation for details.";

/// Verifies a header-signed (`Authorization: AWS4-HMAC-SHA256 …`) or query-presigned
/// (`X-Amz-Algorithm=AWS4-HMAC-SHA256&…`) request and returns its access key id.
///
/// `secret_for(access_key_id)` returns the key's secret, or `None` for an unknown key; it is
/// called at most once, after the request has been checked for everything that needs no secret.
/// Session tokens (`X-Amz-Security-Token`) are not interpreted: a signed token is covered by the
/// signature like any header, and Canopy issues no temporary credentials.
pub fn verify(
    parts: &RequestParts<'_>,
    cfg: &VerifyConfig<'_>,
    secret_for: impl FnOnce(&str) -> Option<String>,
) -> Result<String, AuthError> {
    let auth = extract(parts)?;
    check_scope(&auth, cfg)?;
    check_time(&auth, cfg)?;
    let payload_hash = payload_hash_for(parts, &auth)?;

    let secret = secret_for(&auth.access_key_id).ok_or(AuthError::AuthFailure)?;
    let signed: Vec<&str> = auth.signed_headers.iter().map(String::as_str).collect();
    let canonical = build_canonical_request(
        parts.method,
        parts.path,
        parts.query,
        parts.headers,
        &signed,
        &payload_hash,
        auth.presigned.is_some(),
    );
    let scope = format!(
        "{}/{}/{}/{}",
        auth.scope_date, auth.region, auth.service, auth.terminator
    );
    let sts = string_to_sign(&auth.amz_date, &scope, &canonical);
    let key = signing_key(
        secret.as_bytes(),
        &auth.scope_date,
        &auth.region,
        &auth.service,
    );
    let expected = hex::encode(hmac(&key, sts.as_bytes()));

    // Constant time, so that timing does not reveal how much of a forged signature was right.
    if bool::from(expected.as_bytes().ct_eq(auth.signature.as_bytes())) {
        Ok(auth.access_key_id)
    } else {
        Err(AuthError::SignatureDoesNotMatch {
            message: MISMATCH_MESSAGE.to_owned(),
            canonical_request: Some(canonical),
        })
    }
}

/// Signs a request in the header style of botocore and returns the headers to add:
/// `("authorization", …)` and `("x-amz-date", …)`.
///
/// `url_host` is the `Host` header the HTTP client will send (`host` or `host:port`; clients omit
/// the default port). Every header in `headers` is signed except the ones proxies may alter
/// (`user-agent`, `expect`, …) and `host`/`x-amz-date`/`authorization`, which this function
/// supplies; so passing `content-type` (and `x-amz-security-token` with temporary credentials)
/// signs `content-type;host;x-amz-date` exactly like botocore. An `x-amz-content-sha256` header is
/// used as the payload hash, as botocore does.
#[allow(clippy::too_many_arguments)] // the SigV4 inputs, kept flat to match the call sites
pub fn sign(
    method: &str,
    url_host: &str,
    path: &str,
    query: &str,
    headers: &[(String, String)],
    body: &[u8],
    access_key_id: &str,
    secret: &str,
    region: &str,
    service: &str,
    now: DateTime<Utc>,
) -> Vec<(String, String)> {
    let amz_date = now.format(AMZ_DATE_FORMAT).to_string();
    let mut all: Vec<(String, String)> = headers
        .iter()
        .map(|(name, value)| (name.to_ascii_lowercase(), value.clone()))
        .filter(|(name, _)| {
            !UNSIGNABLE_HEADERS.contains(&name.as_str()) && name != "host" && name != "x-amz-date"
        })
        .collect();
    all.push(("host".to_owned(), url_host.to_owned()));
    all.push(("x-amz-date".to_owned(), amz_date.clone()));

    let mut names: Vec<&str> = all.iter().map(|(name, _)| name.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    let payload = match header_value(&all, "x-amz-content-sha256") {
        Some(declared) => declared.to_owned(),
        None => hex_sha256(body),
    };
    let canonical = canonical_request(method, path, query, &all, &names, &payload);
    let date = &amz_date[..8];
    let scope = format!("{date}/{region}/{service}/{TERMINATOR}");
    let sts = string_to_sign(&amz_date, &scope, &canonical);
    let key = signing_key(secret.as_bytes(), date, region, service);
    let signature = hex::encode(hmac(&key, sts.as_bytes()));
    let authorization = format!(
        "{ALGORITHM} Credential={access_key_id}/{scope}, SignedHeaders={}, Signature={signature}",
        names.join(";")
    );
    vec![
        ("authorization".to_owned(), authorization),
        ("x-amz-date".to_owned(), amz_date),
    ]
}

/// Presigns a request: returns `query` extended with the `X-Amz-*` parameters (signature last),
/// valid for `expires` from `now`. Only `host` is signed, as botocore's presigner does; the payload
/// hash is that of an empty body, since presigned EC2 requests carry everything in the query.
#[allow(clippy::too_many_arguments)] // the SigV4 inputs, kept flat like `sign`
pub fn presign(
    method: &str,
    url_host: &str,
    path: &str,
    query: &str,
    access_key_id: &str,
    secret: &str,
    region: &str,
    service: &str,
    now: DateTime<Utc>,
    expires: Duration,
) -> String {
    let amz_date = now.format(AMZ_DATE_FORMAT).to_string();
    let date = &amz_date[..8];
    let scope = format!("{date}/{region}/{service}/{TERMINATOR}");
    let credential = format!("{access_key_id}/{scope}");
    let enc = |s: &str| percent_encode(s.as_bytes(), ENCODE_COMPONENT).to_string();
    let mut full = String::from(query);
    if !full.is_empty() {
        full.push('&');
    }
    full.push_str(&format!(
        "X-Amz-Algorithm={ALGORITHM}&X-Amz-Credential={}&X-Amz-Date={amz_date}\
         &X-Amz-Expires={}&X-Amz-SignedHeaders=host",
        enc(&credential),
        expires.as_secs()
    ));
    let headers = [("host".to_owned(), url_host.to_owned())];
    let canonical = canonical_request(method, path, &full, &headers, &["host"], &hex_sha256(b""));
    let sts = string_to_sign(&amz_date, &scope, &canonical);
    let key = signing_key(secret.as_bytes(), date, region, service);
    let signature = hex::encode(hmac(&key, sts.as_bytes()));
    full.push_str("&X-Amz-Signature=");
    full.push_str(&signature);
    full
}

/// The SigV4 canonical request.
///
/// `signed_headers` are lower-case names, sorted (they are used in the given order); every one of
/// them is looked up in `headers` case-insensitively, and repeated headers are joined with `,`.
/// `payload_hash` is the hex SHA-256 of the body or [`UNSIGNED_PAYLOAD`].
pub fn canonical_request(
    method: &str,
    path: &str,
    query: &str,
    headers: &[(String, String)],
    signed_headers: &[&str],
    payload_hash: &str,
) -> String {
    build_canonical_request(
        method,
        path,
        query,
        headers,
        signed_headers,
        payload_hash,
        false,
    )
}

/// The SigV4 string to sign for a canonical request; `amz_date` is `YYYYMMDDTHHMMSSZ` and `scope`
/// is `date/region/service/aws4_request`.
pub fn string_to_sign(amz_date: &str, scope: &str, canonical_request: &str) -> String {
    format!(
        "{ALGORITHM}\n{amz_date}\n{scope}\n{}",
        hex_sha256(canonical_request.as_bytes())
    )
}

/// The SigV4 signing key: HMAC chain of `AWS4{secret}`, date (`YYYYMMDD`), region, service and
/// `aws4_request`.
pub fn signing_key(secret: &[u8], date: &str, region: &str, service: &str) -> [u8; 32] {
    let mut k_secret = Vec::with_capacity(secret.len() + 4);
    k_secret.extend_from_slice(b"AWS4");
    k_secret.extend_from_slice(secret);
    let k_date = hmac(&k_secret, date.as_bytes());
    let k_region = hmac(&k_date, region.as_bytes());
    let k_service = hmac(&k_region, service.as_bytes());
    hmac(&k_service, TERMINATOR.as_bytes())
}

/// The hex SHA-256 of `data`, the payload hash of a body.
pub fn hex_sha256(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC takes any key size");
    mac.update(data);
    mac.finalize().into_bytes().into()
}

fn build_canonical_request(
    method: &str,
    path: &str,
    query: &str,
    headers: &[(String, String)],
    signed_headers: &[&str],
    payload_hash: &str,
    skip_signature_param: bool,
) -> String {
    let mut out = String::with_capacity(256 + query.len());
    out.push_str(method);
    out.push('\n');
    out.push_str(&canonical_path(path));
    out.push('\n');
    out.push_str(&canonical_query(query, skip_signature_param));
    out.push('\n');
    for name in signed_headers {
        out.push_str(name);
        out.push(':');
        let mut first = true;
        for (_, value) in headers.iter().filter(|(n, _)| n.eq_ignore_ascii_case(name)) {
            if !first {
                out.push(',');
            }
            first = false;
            trim_all_into(value, &mut out);
        }
        out.push('\n');
    }
    out.push('\n');
    out.push_str(&signed_headers.join(";"));
    out.push('\n');
    out.push_str(payload_hash);
    out
}

/// Removes dot segments and empty segments (AWS services collapse `//`), keeps a leading and a
/// trailing slash, then percent-encodes each byte of the raw path except unreserved ones and `/`.
fn canonical_path(path: &str) -> String {
    let mut segments: Vec<&str> = Vec::new();
    for segment in path.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut normalized = String::with_capacity(path.len() + 1);
    normalized.push('/');
    normalized.push_str(&segments.join("/"));
    if path.ends_with('/') && !segments.is_empty() {
        normalized.push('/');
    }
    percent_encode(normalized.as_bytes(), ENCODE_PATH).to_string()
}

/// Decodes every key and value (`+` as a space, as the form parser does, so that what is signed is
/// what [`crate::params::Params`] will read) and re-encodes them per RFC 3986, sorted by key then
/// value.
fn canonical_query(query: &str, skip_signature_param: bool) -> String {
    let mut pairs: Vec<(String, String)> = query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (reencode(key), reencode(value))
        })
        .filter(|(key, _)| !(skip_signature_param && key == "X-Amz-Signature"))
        .collect();
    pairs.sort_unstable();
    let mut out = String::with_capacity(query.len() + 16);
    for (i, (key, value)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        out.push_str(key);
        out.push('=');
        out.push_str(value);
    }
    out
}

fn decode_component(raw: &str) -> Vec<u8> {
    let spaced = raw.replace('+', " ");
    percent_decode(spaced.as_bytes()).collect()
}

fn reencode(raw: &str) -> String {
    percent_encode(&decode_component(raw), ENCODE_COMPONENT).to_string()
}

/// Appends `value` trimmed, with each inner run of whitespace folded to one space.
fn trim_all_into(value: &str, out: &mut String) {
    for (i, word) in value.split_whitespace().enumerate() {
        if i > 0 {
            out.push(' ');
        }
        out.push_str(word);
    }
}

fn header_value<'h>(headers: &'h [(String, String)], name: &str) -> Option<&'h str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// Everything a request says about its signature.
#[derive(Debug)]
struct Auth {
    access_key_id: String,
    scope_date: String,
    region: String,
    service: String,
    terminator: String,
    signed_headers: Vec<String>,
    signature: String,
    /// The timestamp as sent (`YYYYMMDDTHHMMSSZ`), which the string to sign repeats.
    amz_date: String,
    time: DateTime<Utc>,
    /// `Some` for a presigned request, with its `X-Amz-Expires` if given.
    presigned: Option<Option<u64>>,
}

fn extract(parts: &RequestParts<'_>) -> Result<Auth, AuthError> {
    let mut authorization = parts
        .headers
        .iter()
        .filter(|(name, _)| name.eq_ignore_ascii_case("authorization"));
    let header = authorization.next().map(|(_, value)| value.as_str());
    if authorization.next().is_some() {
        return Err(AuthError::IncompleteSignature(
            "Only one Authorization header is allowed.".into(),
        ));
    }
    let query = decode_query(parts.query);
    let query_has = |name: &str| query.iter().any(|(k, _)| k == name);

    let auth = match header {
        Some(_) if query_has("X-Amz-Algorithm") => {
            return Err(AuthError::IncompleteSignature(
                "Only one auth mechanism allowed; only the X-Amz-Algorithm query parameter or the \
                 Authorization header should be specified."
                    .into(),
            ));
        }
        Some(header) => from_header(header, parts.headers)?,
        None if query_has("X-Amz-Algorithm") => from_query(&query)?,
        None if query_has("X-Amz-Credential") || query_has("X-Amz-Signature") => {
            return Err(AuthError::IncompleteSignature(
                "AWS query-string parameters must include 'X-Amz-Algorithm'.".into(),
            ));
        }
        None if query_has("Signature") && query_has("AWSAccessKeyId") => {
            return Err(AuthError::IncompleteSignature(
                "Signature Version 2 is not supported; sign requests with AWS4-HMAC-SHA256 \
                 (Signature Version 4)."
                    .into(),
            ));
        }
        None => return Err(AuthError::MissingAuthenticationToken),
    };

    // `host` ties the signature to this endpoint; AWS refuses signatures that leave it out.
    if !auth.signed_headers.iter().any(|h| h == "host") {
        return Err(AuthError::IncompleteSignature(
            "'Host' must be a 'SignedHeader' in the AWS Authorization.".into(),
        ));
    }
    for name in &auth.signed_headers {
        if header_value(parts.headers, name).is_none() {
            return Err(AuthError::IncompleteSignature(format!(
                "'{name}' is named as a SignedHeader, but it does not exist in the HTTP request."
            )));
        }
    }
    Ok(auth)
}

fn decode_query(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (
                String::from_utf8_lossy(&decode_component(key)).into_owned(),
                String::from_utf8_lossy(&decode_component(value)).into_owned(),
            )
        })
        .collect()
}

fn from_header(header: &str, headers: &[(String, String)]) -> Result<Auth, AuthError> {
    let header = header.trim();
    let (algorithm, rest) = header
        .split_once(|c: char| c.is_ascii_whitespace())
        .unwrap_or((header, ""));
    if algorithm != ALGORITHM {
        return Err(AuthError::IncompleteSignature(format!(
            "Unsupported Authorization type '{}'; only {ALGORITHM} (Signature Version 4) is \
             supported.",
            truncate(algorithm)
        )));
    }
    let (mut credential, mut signed_headers, mut signature) = (None, None, None);
    for component in rest.split(',').map(str::trim).filter(|c| !c.is_empty()) {
        let Some((key, value)) = component.split_once('=') else {
            return Err(AuthError::IncompleteSignature(format!(
                "'{}' not a valid key=value pair (missing equal-sign) in Authorization header.",
                truncate(component)
            )));
        };
        match key.trim() {
            "Credential" => credential = Some(value.trim()),
            "SignedHeaders" => signed_headers = Some(value.trim()),
            "Signature" => signature = Some(value.trim()),
            // AWS ignores components it does not know; so do we.
            _ => {}
        }
    }
    let mut missing = String::new();
    for (name, value) in [
        ("Credential", credential),
        ("Signature", signature),
        ("SignedHeaders", signed_headers),
    ] {
        if value.is_none_or(str::is_empty) {
            missing.push_str(&format!(
                "Authorization header requires '{name}' parameter. "
            ));
        }
    }
    let (amz_date, time) = match header_value(headers, "x-amz-date") {
        Some(value) => (value.trim().to_owned(), parse_amz_date(value.trim())?),
        None => match header_value(headers, "date") {
            Some(value) => {
                let time = DateTime::parse_from_rfc2822(value.trim())
                    .map_err(|_| {
                        AuthError::IncompleteSignature(format!(
                            "Date header '{}' is not a valid RFC 1123 date.",
                            truncate(value)
                        ))
                    })?
                    .with_timezone(&Utc);
                (time.format(AMZ_DATE_FORMAT).to_string(), time)
            }
            None => {
                missing.push_str(
                    "Authorization header requires existence of either a 'X-Amz-Date' or a \
                     'Date' header.",
                );
                (String::new(), DateTime::<Utc>::MIN_UTC)
            }
        },
    };
    if !missing.is_empty() {
        return Err(AuthError::IncompleteSignature(
            missing.trim_end().to_owned(),
        ));
    }
    build_auth(
        credential.unwrap_or_default(),
        signed_headers.unwrap_or_default(),
        signature.unwrap_or_default(),
        amz_date,
        time,
        None,
    )
}

fn from_query(query: &[(String, String)]) -> Result<Auth, AuthError> {
    let get = |name: &str| {
        query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let algorithm = get("X-Amz-Algorithm").unwrap_or_default();
    if algorithm != ALGORITHM {
        return Err(AuthError::IncompleteSignature(format!(
            "X-Amz-Algorithm only supports '{ALGORITHM}', not '{}'.",
            truncate(algorithm)
        )));
    }
    let mut missing = Vec::new();
    let mut required = |name: &'static str| match get(name) {
        Some(value) if !value.is_empty() => value,
        _ => {
            missing.push(name);
            ""
        }
    };
    let credential = required("X-Amz-Credential");
    let signed_headers = required("X-Amz-SignedHeaders");
    let signature = required("X-Amz-Signature");
    let amz_date = required("X-Amz-Date");
    if !missing.is_empty() {
        return Err(AuthError::IncompleteSignature(format!(
            "AWS query-string parameters must include {}. Re-examine the query-string parameters.",
            missing
                .iter()
                .map(|m| format!("'{m}'"))
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let expires = match get("X-Amz-Expires") {
        None => None,
        Some(raw) => match raw.parse::<u64>() {
            Ok(secs) if (1..=MAX_PRESIGN_EXPIRES).contains(&secs) => Some(secs),
            _ => {
                return Err(AuthError::IncompleteSignature(format!(
                    "X-Amz-Expires must be a whole number of seconds from 1 to \
                     {MAX_PRESIGN_EXPIRES}, not '{}'.",
                    truncate(raw)
                )));
            }
        },
    };
    let time = parse_amz_date(amz_date)?;
    build_auth(
        credential,
        signed_headers,
        signature,
        amz_date.to_owned(),
        time,
        Some(expires),
    )
}

fn build_auth(
    credential: &str,
    signed_headers: &str,
    signature: &str,
    amz_date: String,
    time: DateTime<Utc>,
    presigned: Option<Option<u64>>,
) -> Result<Auth, AuthError> {
    let fields: Vec<&str> = credential.split('/').collect();
    let [access_key_id, scope_date, region, service, terminator] = fields[..] else {
        return Err(AuthError::IncompleteSignature(format!(
            "Credential '{}' must have 5 slash-separated parts: \
             access-key-id/YYYYMMDD/region/service/aws4_request.",
            truncate(credential)
        )));
    };
    let mut names: Vec<String> = signed_headers
        .split(';')
        .map(|h| h.trim().to_ascii_lowercase())
        .filter(|h| !h.is_empty())
        .collect();
    names.sort_unstable();
    names.dedup();
    Ok(Auth {
        access_key_id: access_key_id.to_owned(),
        scope_date: scope_date.to_owned(),
        region: region.to_owned(),
        service: service.to_owned(),
        terminator: terminator.to_owned(),
        signed_headers: names,
        signature: signature.to_owned(),
        amz_date,
        time,
        presigned,
    })
}

fn parse_amz_date(value: &str) -> Result<DateTime<Utc>, AuthError> {
    NaiveDateTime::parse_from_str(value, AMZ_DATE_FORMAT)
        .ok()
        .filter(|_| value.len() == 16)
        .map(|t| t.and_utc())
        .ok_or_else(|| {
            AuthError::IncompleteSignature(format!(
                "Date must be in ISO-8601 'basic format' (YYYYMMDD'T'HHMMSS'Z'). Got '{}'.",
                truncate(value)
            ))
        })
}

fn check_scope(auth: &Auth, cfg: &VerifyConfig<'_>) -> Result<(), AuthError> {
    let mut problems = Vec::new();
    if auth.region != cfg.region {
        problems.push(format!(
            "Credential should be scoped to a valid region, not '{}'. This endpoint serves \
             region '{}'.",
            truncate(&auth.region),
            cfg.region
        ));
    }
    if auth.service != cfg.service {
        problems.push(format!(
            "Credential should be scoped to correct service: '{}'.",
            cfg.service
        ));
    }
    if auth.terminator != TERMINATOR {
        problems.push(format!(
            "Credential should be scoped with a valid terminator: '{TERMINATOR}', not '{}'.",
            truncate(&auth.terminator)
        ));
    }
    let request_date = auth.amz_date.get(..8).unwrap_or_default();
    if auth.scope_date != request_date {
        problems.push(format!(
            "Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date from \
             HTTP: '{}' != '{request_date}', from '{}'.",
            truncate(&auth.scope_date),
            auth.amz_date
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(AuthError::mismatch(problems.join(" ")))
    }
}

fn check_time(auth: &Auth, cfg: &VerifyConfig<'_>) -> Result<(), AuthError> {
    // A skew too large for `TimeDelta` means "any time is fine".
    let skew = TimeDelta::from_std(cfg.max_skew).unwrap_or(TimeDelta::MAX);
    let earliest = auth.time.checked_sub_signed(skew);
    let too_early = earliest.is_some_and(|earliest| cfg.now < earliest);
    let latest = match auth.presigned {
        // A presigned URL is good until its own expiry, which may be shorter or longer than the
        // skew allowed for signed headers.
        Some(Some(expires)) => auth
            .time
            .checked_add_signed(TimeDelta::seconds(expires as i64)),
        _ => auth.time.checked_add_signed(skew),
    };
    let too_late = latest.is_some_and(|latest| cfg.now > latest);
    if too_early || too_late {
        let now = cfg.now.format(AMZ_DATE_FORMAT);
        let detail = if too_early {
            format!(
                "Signature not yet current: {} is still later than {now} (the server's time) \
                 plus {} seconds.",
                auth.amz_date,
                cfg.max_skew.as_secs()
            )
        } else if let Some(Some(expires)) = auth.presigned {
            format!(
                "Signature expired: {} plus X-Amz-Expires={expires} is now earlier than {now} \
                 (the server's time).",
                auth.amz_date
            )
        } else {
            format!(
                "Signature expired: {} is now earlier than {now} (the server's time) minus {} \
                 seconds.",
                auth.amz_date,
                cfg.max_skew.as_secs()
            )
        };
        return Err(AuthError::RequestExpired(format!(
            "Request has expired. {detail}"
        )));
    }
    Ok(())
}

/// The payload hash to sign: the body's SHA-256, unless `x-amz-content-sha256` says otherwise.
fn payload_hash_for<'p>(
    parts: &'p RequestParts<'_>,
    auth: &Auth,
) -> Result<std::borrow::Cow<'p, str>, AuthError> {
    let declared = header_value(parts.headers, "x-amz-content-sha256").map(str::trim);
    let body_empty = parts.body.is_empty();
    match declared {
        // An unsigned payload leaves the body open to tampering, so it is only accepted where
        // there is nothing to tamper with: a presigned request without a body.
        Some(UNSIGNED_PAYLOAD) if auth.presigned.is_some() && body_empty => {
            Ok(UNSIGNED_PAYLOAD.into())
        }
        Some(UNSIGNED_PAYLOAD) => Err(AuthError::mismatch(
            "UNSIGNED-PAYLOAD is only accepted for presigned requests without a body.",
        )),
        Some(declared) => {
            // Signing a declared hash without checking it would let the body change freely.
            let actual = hex_sha256(parts.body);
            if declared.eq_ignore_ascii_case(&actual) {
                Ok(declared.to_owned().into())
            } else {
                Err(AuthError::mismatch(
                    "The provided 'x-amz-content-sha256' header does not match what was computed.",
                ))
            }
        }
        None => Ok(hex_sha256(parts.body).into()),
    }
}

/// Keeps client-supplied text in error messages short.
fn truncate(s: &str) -> &str {
    match s.char_indices().nth(64) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_path_normalizes_and_encodes() {
        for (raw, want) in [
            ("", "/"),
            ("/", "/"),
            ("//", "/"),
            ("/./", "/"),
            ("/example/..", "/"),
            ("/example1/example2/../..", "/"),
            ("/../..", "/"),
            ("/./example", "/example"),
            ("//example//", "/example/"),
            ("/a/b/../c/", "/a/c/"),
            ("/example space/", "/example%20space/"),
            ("/ሴ", "/%E1%88%B4"),
            // Already-encoded input is encoded again (non-S3 services double-encode).
            ("/a%20b", "/a%2520b"),
            ("/-._~AZaz09", "/-._~AZaz09"),
            ("/a+b=c", "/a%2Bb%3Dc"),
        ] {
            assert_eq!(canonical_path(raw), want, "{raw:?}");
        }
    }

    #[test]
    fn canonical_query_sorts_and_reencodes() {
        for (raw, want) in [
            ("", ""),
            ("&&", ""),
            ("b=2&a=1", "a=1&b=2"),
            ("a=2&a=1&A=3", "A=3&a=1&a=2"),
            ("key", "key="),
            ("key=", "key="),
            ("k=a%20b", "k=a%20b"),
            ("k=a+b", "k=a%20b"),
            ("k=a%2Bb", "k=a%2Bb"),
            ("k=%2f%7e", "k=%2F~"),
            ("k=a=b", "k=a%3Db"),
            ("ሴ=bar", "%E1%88%B4=bar"),
            ("k=%zz", "k=%25zz"),
            ("k=%", "k=%25"),
            (
                "Action=DescribeInstances&Filter.1.Name=tag%3AName",
                "Action=DescribeInstances&Filter.1.Name=tag%3AName",
            ),
        ] {
            assert_eq!(canonical_query(raw, false), want, "{raw:?}");
        }
        assert_eq!(canonical_query("a=1&X-Amz-Signature=abc", true), "a=1");
        assert_eq!(
            canonical_query("a=1&X-Amz-Signature=abc", false),
            "X-Amz-Signature=abc&a=1"
        );
    }

    #[test]
    fn header_values_are_trimmed_and_joined() {
        let headers = vec![
            ("host".to_owned(), "h".to_owned()),
            ("My-Header".to_owned(), "  a   b\t c  ".to_owned()),
            ("my-header".to_owned(), "d".to_owned()),
        ];
        let creq = canonical_request("GET", "/", "", &headers, &["host", "my-header"], "x");
        assert_eq!(
            creq,
            "GET\n/\n\nhost:h\nmy-header:a b c,d\n\nhost;my-header\nx"
        );
    }

    #[test]
    fn signing_key_matches_aws_documentation_example() {
        // The derived-key example from AWS's SigV4 documentation (iam, us-east-1, 20150830).
        let key = signing_key(
            b"wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
            "20150830",
            "us-east-1",
            "iam",
        );
        assert_eq!(
            hex::encode(key),
            "c4afb1cc5771d871763a393e44b703571b55cc28424d1a5e86da6ed3c154a4b9"
        );
    }

    #[test]
    fn truncate_respects_char_boundaries() {
        let long = "ሴ".repeat(100);
        assert_eq!(truncate(&long).chars().count(), 64);
        assert_eq!(truncate("short"), "short");
    }

    #[test]
    fn amz_date_parsing_is_strict() {
        assert!(parse_amz_date("20150830T123600Z").is_ok());
        for bad in [
            "",
            "20150830T123600",
            "2015-08-30T12:36:00Z",
            "20150830T123600Z ",
            "20151330T123600Z",
            "2015083T1236000Z",
            "ሴሴሴሴሴሴ",
        ] {
            assert!(parse_amz_date(bad).is_err(), "{bad:?}");
        }
    }
}
