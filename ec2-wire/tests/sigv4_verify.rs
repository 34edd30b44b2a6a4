//! `verify` against requests made by `sign`/`presign` and then tampered with, and against garbage:
//! every failure must carry the EC2 code and status, and no input may panic.

use std::time::Duration;

use canopy_ec2_wire::sigv4::{
    self, AuthError, RequestParts, VerifyConfig, canonical_request, hex_sha256, signing_key,
    string_to_sign,
};
use chrono::{DateTime, TimeDelta, TimeZone, Utc};

const AKID: &str = "AKIDCANOPYTEST";
const SECRET: &str = "canopy/secret+key/0123456789";
const REGION: &str = "canopy-1";
const HOST: &str = "ec2.canopy.test:8773";
const FORM: &str = "application/x-www-form-urlencoded; charset=utf-8";
const SKEW: Duration = Duration::from_secs(15 * 60);

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap()
}

fn cfg(now: DateTime<Utc>) -> VerifyConfig<'static> {
    VerifyConfig {
        region: REGION,
        service: "ec2",
        now,
        max_skew: SKEW,
    }
}

fn secrets(akid: &str) -> Option<String> {
    (akid == AKID).then(|| SECRET.to_owned())
}

/// A request as a server receives it.
#[derive(Clone, Debug)]
struct Req {
    method: String,
    path: String,
    query: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Req {
    /// A botocore-style signed POST.
    fn post(body: &str) -> Req {
        Req::signed("POST", "", body, &[("content-type", FORM)], t0())
    }

    /// A header-signed GET with the parameters in the query string.
    fn get(query: &str) -> Req {
        Req::signed("GET", query, "", &[], t0())
    }

    fn signed(
        method: &str,
        query: &str,
        body: &str,
        extra: &[(&str, &str)],
        at: DateTime<Utc>,
    ) -> Req {
        let extra: Vec<(String, String)> = extra
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect();
        let added = sigv4::sign(
            method,
            HOST,
            "/",
            query,
            &extra,
            body.as_bytes(),
            AKID,
            SECRET,
            REGION,
            "ec2",
            at,
        );
        let mut headers = vec![("host".to_owned(), HOST.to_owned())];
        headers.extend(extra);
        headers.push(("user-agent".to_owned(), "test/1.0".to_owned()));
        headers.extend(added);
        Req {
            method: method.to_owned(),
            path: "/".to_owned(),
            query: query.to_owned(),
            headers,
            body: body.as_bytes().to_vec(),
        }
    }

    /// A presigned GET, valid for `expires`.
    fn presigned(query: &str, expires: Duration) -> Req {
        let query = sigv4::presign(
            "GET",
            HOST,
            "/",
            query,
            AKID,
            SECRET,
            REGION,
            "ec2",
            t0(),
            expires,
        );
        Req {
            method: "GET".to_owned(),
            path: "/".to_owned(),
            query,
            headers: vec![("host".to_owned(), HOST.to_owned())],
            body: Vec::new(),
        }
    }

    fn parts(&self) -> RequestParts<'_> {
        RequestParts {
            method: &self.method,
            path: &self.path,
            query: &self.query,
            headers: &self.headers,
            body: &self.body,
        }
    }

    fn verify_at(&self, now: DateTime<Utc>) -> Result<String, AuthError> {
        sigv4::verify(&self.parts(), &cfg(now), secrets)
    }

    fn verify(&self) -> Result<String, AuthError> {
        self.verify_at(t0())
    }

    fn header(&self, name: &str) -> &str {
        &self.headers.iter().find(|(n, _)| n == name).unwrap().1
    }

    fn set_header(&mut self, name: &str, value: &str) {
        self.headers.retain(|(n, _)| n != name);
        self.headers.push((name.to_owned(), value.to_owned()));
    }

    fn remove_header(&mut self, name: &str) {
        self.headers.retain(|(n, _)| n != name);
    }

