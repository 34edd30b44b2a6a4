//! Canopy's cloud controller (CLC): the EC2 Query API, the admin API, the cloud's state
//! and the first tier of scheduling.
//!
//! Layers, each calling only downward:
//! - `ec2`, `admin`, `zones`: the edges (HTTP/XML, HTTP/JSON, gRPC to the CCs);
//! - `forward`: followers hand client requests to the leader;
//! - `scheduler`: pure zone choice;
//! - `images`: the content-addressed store of image bytes;
//! - `key_material`: key pairs' keys and fingerprints (pure);
//! - `replication`: the command log every state change goes through;
//! - `state`: domain types, commands, `apply`, queries over SQLite.

pub mod admin;
pub mod admin_pki;
pub mod clc;
pub mod config;
pub mod console;
pub mod credentials;
pub mod ec2;
pub mod forward;
pub mod http;
pub mod image_registry;
pub mod images;
pub mod key_material;
pub mod launches;
pub mod replication;
pub mod scheduler;
pub mod state;
pub mod zones;

pub use clc::{Clc, ClcHandle, StartError, start};
pub use config::ClcConfig;
