//! AWS's published SigV4 test suite (data in `tests/sigv4-suite/`, see its README): for every
//! vector, the canonical request and string to sign must match the published ones, `verify` must
//! accept the request, and `sign` must reproduce the published `Authorization` header.

use std::path::{Path, PathBuf};
use std::time::Duration;

use canopy_ec2_wire::sigv4::{
    self, AuthError, RequestParts, VerifyConfig, canonical_request, hex_sha256, string_to_sign,
};
use chrono::{DateTime, TimeZone, Utc};

const ACCESS_KEY_ID: &str = "AKIDEXAMPLE";
const SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";
const REGION: &str = "us-east-1";
const SERVICE: &str = "service";

fn suite_time() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2015, 8, 30, 12, 36, 0).unwrap()
}

struct Vector {
    name: String,
    method: String,
    path: String,
    query: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    creq: Option<String>,
    sts: Option<String>,
    authz: String,
}

impl Vector {
    fn load(req_file: &Path) -> Vector {
        let read = |ext: &str| std::fs::read_to_string(req_file.with_extension(ext)).ok();
        let req = read("req").unwrap();
        let (head, body) = req.split_once("\n\n").unwrap_or((&req, ""));
        let mut lines = head.lines();
        let request_line = lines.next().unwrap();
        // The target may contain a space (get-space), so cut the known ends off instead of
        // splitting on spaces.
        let (method, rest) = request_line.split_once(' ').unwrap();
        let target = rest.strip_suffix(" HTTP/1.1").unwrap();
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        let headers = lines
            .map(|line| {
                let (name, value) = line.split_once(':').unwrap();
                (name.to_ascii_lowercase(), value.to_owned())
            })
            .collect();
        Vector {
            name: req_file.file_stem().unwrap().to_string_lossy().into_owned(),
            method: method.to_owned(),
            path: path.to_owned(),
            query: query.to_owned(),
            headers,
            body: body.as_bytes().to_vec(),
            creq: read("creq"),
            sts: read("sts"),
            authz: read("authz").unwrap().trim_end().to_owned(),
        }
    }

    fn signed_headers(&self) -> Vec<&str> {
        let start = self.authz.find("SignedHeaders=").unwrap() + "SignedHeaders=".len();
        let end = self.authz[start..].find(',').unwrap() + start;
        self.authz[start..end].split(';').collect()
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

    /// The request as received by a server: the suite's request plus the published signature.
    fn received_headers(&self) -> Vec<(String, String)> {
        let mut headers = self.headers.clone();
        headers.push(("authorization".to_owned(), self.authz.clone()));
        headers
    }
}

fn vectors() -> Vec<Vector> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "req") {
                out.push(path);
            }
        }
    }
    let mut files = Vec::new();
    walk(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sigv4-suite"),
        &mut files,
    );
    files.sort();
    let vectors: Vec<Vector> = files.iter().map(|f| Vector::load(f)).collect();
    // Guards against the data silently going missing.
    assert_eq!(vectors.len(), 30, "suite vectors");
    vectors
}

fn cfg() -> VerifyConfig<'static> {
    VerifyConfig {
        region: REGION,
        service: SERVICE,
        now: suite_time(),
        max_skew: Duration::from_secs(15 * 60),
    }
}

#[test]
fn canonical_requests_and_strings_to_sign_match() {
    let mut checked = 0;
    for v in vectors() {
        let Some(expected_creq) = &v.creq else {
            continue;
        };
        let creq = canonical_request(
            &v.method,
            &v.path,
            &v.query,
            &v.headers,
            &v.signed_headers(),
            &hex_sha256(&v.body),
        );
        assert_eq!(&creq, expected_creq, "canonical request of {}", v.name);
        let sts = string_to_sign(
            "20150830T123600Z",
            "20150830/us-east-1/service/aws4_request",
            &creq,
        );
        assert_eq!(Some(&sts), v.sts.as_ref(), "string to sign of {}", v.name);
        checked += 1;
    }
    assert_eq!(checked, 29);
}

#[test]
fn verify_accepts_every_vector() {
    for v in vectors() {
        let headers = v.received_headers();
        let parts = RequestParts {
            headers: &headers,
            ..v.parts()
        };
        let mut asked = None;
        let result = sigv4::verify(&parts, &cfg(), |akid| {
            asked = Some(akid.to_owned());
            Some(SECRET.to_owned())
        });
        assert_eq!(result, Ok(ACCESS_KEY_ID.to_owned()), "{}", v.name);
        assert_eq!(asked.as_deref(), Some(ACCESS_KEY_ID));
    }
}

#[test]
fn verify_rejects_every_vector_with_another_secret() {
    for v in vectors() {
        let headers = v.received_headers();
        let parts = RequestParts {
            headers: &headers,
            ..v.parts()
        };
        let err = sigv4::verify(&parts, &cfg(), |_| Some("not-the-secret".to_owned())).unwrap_err();
        match &err {
            AuthError::SignatureDoesNotMatch {
                canonical_request, ..
            } => {
                if let Some(expected) = &v.creq {
                    assert_eq!(canonical_request.as_ref(), Some(expected), "{}", v.name);
                }
            }
            other => panic!("{}: {other:?}", v.name),
        }
        assert_eq!(err.code(), "SignatureDoesNotMatch");
        assert_eq!(err.http_status(), 403);
    }
}

#[test]
fn sign_reproduces_every_vector() {
    for v in vectors() {
        let signed = v.signed_headers();
        let host = v
            .headers
            .iter()
            .find(|(n, _)| n == "host")
            .map(|(_, h)| h.clone())
            .unwrap();
        // What a client would pass: the headers it wants signed, minus the two `sign` supplies.
        let extra: Vec<(String, String)> = v
            .headers
            .iter()
            .filter(|(n, _)| n != "host" && n != "x-amz-date" && signed.contains(&n.as_str()))
            .cloned()
            .collect();
        let out = sigv4::sign(
            &v.method,
            &host,
            &v.path,
            &v.query,
            &extra,
            &v.body,
            ACCESS_KEY_ID,
            SECRET,
            REGION,
            SERVICE,
            suite_time(),
        );
        assert_eq!(
            out,
            vec![
                ("authorization".to_owned(), v.authz.clone()),
                ("x-amz-date".to_owned(), "20150830T123600Z".to_owned()),
            ],
            "{}",
            v.name
        );
    }
}
