//! Compatibility with the real client: requests signed by botocore (captured once by
//! `tests/fixtures/gen_botocore.py`, which these tests do not run) must verify, and `sign`/`presign`
//! must produce byte-identical signatures for the same input.

use std::time::Duration;

use canopy_ec2_wire::params::Params;
use canopy_ec2_wire::sigv4::{self, AuthError, RequestParts, VerifyConfig};
use chrono::{DateTime, TimeDelta, Utc};

/// One captured request with its signing context.
struct Fixture {
    now: DateTime<Utc>,
    access_key_id: String,
    secret: String,
    region: String,
    method: String,
    path: String,
    query: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Fixture {
    fn load(text: &str) -> Fixture {
        let mut f = Fixture {
            now: DateTime::UNIX_EPOCH,
            access_key_id: String::new(),
            secret: String::new(),
            region: String::new(),
            method: String::new(),
            path: String::new(),
            query: String::new(),
            headers: Vec::new(),
            body: Vec::new(),
        };
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (key, value) = line.split_once(' ').unwrap_or((line, ""));
            match key {
                "now" => f.now = value.parse().unwrap(),
                "access_key_id" => f.access_key_id = value.to_owned(),
                "secret" => f.secret = value.to_owned(),
                "region" => f.region = value.to_owned(),
                "method" => f.method = value.to_owned(),
                "path" => f.path = value.to_owned(),
                "query" => f.query = value.to_owned(),
                "header" => {
                    let (name, value) = value.split_once(": ").unwrap();
                    f.headers.push((name.to_owned(), value.to_owned()));
                }
                "body" => f.body = value.as_bytes().to_vec(),
                other => panic!("unknown fixture line {other}"),
            }
        }
        f
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
        let cfg = VerifyConfig {
            region: &self.region,
            service: "ec2",
            now,
            max_skew: Duration::from_secs(15 * 60),
        };
        sigv4::verify(&self.parts(), &cfg, |akid| {
            (akid == self.access_key_id).then(|| self.secret.clone())
        })
    }

    fn header(&self, name: &str) -> &str {
        &self.headers.iter().find(|(n, _)| n == name).unwrap().1
    }
}

fn describe_instances() -> Fixture {
    Fixture::load(include_str!("fixtures/botocore-describe-instances.txt"))
}

fn presigned() -> Fixture {
    Fixture::load(include_str!("fixtures/botocore-presigned.txt"))
}

#[test]
fn botocore_post_verifies() {
    let f = describe_instances();
    assert_eq!(f.verify_at(f.now), Ok(f.access_key_id.clone()));
    assert_eq!(
        f.verify_at(f.now + TimeDelta::minutes(16))
            .unwrap_err()
            .code(),
        "RequestExpired"
    );

    let mut tampered = describe_instances();
    tampered.body = String::from_utf8(tampered.body)
        .unwrap()
        .replace("running", "stopped")
        .into_bytes();
    assert_eq!(
        tampered.verify_at(tampered.now).unwrap_err().code(),
        "SignatureDoesNotMatch"
    );
}

#[test]
fn sign_matches_botocore() {
    let f = describe_instances();
    let out = sigv4::sign(
        &f.method,
        f.header("host"),
        &f.path,
        &f.query,
        &[(
            "content-type".to_owned(),
            f.header("content-type").to_owned(),
        )],
        &f.body,
        &f.access_key_id,
        &f.secret,
        &f.region,
        "ec2",
        f.now,
    );
    assert_eq!(
        out,
        vec![
            (
                "authorization".to_owned(),
                f.header("authorization").to_owned()
            ),
            ("x-amz-date".to_owned(), f.header("x-amz-date").to_owned()),
        ]
    );
}

#[test]
fn botocore_body_decodes_to_the_expected_params() {
    let f = describe_instances();
    let params = Params::parse(&f.body);
    assert_eq!(params.action(), Some("DescribeInstances"));
    assert_eq!(params.get("Version"), Some(canopy_ec2_wire::API_VERSION));
    assert_eq!(
        params.list("InstanceId").unwrap(),
        ["i-0123456789abcdef0", "i-0fedcba9876543210"]
    );
    let filters = params.structs("Filter").unwrap();
    assert_eq!(filters.len(), 2);
    assert_eq!(filters[0].get("Name"), Some("tag:Name"));
    assert_eq!(
        filters[0].list("Value").unwrap(),
        ["web server", "db & cache"]
    );
    assert_eq!(filters[1].get("Name"), Some("instance-state-name"));
    assert_eq!(filters[1].list("Value").unwrap(), ["running"]);
}

#[test]
fn botocore_presigned_verifies_until_it_expires() {
    let f = presigned();
    assert_eq!(f.verify_at(f.now), Ok(f.access_key_id.clone()));
    assert_eq!(
        f.verify_at(f.now + TimeDelta::seconds(300)),
        Ok(f.access_key_id.clone())
    );
    assert_eq!(
        f.verify_at(f.now + TimeDelta::seconds(301))
            .unwrap_err()
            .code(),
        "RequestExpired"
    );
    let params = Params::parse(f.query.as_bytes());
    assert_eq!(params.action(), Some("DescribeRegions"));
    assert_eq!(params.list("RegionName").unwrap(), ["canopy-1"]);
}

#[test]
fn presign_matches_botocore() {
    let f = presigned();
    let (operation, _) = f.query.split_once("&X-Amz-Algorithm").unwrap();
    let query = sigv4::presign(
        &f.method,
        f.header("host"),
        &f.path,
        operation,
        &f.access_key_id,
        &f.secret,
        &f.region,
        "ec2",
        f.now,
        Duration::from_secs(300),
    );
    assert_eq!(query, f.query);
}
