//! Canopy's cluster controller: a zone's node registry, node placement, desired-state fan-out