    fn map_authorization(&mut self, f: impl FnOnce(&str) -> String) {
        let new = f(self.header("authorization"));
        self.set_header("authorization", &new);
    }
}

const BODY: &str = "Action=DescribeInstances&Version=2016-11-15&InstanceId.1=i-1&Filter.1.Name=tag%3AName&Filter.1.Value.1=web+server";

fn assert_code(result: Result<String, AuthError>, code: &str, status: u16) -> AuthError {
    let err = result.expect_err("expected an error");
    assert_eq!(err.code(), code, "{err:?}");
    assert_eq!(err.http_status(), status, "{err:?}");
    err
}

fn assert_mismatch(result: Result<String, AuthError>) -> AuthError {
    assert_code(result, "SignatureDoesNotMatch", 403)
}

#[test]
fn round_trip_post() {
    let req = Req::post(BODY);
    assert!(
        req.header("authorization").contains(
            "/20260102/canopy-1/ec2/aws4_request, SignedHeaders=content-type;host;x-amz-date, "
        ),
        "{}",
        req.header("authorization")
    );
    assert_eq!(req.header("x-amz-date"), "20260102T030405Z");
    assert_eq!(req.verify(), Ok(AKID.to_owned()));
}

#[test]
fn round_trip_get_with_encoded_query() {
    let req = Req::get(
        "Action=DescribeInstances&Filter.1.Value.1=a%20b%2Fc~&Filter.1.Name=tag%3AName&Empty=",
    );
    assert_eq!(req.verify(), Ok(AKID.to_owned()));
}

#[test]
fn round_trip_empty_body_and_unusual_headers() {
    let req = Req::signed(
        "POST",
        "",
        "",
        &[
            ("content-type", FORM),
            ("x-amz-security-token", "token/with+chars=="),
            ("X-Custom", "  spaced   value  "),
            // Proxies may rewrite these, so `sign` leaves them out and tampering with them is fine.
            ("user-agent", "ignored"),
            ("expect", "100-continue"),
        ],
        t0(),
    );
    assert!(
        req.header("authorization")
            .contains("SignedHeaders=content-type;host;x-amz-date;x-amz-security-token;x-custom,")
    );
    assert_eq!(req.verify(), Ok(AKID.to_owned()));
}

#[test]
fn tampered_body_fails() {
    let mut req = Req::post(BODY);
    req.body = BODY.replace("i-1", "i-2").into_bytes();
    let err = assert_mismatch(req.verify());
    assert!(
        err.to_string()
            .starts_with("The request signature we calculated does not match")
    );
    // The server gets the canonical request for its log.
    let AuthError::SignatureDoesNotMatch {
        canonical_request: Some(creq),
        ..
    } = err
    else {
        panic!("no canonical request");
    };
    assert!(creq.starts_with("POST\n/\n\ncontent-type:"), "{creq}");
    assert!(creq.ends_with(&hex_sha256(&req.body)));
}

#[test]
fn tampered_signed_header_fails_unsigned_header_does_not() {
    let mut req = Req::post(BODY);
    req.set_header("user-agent", "something else");
    req.headers
        .push(("x-not-signed".to_owned(), "anything".to_owned()));
    assert_eq!(req.verify(), Ok(AKID.to_owned()));

    let mut req = Req::post(BODY);
    req.set_header("content-type", "text/plain");
    assert_mismatch(req.verify());

    let mut req = Req::post(BODY);
    req.set_header("host", "evil.example:8773");
    assert_mismatch(req.verify());

    // A second value for a signed header changes its canonical form.
    let mut req = Req::post(BODY);
    req.headers
        .push(("content-type".to_owned(), "text/plain".to_owned()));
    assert_mismatch(req.verify());
}

#[test]
fn header_whitespace_and_name_case_do_not_matter() {
    let mut req = Req::post(BODY);
    req.set_header(
        "content-type",
        "  application/x-www-form-urlencoded;   charset=utf-8 ",
    );
    let host = req.header("host").to_owned();
    req.remove_header("host");
    req.headers.push(("Host".to_owned(), host));
    assert_eq!(req.verify(), Ok(AKID.to_owned()));
}

