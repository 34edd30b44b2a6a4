//! The command log: the only way commands reach the state machine.
//!
//! Today one replica applies each command as soon as it is submitted (`LocalLog`). The
//! replicated log (openraft, issue 3) implements the same trait: `submit` returns once the
//! command is committed by a quorum and applied by the local state machine, so nothing
//! above this module changes.

pub mod blobs;
pub mod raft;

use std::sync::Arc;

use async_trait::async_trait;

use crate::state::{Command, Outcome, StateError, Store};

#[async_trait]
pub trait CommandLog: Send + Sync + 'static {
    /// Appends `command`, waits until it is applied, and returns what applying produced.
    async fn submit(&self, command: Command) -> Result<Outcome, StateError>;
}

/// A single-replica log: submitting is applying.
#[derive(Debug, Clone)]
pub struct LocalLog {
    store: Arc<Store>,
}

impl LocalLog {
    pub fn new(store: Arc<Store>) -> Self {
        Self { store }
    }
}

#[async_trait]
impl CommandLog for LocalLog {
    async fn submit(&self, command: Command) -> Result<Outcome, StateError> {
        self.store.apply(&command).await
    }
}
