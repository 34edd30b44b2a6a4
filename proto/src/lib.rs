//! Generated gRPC types and services for Canopy's tier-to-tier contracts.
//!
//! Only the edges (the `convert` modules of each controller) use these types; the domain
//! code works with the typed values of `canopy-common`.
#![allow(clippy::all, rust_2018_idioms)]

pub mod v1 {
    tonic::include_proto!("canopy.v1");
}

/// The connections a gRPC server accepts on `listener`, with Nagle's algorithm off.
///
/// tonic sets `TCP_NODELAY` only on listeners it binds itself; on one handed to it, a small
/// reply can wait for the peer's delayed ACK (40 ms on Linux) before it leaves.
pub fn incoming_nodelay(
    listener: tokio::net::TcpListener,
) -> impl futures_core::Stream<Item = std::io::Result<tokio::net::TcpStream>> + Send + 'static {
    use tokio_stream::StreamExt;
    tokio_stream::wrappers::TcpListenerStream::new(listener).map(|accepted| {
        let stream = accepted?;
        stream.set_nodelay(true)?;
        Ok(stream)
    })
}
