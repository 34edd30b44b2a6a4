//! Wiring of Canopy's roles: configuration loading, first-start bootstrap, the all-in-one
//! dev cloud, and the admin CLI. `main.rs` only parses flags and calls into here.

pub mod admin_cli;
pub mod bench;
pub mod bootstrap;
pub mod config;
pub mod dev;
pub mod pki;
pub mod test_guest;