#[test]
fn tampered_query_method_or_path_fails() {
    let base = Req::get("Action=DescribeInstances&InstanceId.1=i-1");
    let mut req = base.clone();
    req.query = "Action=DescribeInstances&InstanceId.1=i-2".to_owned();
    assert_mismatch(req.verify());

    let mut req = base.clone();
    req.query.push_str("&InstanceId.2=i-2");
    assert_mismatch(req.verify());

    let mut req = base.clone();
    req.method = "POST".to_owned();
    assert_mismatch(req.verify());

    let mut req = base.clone();
    req.path = "/other".to_owned();
    assert_mismatch(req.verify());

    // Reordering or re-encoding the query keeps its canonical form, so it still verifies.
    let mut req = base.clone();
    req.query = "InstanceId.1=i%2D1&Action=DescribeInstances".to_owned();
    assert_eq!(req.verify(), Ok(AKID.to_owned()));
}

#[test]
fn wrong_secret_fails() {
    let req = Req::post(BODY);
    let err = sigv4::verify(&req.parts(), &cfg(t0()), |_| Some("wrong".to_owned()));
    assert_mismatch(err);
}

#[test]
fn tampered_signature_fails() {
    let mut req = Req::post(BODY);
    req.map_authorization(|a| {
        let (head, sig) = a.rsplit_once('=').unwrap();
        let flipped = if sig.starts_with('0') { "1" } else { "0" };
        format!("{head}={flipped}{}", &sig[1..])
    });
    assert_mismatch(req.verify());

    for sig in ["", "00", "zz", &"a".repeat(64), &"A".repeat(200)] {
        let mut req = Req::post(BODY);
        req.map_authorization(|a| format!("{}={sig}", a.rsplit_once('=').unwrap().0));
        let err = req.verify().unwrap_err();
        assert!(
            matches!(err.code(), "SignatureDoesNotMatch" | "IncompleteSignature"),
            "{sig}: {err:?}"
        );
    }
}

#[test]
fn skew_is_enforced_both_ways() {
    let req = Req::post(BODY);
    let skew = TimeDelta::from_std(SKEW).unwrap();
    assert_eq!(req.verify_at(t0() + skew), Ok(AKID.to_owned()));
    assert_eq!(req.verify_at(t0() - skew), Ok(AKID.to_owned()));

    let err = assert_code(
        req.verify_at(t0() + skew + TimeDelta::seconds(1)),
        "RequestExpired",
        400,
    );
    assert!(err.to_string().starts_with("Request has expired."), "{err}");
    assert!(err.to_string().contains("20260102T030405Z"), "{err}");

    // A client whose clock runs ahead is refused too.
    let err = assert_code(
        req.verify_at(t0() - skew - TimeDelta::seconds(1)),
        "RequestExpired",
        400,
    );
    assert!(err.to_string().contains("not yet current"), "{err}");
}

#[test]
fn expired_request_does_not_consult_the_secret_store() {
    let req = Req::post(BODY);
    let result = sigv4::verify(&req.parts(), &cfg(t0() + TimeDelta::hours(1)), |_| {
        panic!("secret looked up for an expired request")
    });
    assert_code(result, "RequestExpired", 400);
}

#[test]
fn wrong_region_names_both_regions() {
    let req = Req::post(BODY);
    let config = VerifyConfig {
        region: "other-region",
        ..cfg(t0())
    };
    let err = assert_mismatch(sigv4::verify(&req.parts(), &config, secrets));
    let msg = err.to_string();
    assert!(
        msg.contains("Credential should be scoped to a valid region, not 'canopy-1'"),
        "{msg}"
    );
    assert!(msg.contains("'other-region'"), "{msg}");
}

#[test]
fn wrong_service_fails() {
    let req = Req::signed("POST", "", BODY, &[("content-type", FORM)], t0());
    let config = VerifyConfig {
        service: "iam",
        ..cfg(t0())
    };
    let err = assert_mismatch(sigv4::verify(&req.parts(), &config, secrets));
    assert!(
        err.to_string()
            .contains("Credential should be scoped to correct service: 'iam'"),
        "{err}"
    );
}

