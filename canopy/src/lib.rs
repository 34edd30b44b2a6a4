//! Wiring of Canopy's roles.
