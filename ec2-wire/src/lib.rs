//! The EC2 Query API wire format, without any HTTP types so that any server (or client) can use it:
//!
//! - [`sigv4`]: verifies and produces AWS Signature Version 4 (header-signed and presigned
//!   requests), with the error codes real EC2 answers;
//! - [`params`]: the decoded `Action=…&Name.N=…` parameters of a request, with the `Name.N` list and
//!   `Name.N.Member` structure conventions;
//! - [`xml`]: the response XML (`<XxxResponse xmlns=…>`, `<item>` lists, the error envelope).
//!
//! What the real clients send and expect is described in `docs/EC2-WIRE.md` of the shared notes;
//! this crate is the one place that knows it.

pub mod params;
pub mod sigv4;
pub mod xml;

/// The EC2 API version Canopy speaks; clients send it as `Version=2016-11-15`.
pub const API_VERSION: &str = "2016-11-15";

/// The XML namespace of EC2 responses for [`API_VERSION`].
pub const XMLNS: &str = "http://ec2.amazonaws.com/doc/2016-11-15/";