#[test]
fn scope_date_and_terminator_must_match() {
    let mut req = Req::post(BODY);
    req.map_authorization(|a| a.replace("/20260102/", "/20260103/"));
    let err = assert_mismatch(req.verify());
    assert!(
        err.to_string().contains(
            "Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date from HTTP: '20260103' != '20260102'"
        ),
        "{err}"
    );

    let mut req = Req::post(BODY);
    req.map_authorization(|a| a.replace("/aws4_request", "/aws5_request"));
    let err = assert_mismatch(req.verify());
    assert!(err.to_string().contains("valid terminator"), "{err}");
}

#[test]
fn unknown_key_is_auth_failure() {
    let req = Req::post(BODY);
    let mut asked = String::new();
    let err = assert_code(
        sigv4::verify(&req.parts(), &cfg(t0()), |akid| {
            asked = akid.to_owned();
            None
        }),
        "AuthFailure",
        401,
    );
    assert_eq!(asked, AKID);
    assert_eq!(
        err.to_string(),
        "AWS was not able to validate the provided access credentials"
    );
}

#[test]
fn no_auth_at_all_is_missing_token() {
    let req = Req {
        method: "POST".to_owned(),
        path: "/".to_owned(),
        query: String::new(),
        headers: vec![
            ("host".to_owned(), HOST.to_owned()),
            ("content-type".to_owned(), FORM.to_owned()),
        ],
        body: BODY.as_bytes().to_vec(),
    };
    let err = assert_code(req.verify(), "MissingAuthenticationToken", 403);
    assert_eq!(err, AuthError::MissingAuthenticationToken);
    assert_eq!(err.to_string(), "Request is missing Authentication Token");

    // Ordinary query parameters are not an attempt at authentication.
    let mut get = req.clone();
    get.query = "Action=DescribeRegions&Version=2016-11-15".to_owned();
    assert_code(get.verify(), "MissingAuthenticationToken", 403);
}

#[test]
fn malformed_authorization_headers_are_incomplete_signature() {
    let good = Req::post(BODY);
    let auth = good.header("authorization").to_owned();
    let (head, signature) = auth.rsplit_once("Signature=").unwrap();
    let cases: Vec<(String, &str)> = vec![
        (String::new(), "Unsupported Authorization type"),
        ("AWS4-HMAC-SHA256".to_owned(), "requires 'Credential'"),
        ("AWS4-HMAC-SHA256 ".to_owned(), "requires 'Signature'"),
        (
            format!("AWS AKIDCANOPYTEST:{signature}"),
            "Unsupported Authorization type 'AWS'",
        ),
        (
            auth.replace("AWS4-HMAC-SHA256", "AWS4-HMAC-SHA512"),
            "Unsupported",
        ),
        (
            head.trim_end_matches([',', ' ']).to_owned(),
            "requires 'Signature' parameter",
        ),
        (
            auth.replace("SignedHeaders=content-type;host;x-amz-date, ", ""),
            "requires 'SignedHeaders'",
        ),
        (
            auth.replace("Credential=", "Credential"),
            "not a valid key=value pair",
        ),
        (
            auth.replace("Credential=AKIDCANOPYTEST/", "Credential="),
            "5 slash-separated parts",
        ),
        (
            auth.replace("/aws4_request", "/aws4_request/extra"),
            "5 slash-separated parts",
        ),
        (
            auth.replace("Credential=", "Credential=a/b/"),
            "5 slash-separated parts",
        ),
        (
            auth.replace(
                "SignedHeaders=content-type;host;x-amz-date",
                "SignedHeaders= ",
            ),
            "requires 'SignedHeaders'",
        ),
    ];
    for (value, expected) in cases {
        let mut req = good.clone();
        req.set_header("authorization", &value);
        let err = assert_code(req.verify(), "IncompleteSignature", 400);
        assert!(err.to_string().contains(expected), "{value:?}: {err}");
    }
}

