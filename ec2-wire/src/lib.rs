//! The EC2 Query API wire format, without any HTTP types so that any server (or client) can use it:
//!
//! - [`sigv4`]: verifies and produces AWS Signature Version 4 (header-signed and presigned
//!   requests), with the error codes real EC2 answers;
//! - [`params`]: the decoded `Action=…&Name.N=…` parameters of a request, with the `Name.N` list and
//!   `Name.N.Member` structure conventions;
//! - [`xml`]: the response XML (`<XxxResponse xmlns=…>`, `<item>` lists, the error envelope).
//!
//! The rest of Canopy should not need to know these details: this crate is the one place that
//! encodes what botocore, the AWS CLI and other EC2 clients send and expect.
//!
//! A server's path through it, for one request:
//!
//! ```
//! use canopy_ec2_wire::{params::Params, sigv4, xml};
//! # use chrono::TimeZone;
//! # let now = chrono::Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap();
//! # let body = b"Action=DescribeRegions&Version=2016-11-15";
//! # let mut headers = vec![("host".to_owned(), "127.0.0.1:8773".to_owned())];
//! # headers.extend(sigv4::sign("POST", "127.0.0.1:8773", "/", "", &[], body, "AKID", "secret",
//! #     "canopy-1", "ec2", now));
//! let parts = sigv4::RequestParts { method: "POST", path: "/", query: "", headers: &headers, body };
//! let cfg = sigv4::VerifyConfig {
//!     region: "canopy-1",
//!     service: "ec2",
//!     now,
//!     max_skew: std::time::Duration::from_secs(15 * 60),
//! };
//! let reply = match sigv4::verify(&parts, &cfg, |akid| (akid == "AKID").then(|| "secret".into())) {
//!     Err(e) => (e.http_status(), xml::error_response(e.code(), &e.to_string(), "req-1")),
//!     Ok(_access_key_id) => {
//!         let params = Params::parse(body);
//!         let mut w = xml::XmlWriter::response(params.action().unwrap_or_default(), "req-1");
//!         w.list("regionInfo", ["canopy-1"], |w, name| {
//!             w.elem("regionName", name);
//!         });
//!         (200, w.finish())
//!     }
//! };
//! assert_eq!(reply.0, 200);
//! assert!(reply.1.contains("<regionInfo><item><regionName>canopy-1</regionName></item></regionInfo>"));
//! ```

pub mod params;
pub mod sigv4;
pub mod xml;

/// The EC2 API version Canopy speaks; clients send it as `Version=2016-11-15`.
pub const API_VERSION: &str = "2016-11-15";

/// The XML namespace of EC2 responses for [`API_VERSION`].
pub const XMLNS: &str = "http://ec2.amazonaws.com/doc/2016-11-15/";
