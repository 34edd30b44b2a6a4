//! Canopy's node controller: the Hypervisor trait, its drivers, and the node agent