#[test]
fn host_must_be_signed_and_signed_headers_present() {
    let mut req = Req::post(BODY);
    req.map_authorization(|a| a.replace("content-type;host;x-amz-date", "content-type;x-amz-date"));
    let err = assert_code(req.verify(), "IncompleteSignature", 400);
    assert!(
        err.to_string().contains("'Host' must be a 'SignedHeader'"),
        "{err}"
    );

    let mut req = Req::post(BODY);
    req.remove_header("content-type");
    let err = assert_code(req.verify(), "IncompleteSignature", 400);
    assert_eq!(
        err.to_string(),
        "'content-type' is named as a SignedHeader, but it does not exist in the HTTP request."
    );
}

#[test]
fn signed_headers_list_is_normalized() {
    // Upper case, unsorted or repeated names describe the same set of headers.
    let mut req = Req::post(BODY);
    req.map_authorization(|a| {
        a.replace(
            "content-type;host;x-amz-date",
            "X-Amz-Date;Host;content-type;host",
        )
    });
    assert_eq!(req.verify(), Ok(AKID.to_owned()));
}

#[test]
fn date_is_required_and_must_parse() {
    let mut req = Req::post(BODY);
    req.remove_header("x-amz-date");
    req.map_authorization(|a| a.replace(";x-amz-date", ""));
    let err = assert_code(req.verify(), "IncompleteSignature", 400);
    assert!(
        err.to_string()
            .contains("either a 'X-Amz-Date' or a 'Date' header"),
        "{err}"
    );

    for bad in [
        "2026-01-02T03:04:05Z",
        "20260102T030405",
        "",
        "ሴ",
        "20261302T030405Z",
    ] {
        let mut req = Req::post(BODY);
        req.set_header("x-amz-date", bad);
        let err = assert_code(req.verify(), "IncompleteSignature", 400);
        assert!(
            err.to_string().contains("ISO-8601 'basic format'"),
            "{bad}: {err}"
        );
    }

    let mut req = Req::post(BODY);
    req.remove_header("x-amz-date");
    req.set_header("date", "not a date");
    assert_code(req.verify(), "IncompleteSignature", 400);
}

#[test]
fn date_header_may_replace_x_amz_date() {
    // Some older signers send `Date` (RFC 1123) instead of `X-Amz-Date`; the string to sign then
    // carries its ISO 8601 basic form.
    let date = "Fri, 02 Jan 2026 03:04:05 GMT";
    let headers = vec![
        ("host".to_owned(), HOST.to_owned()),
        ("date".to_owned(), date.to_owned()),
    ];
    let creq = canonical_request(
        "GET",
        "/",
        "Action=DescribeRegions",
        &headers,
        &["date", "host"],
        &hex_sha256(b""),
    );
    let scope = "20260102/canopy-1/ec2/aws4_request";
    let sts = string_to_sign("20260102T030405Z", scope, &creq);
    let key = signing_key(SECRET.as_bytes(), "20260102", REGION, "ec2");
    let signature = hmac_hex(&key, &sts);
    let mut req = Req {
        method: "GET".to_owned(),
        path: "/".to_owned(),
        query: "Action=DescribeRegions".to_owned(),
        headers,
        body: Vec::new(),
    };
    req.headers.push((
        "authorization".to_owned(),
        format!("AWS4-HMAC-SHA256 Credential={AKID}/{scope}, SignedHeaders=date;host, Signature={signature}"),
    ));
    assert_eq!(req.verify(), Ok(AKID.to_owned()));
    assert_code(
        req.verify_at(t0() + TimeDelta::minutes(20)),
        "RequestExpired",
        400,
    );
}

