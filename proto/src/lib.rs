//! Generated gRPC types and services for Canopy's tier-to-tier contracts.
//!
//! Only the edges (the `convert` modules of each controller) use these types; the domain
//! code works with the typed values of `canopy-common`.
#![allow(clippy::all, rust_2018_idioms)]

pub mod v1 {
    tonic::include_proto!("canopy.v1");
}