/// HMAC-SHA256 through the crate's own `sign`-independent pieces: the signature is the HMAC of the
/// string to sign under the signing key.
fn hmac_hex(key: &[u8; 32], sts: &str) -> String {
    use hmac::{Hmac, KeyInit, Mac};
    let mut mac = <Hmac<sha2::Sha256> as KeyInit>::new_from_slice(key).unwrap();
    mac.update(sts.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

#[test]
fn declared_payload_hash_must_be_true() {
    let hash = hex_sha256(BODY.as_bytes());
    let req = Req::signed(
        "POST",
        "",
        BODY,
        &[("content-type", FORM), ("x-amz-content-sha256", &hash)],
        t0(),
    );
    assert_eq!(req.verify(), Ok(AKID.to_owned()));

    // Claiming the hash of another body, even with a signature over that claim, is refused.
    let other = hex_sha256(b"Action=TerminateInstances");
    let mut req = Req::signed(
        "POST",
        "",
        "Action=TerminateInstances",
        &[("content-type", FORM), ("x-amz-content-sha256", &other)],
        t0(),
    );
    req.body = BODY.as_bytes().to_vec();
    let err = assert_mismatch(req.verify());
    assert!(err.to_string().contains("x-amz-content-sha256"), "{err}");

    // UNSIGNED-PAYLOAD is for presigned requests only.
    let req = Req::signed(
        "POST",
        "",
        BODY,
        &[
            ("content-type", FORM),
            ("x-amz-content-sha256", "UNSIGNED-PAYLOAD"),
        ],
        t0(),
    );
    let err = assert_mismatch(req.verify());
    assert!(err.to_string().contains("UNSIGNED-PAYLOAD"), "{err}");
}

#[test]
fn multiple_authorization_headers_are_refused() {
    let mut req = Req::post(BODY);
    let auth = req.header("authorization").to_owned();
    req.headers.push(("authorization".to_owned(), auth));
    assert_code(req.verify(), "IncompleteSignature", 400);
}

const PRESIGN_QUERY: &str = "Action=DescribeRegions&Version=2016-11-15&RegionName.1=canopy-1";

#[test]
fn presigned_round_trip_and_expiry() {
    let req = Req::presigned(PRESIGN_QUERY, Duration::from_secs(300));
    assert!(req.query.starts_with(PRESIGN_QUERY), "{}", req.query);
    assert!(
        req.query.contains(
            "&X-Amz-Credential=AKIDCANOPYTEST%2F20260102%2Fcanopy-1%2Fec2%2Faws4_request&"
        )
    );
    assert_eq!(req.verify(), Ok(AKID.to_owned()));
    assert_eq!(
        req.verify_at(t0() + TimeDelta::seconds(300)),
        Ok(AKID.to_owned())
    );

    let err = assert_code(
        req.verify_at(t0() + TimeDelta::seconds(301)),
        "RequestExpired",
        400,
    );
    assert!(err.to_string().contains("X-Amz-Expires=300"), "{err}");
    // Signed in the future beyond the allowed skew.
    assert_code(
        req.verify_at(t0() - TimeDelta::minutes(16)),
        "RequestExpired",
        400,
    );

    // A long-lived URL outlives the header skew.
    let long = Req::presigned(PRESIGN_QUERY, Duration::from_secs(3600));
    assert_eq!(
        long.verify_at(t0() + TimeDelta::minutes(59)),
        Ok(AKID.to_owned())
    );
}

#[test]
fn presigned_tampering_fails() {
    let base = Req::presigned(PRESIGN_QUERY, Duration::from_secs(300));

    let mut req = base.clone();
    req.query = req
        .query
        .replace("RegionName.1=canopy-1", "RegionName.1=canopy-2");
    assert_mismatch(req.verify());

    let mut req = base.clone();
    req.query = req.query.replace("X-Amz-Expires=300", "X-Amz-Expires=3000");
    assert_mismatch(req.verify());

    let mut req = base.clone();
    req.query.push_str("&Extra=1");
    assert_mismatch(req.verify());

    let mut req = base.clone();
    req.set_header("host", "elsewhere:1");
    assert_mismatch(req.verify());

    // A body smuggled into a presigned request is covered by the empty-body hash, so it fails.
    let mut req = base.clone();
    req.method = "GET".to_owned();
    req.body = b"Action=TerminateInstances".to_vec();
    assert_mismatch(req.verify());

    // ...and cannot be waved through with UNSIGNED-PAYLOAD.
    req.set_header("x-amz-content-sha256", "UNSIGNED-PAYLOAD");
    assert_mismatch(req.verify());
}

#[test]
fn presigned_unsigned_payload_without_body_is_accepted() {
    // S3-style presigners sign UNSIGNED-PAYLOAD and send it as a header.
    let query = format!(
        "{PRESIGN_QUERY}&X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential={AKID}%2F20260102%2Fcanopy-1%2Fec2%2Faws4_request\
         &X-Amz-Date=20260102T030405Z&X-Amz-Expires=60&X-Amz-SignedHeaders=host"
    );
    let headers = vec![
        ("host".to_owned(), HOST.to_owned()),
        (
            "x-amz-content-sha256".to_owned(),
            "UNSIGNED-PAYLOAD".to_owned(),
        ),
    ];
    let creq = canonical_request("GET", "/", &query, &headers, &["host"], "UNSIGNED-PAYLOAD");
    let sts = string_to_sign(
        "20260102T030405Z",
        "20260102/canopy-1/ec2/aws4_request",
        &creq,
    );
    let key = signing_key(SECRET.as_bytes(), "20260102", REGION, "ec2");
    let req = Req {
        method: "GET".to_owned(),
        path: "/".to_owned(),
        query: format!("{query}&X-Amz-Signature={}", hmac_hex(&key, &sts)),
        headers,
        body: Vec::new(),
    };
    assert_eq!(req.verify(), Ok(AKID.to_owned()));
}

#[test]
fn presigned_malformed_parameters() {
    let base = Req::presigned(PRESIGN_QUERY, Duration::from_secs(300));
    let cases: Vec<(String, &str)> = vec![
        (
            base.query
                .replace("X-Amz-Algorithm=AWS4-HMAC-SHA256", "X-Amz-Algorithm=HMAC"),
            "only supports",
        ),
        (
            base.query.replace("X-Amz-Expires=300", "X-Amz-Expires=0"),
            "X-Amz-Expires",
        ),
        (
            base.query
                .replace("X-Amz-Expires=300", "X-Amz-Expires=604801"),
            "X-Amz-Expires",
        ),
        (
            base.query.replace("X-Amz-Expires=300", "X-Amz-Expires=-5"),
            "X-Amz-Expires",
        ),
        (
            base.query
                .replace("X-Amz-Date=20260102T030405Z", "X-Amz-Date=yesterday"),
            "basic format",
        ),
        (
            base.query.replace("&X-Amz-SignedHeaders=host", ""),
            "'X-Amz-SignedHeaders'",
        ),
        (
            base.query.replace("&X-Amz-Date=20260102T030405Z", ""),
            "'X-Amz-Date'",
        ),
        (
            base.query.replace("X-Amz-Algorithm=AWS4-HMAC-SHA256&", ""),
            "must include 'X-Amz-Algorithm'",
        ),
        (
            base.query
                .replace("X-Amz-SignedHeaders=host", "X-Amz-SignedHeaders=x-amz-date"),
            "'Host' must be",
        ),
        (
            format!("{PRESIGN_QUERY}&AWSAccessKeyId={AKID}&SignatureVersion=2&Signature=abc"),
            "Signature Version 2",
        ),
    ];
    for (query, expected) in cases {
        let mut req = base.clone();
        req.query = query;
        let err = assert_code(req.verify(), "IncompleteSignature", 400);
        assert!(err.to_string().contains(expected), "{}: {err}", req.query);
    }

    // Both mechanisms at once.
    let mut req = base.clone();
    let header_signed = Req::get(PRESIGN_QUERY);
    req.set_header("authorization", header_signed.header("authorization"));
    let err = assert_code(req.verify(), "IncompleteSignature", 400);
    assert!(err.to_string().contains("Only one auth mechanism"), "{err}");
}

/// A small deterministic generator, so that the garbage below is the same on every run.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn garbage(&mut self, pieces: &[&str]) -> String {
        let len = self.below(12);
        (0..len).map(|_| pieces[self.below(pieces.len())]).collect()
    }
}

#[test]
fn garbage_never_panics() {
    let pieces = [
        "AWS4-HMAC-SHA256",
        " ",
        ",",
        "=",
        "/",
        ";",
        "Credential",
        "SignedHeaders",
        "Signature",
        AKID,
        "20260102",
        "canopy-1",
        "ec2",
        "aws4_request",
        "host",
        "x-amz-date",
        "ሴ",
        "\u{0}",
        "\t",
        "%",
        "%E1",
        "+",
        "&",
        "?",
        "X-Amz-Algorithm",
        "X-Amz-Credential",
        "X-Amz-Date",
        "X-Amz-Expires",
        "X-Amz-Signature",
        "X-Amz-SignedHeaders",
        "20260102T030405Z",
        "..",
        "99999999999999999999",
        "-1",
        "\u{FFFF}",
        "é",
    ];
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    let good = Req::post(BODY);
    let good_presigned = Req::presigned(PRESIGN_QUERY, Duration::from_secs(60));
    for round in 0..5000 {
        let mut req = if round % 2 == 0 {
            good.clone()
        } else {
            good_presigned.clone()
        };
        match rng.below(6) {
            0 => req.set_header("authorization", &rng.garbage(&pieces)),
            1 => req.query = rng.garbage(&pieces),
            2 => req.set_header("x-amz-date", &rng.garbage(&pieces)),
            3 => req.path = rng.garbage(&pieces),
            4 => {
                // Mutate one character of the real signature material.
                let target = if req.headers.iter().any(|(n, _)| n == "authorization") {
                    req.header("authorization").to_owned()
                } else {
                    req.query.clone()
                };
                let chars: Vec<char> = target.chars().collect();
                let at = rng.below(chars.len());
                let replacement = pieces[rng.below(pieces.len())];
                let mutated: String = chars[..at].iter().collect::<String>()
                    + replacement
                    + &chars[at + 1..].iter().collect::<String>();
                if req.headers.iter().any(|(n, _)| n == "authorization") {
                    req.set_header("authorization", &mutated);
                } else {
                    req.query = mutated;
                }
            }
            _ => {
                req.headers.push((
                    rng.garbage(&pieces).to_ascii_lowercase(),
                    rng.garbage(&pieces),
                ));
                req.set_header("date", &rng.garbage(&pieces));
            }
        }
        let now = t0() + TimeDelta::seconds(rng.below(120) as i64 - 60);
        let config = VerifyConfig {
            max_skew: Duration::from_secs(rng.next() % 4000),
            ..cfg(now)
        };
        // Any answer but a panic is fine; a successful one must name the real key.
        if let Ok(akid) = sigv4::verify(&req.parts(), &config, secrets) {
            assert_eq!(akid, AKID);
        }
    }
}

#[test]
fn extreme_times_and_skews_do_not_panic() {
    let req = Req::post(BODY);
    for now in [
        DateTime::<Utc>::MIN_UTC,
        DateTime::<Utc>::MAX_UTC,
        DateTime::UNIX_EPOCH,
    ] {
        for skew in [
            Duration::ZERO,
            Duration::MAX,
            Duration::from_secs(u64::MAX / 2),
        ] {
            let config = VerifyConfig {
                max_skew: skew,
                ..cfg(now)
            };
            let _ = sigv4::verify(&req.parts(), &config, secrets);
        }
    }
    // An unbounded skew accepts any time.
    let config = VerifyConfig {
        max_skew: Duration::MAX,
        ..cfg(DateTime::<Utc>::MAX_UTC)
    };
    assert_eq!(
        sigv4::verify(&req.parts(), &config, secrets),
        Ok(AKID.to_owned())
    );
}
