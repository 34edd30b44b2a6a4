//! The CLC's image store: image bytes kept content-addressed (SHA-256) under
//! `DATA_DIR/images/`, imported from a file the CLC can read or an http URL, and streamed to
//! nodes (through their CC) by digest. Replicas copy each other's bytes
//! ([`crate::replication::blobs`]), received through [`ImageStore::import_expected`] and
//! served through [`ImageStore::chunks`].
//!
//! What kind an image is comes from its first bytes, since EC2's RegisterImage has no
//! parameter for it ([`sniff`]): a Linux boot header or an ELF file is a kernel, a cpio
//! archive or a compressed stream is a ramdisk, a qcow2 header is a qcow2 disk, anything
//! else a raw disk.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use canopy_common::{ImageKind, Sha256Digest};
use canopy_proto::v1 as pb;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

/// Image bytes as a gRPC stream of chunks (`CloudController.FetchImage`,
/// `RaftTransport.FetchBlob`).
pub type ImageChunks = std::pin::Pin<
    Box<dyn tokio_stream::Stream<Item = Result<pb::ImageChunk, tonic::Status>> + Send>,
>;

/// The size of the chunks [`ImageStore::chunks`] sends.
const CHUNK: usize = 1 << 20;

/// The largest image the store takes (64 GiB).
pub const MAX_IMAGE_BYTES: u64 = 64 << 30;

#[derive(Debug, thiserror::Error)]
pub enum ImageStoreError {
    /// The location cannot be read: the message says why, in the user's terms.
    #[error("{0}")]
    Location(String),
    #[error("image store: {context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> ImageStoreError {
    let context = context.into();
    move |source| ImageStoreError::Io { context, source }
}

/// What an import stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Imported {
    pub sha256: Sha256Digest,
    pub size: u64,
    pub kind: ImageKind,
    /// `qcow2` or `raw` for a machine image.
    pub disk_format: Option<&'static str>,
}

/// The kind of image whose bytes begin with `head` (its first 4 KiB or all of it), and the
/// disk format of a machine image.
pub fn sniff(head: &[u8]) -> (ImageKind, Option<&'static str>) {
    let starts = |magic: &[u8]| head.starts_with(magic);
    if starts(b"QFI\xfb") {
        (ImageKind::Machine, Some("qcow2"))
    } else if head.get(0x202..0x206) == Some(b"HdrS") || starts(b"\x7fELF") {
        // The x86 Linux boot protocol's header signature; or an uncompressed vmlinux.
        (ImageKind::Kernel, None)
    } else if starts(b"070701")
        || starts(b"070702")
        || starts(b"\x1f\x8b")
        || starts(b"\xfd7zXZ\x00")
        || starts(b"\x28\xb5\x2f\xfd")
        || starts(b"\x02\x21\x4c\x18")
        || starts(b"BZh")
    {
        // newc cpio, or gzip/xz/zstd/lz4/bzip2: what initramfs images are.
        (ImageKind::Ramdisk, None)
    } else {
        (ImageKind::Machine, Some("raw"))
    }
}

pub struct ImageStore {
    dir: PathBuf,
    http: reqwest::Client,
}

impl ImageStore {
    /// The store in `dir` (created by the first import), after removing what interrupted
    /// imports left there.
    pub fn open(dir: impl Into<PathBuf>) -> Self {
        let dir = dir.into();
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if entry.file_name().to_string_lossy().starts_with(".import-") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Self {
            dir,
            // A server that stops sending fails the registration instead of holding it.
            http: crate::http::builder()
                .connect_timeout(std::time::Duration::from_secs(10))
                .read_timeout(std::time::Duration::from_secs(60))
                .build()
                .unwrap_or_else(|_| crate::http::client()),
        }
    }

    /// Where the bytes of `digest` are (whether or not this replica holds them).
    pub fn path(&self, digest: &Sha256Digest) -> PathBuf {
        self.dir.join(digest.as_str())
    }

    pub fn contains(&self, digest: &Sha256Digest) -> bool {
        self.path(digest).is_file()
    }

    /// Imports what `location` names: an absolute path or `file://` URL of a file this CLC
    /// reads, or an `http://` or `https://` URL (server certificates checked against the
    /// system's trust store, which `SSL_CERT_FILE` can replace). Errors are
    /// [`ImageStoreError::Location`] when the fault is the location's.
    pub async fn import(&self, location: &str) -> Result<Imported, ImageStoreError> {
        if location.starts_with("http://") || location.starts_with("https://") {
            self.import_url(location).await
        } else {
            let path = location.strip_prefix("file://").unwrap_or(location);
            if !path.starts_with('/') {
                return Err(ImageStoreError::Location(format!(
                    "{location}: expected an absolute file path, a file:// URL or an http:// URL"
                )));
            }
            self.import_file(Path::new(path)).await
        }
    }

    async fn import_file(&self, path: &Path) -> Result<Imported, ImageStoreError> {
        let unreadable =
            |e: std::io::Error| ImageStoreError::Location(format!("{}: {e}", path.display()));
        let meta = tokio::fs::metadata(path).await.map_err(unreadable)?;
        if !meta.is_file() {
            return Err(ImageStoreError::Location(format!(
                "{}: not a regular file",
                path.display()
            )));
        }
        let mut file = tokio::fs::File::open(path).await.map_err(unreadable)?;
        let mut sink = self.sink().await?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = tokio::io::AsyncReadExt::read(&mut file, &mut buf)
                .await
                .map_err(unreadable)?;
            if n == 0 {
                break;
            }
            sink.write(&buf[..n]).await?;
        }
        sink.finish(self, None).await
    }

    /// Imports bytes as they arrive (an upload's body).
    pub async fn import_stream<S, B, E>(&self, body: S) -> Result<Imported, ImageStoreError>
    where
        S: tokio_stream::Stream<Item = Result<B, E>> + Unpin,
        B: AsRef<[u8]>,
        E: std::fmt::Display,
    {
        self.import_chunks(body, None, "the upload").await
    }

    /// Imports bytes that must hash to `expected` (another replica's copy): the same
    /// temporary file, hashing and fsync as an import, and nothing kept unless the SHA-256
    /// of what arrived (and so its size) is the one asked for.
    pub async fn import_expected<S, B, E>(
        &self,
        expected: &Sha256Digest,
        body: S,
    ) -> Result<Imported, ImageStoreError>
    where
        S: tokio_stream::Stream<Item = Result<B, E>> + Unpin,
        B: AsRef<[u8]>,
        E: std::fmt::Display,
    {
        self.import_chunks(body, Some(expected), "the copy").await
    }

    /// Writes a stream of chunks through a sink; `what` names the stream in the error when
    /// it breaks off.
    async fn import_chunks<S, B, E>(
        &self,
        mut body: S,
        expected: Option<&Sha256Digest>,
        what: &str,
    ) -> Result<Imported, ImageStoreError>
    where
        S: tokio_stream::Stream<Item = Result<B, E>> + Unpin,
        B: AsRef<[u8]>,
        E: std::fmt::Display,
    {
        use tokio_stream::StreamExt;
        let mut sink = self.sink().await?;
        while let Some(chunk) = body.next().await {
            let chunk =
                chunk.map_err(|e| ImageStoreError::Location(format!("{what} broke off: {e}")))?;
            sink.write(chunk.as_ref()).await?;
        }
        sink.finish(self, expected).await
    }

    /// The bytes of `sha256` in 1 MiB chunks, for a gRPC answer: NOT_FOUND when this replica
    /// holds none, INVALID_ARGUMENT when `sha256` is not a digest.
    pub async fn chunks(&self, sha256: &str) -> Result<ImageChunks, tonic::Status> {
        use tokio::io::AsyncReadExt;
        let digest = Sha256Digest::parse(sha256)
            .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
        let mut file = match tokio::fs::File::open(self.path(&digest)).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(tonic::Status::not_found(format!(
                    "this replica holds no image bytes {digest}"
                )));
            }
            Err(e) => return Err(tonic::Status::internal(format!("image {digest}: {e}"))),
        };
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<pb::ImageChunk, tonic::Status>>(4);
        tokio::spawn(async move {
            loop {
                let mut data = vec![0u8; CHUNK];
                let chunk = match file.read(&mut data).await {
                    Ok(0) => return,
                    Ok(n) => {
                        data.truncate(n);
                        Ok(pb::ImageChunk { data })
                    }
                    Err(e) => Err(tonic::Status::internal(format!(
                        "reading image {digest}: {e}"
                    ))),
                };
                let failed = chunk.is_err();
                if tx.send(chunk).await.is_err() || failed {
                    return;
                }
            }
        });
        Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }

    async fn import_url(&self, url: &str) -> Result<Imported, ImageStoreError> {
        // reqwest's top-level message hides the cause (a refused connection, an untrusted
        // certificate): name the whole chain.
        let failed = |e: reqwest::Error| {
            let mut message = format!("{url}: {e}");
            let mut source = std::error::Error::source(&e);
            while let Some(cause) = source {
                message.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            ImageStoreError::Location(message)
        };
        let mut response = self.http.get(url).send().await.map_err(failed)?;
        if !response.status().is_success() {
            return Err(ImageStoreError::Location(format!(
                "{url}: the server answered {}",
                response.status()
            )));
        }
        let mut sink = self.sink().await?;
        while let Some(chunk) = response.chunk().await.map_err(failed)? {
            sink.write(&chunk).await?;
        }
        sink.finish(self, None).await
    }

    async fn sink(&self) -> Result<Sink, ImageStoreError> {
        tokio::fs::create_dir_all(&self.dir)
            .await
            .map_err(io(format!("create {}", self.dir.display())))?;
        let tmp = self
            .dir
            .join(format!(".import-{:016x}", rand::random::<u64>()));
        let file = tokio::fs::File::create(&tmp)
            .await
            .map_err(io(format!("create {}", tmp.display())))?;
        Ok(Sink {
            tmp,
            file: Some(file),
            hasher: Sha256::new(),
            head: Vec::new(),
            size: 0,
            kept: false,
        })
    }

    /// Removes the bytes of every digest not in `keep` whose file is older than `min_age`
    /// (an import renames its file into place before its image row commits); returns what it
    /// removed.
    pub fn remove_unreferenced(
        &self,
        keep: &HashSet<Sha256Digest>,
        min_age: std::time::Duration,
    ) -> Vec<Sha256Digest> {
        let mut removed = Vec::new();
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return removed;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let old_enough = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age >= min_age);
            if let Ok(digest) = Sha256Digest::parse(&name)
                && !keep.contains(&digest)
                && old_enough
                && std::fs::remove_file(entry.path()).is_ok()
            {
                tracing::info!(sha256 = %digest, "image bytes no longer referenced: removed");
                removed.push(digest);
            }
        }
        removed
    }
}

/// An import under way: a temporary file, hashed as it is written. Dropped before it is
/// renamed into place (unfinished, or refused), it removes the file.
struct Sink {
    tmp: PathBuf,
    file: Option<tokio::fs::File>,
    hasher: Sha256,
    head: Vec<u8>,
    size: u64,
    /// Renamed into place: nothing to remove.
    kept: bool,
}

impl Sink {
    async fn write(&mut self, bytes: &[u8]) -> Result<(), ImageStoreError> {
        self.size += bytes.len() as u64;
        if self.size > MAX_IMAGE_BYTES {
            return Err(ImageStoreError::Location(format!(
                "the image is larger than {} GiB",
                MAX_IMAGE_BYTES >> 30
            )));
        }
        if self.head.len() < 4096 {
            let take = (4096 - self.head.len()).min(bytes.len());
            self.head.extend_from_slice(&bytes[..take]);
        }
        self.hasher.update(bytes);
        let file = self.file.as_mut().expect("open until finished");
        file.write_all(bytes)
            .await
            .map_err(io(format!("write {}", self.tmp.display())))
    }

    /// Makes the file the store's copy of its digest; with `expected`, only if that is its
    /// digest (otherwise the file goes, as when the sink is dropped).
    async fn finish(
        mut self,
        store: &ImageStore,
        expected: Option<&Sha256Digest>,
    ) -> Result<Imported, ImageStoreError> {
        if self.size == 0 {
            return Err(ImageStoreError::Location("the image is empty".into()));
        }
        let mut file = self.file.take().expect("open until finished");
        file.flush().await.map_err(io("flush"))?;
        file.sync_all().await.map_err(io("fsync"))?;
        drop(file);
        let digest: [u8; 32] = std::mem::take(&mut self.hasher).finalize().into();
        let sha256 = Sha256Digest::from_bytes(&digest);
        if let Some(expected) = expected
            && *expected != sha256
        {
            return Err(ImageStoreError::Location(format!(
                "the bytes received hash to {sha256}, not {expected}"
            )));
        }
        let target = store.path(&sha256);
        tokio::fs::rename(&self.tmp, &target)
            .await
            .map_err(io(format!("rename into {}", target.display())))?;
        self.kept = true;
        if let Ok(dir) = tokio::fs::File::open(&store.dir).await {
            let _ = dir.sync_all().await;
        }
        let (kind, disk_format) = sniff(&self.head);
        Ok(Imported {
            sha256,
            size: self.size,
            kind,
            disk_format,
        })
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        if !self.kept {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniffing_tells_kernels_ramdisks_and_disks_apart() {
        let mut bz = vec![0u8; 0x300];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(sniff(&bz), (ImageKind::Kernel, None));
        assert_eq!(sniff(b"\x7fELF\x02\x01"), (ImageKind::Kernel, None));
        for ramdisk in [
            &b"070701000"[..],
            b"\x1f\x8b\x08\x00",
            b"\xfd7zXZ\x00\x00",
            b"BZh9",
        ] {
            assert_eq!(sniff(ramdisk), (ImageKind::Ramdisk, None));
        }
        assert_eq!(
            sniff(b"QFI\xfb\x00\x00\x00\x03"),
            (ImageKind::Machine, Some("qcow2"))
        );
        assert_eq!(sniff(&[0u8; 512]), (ImageKind::Machine, Some("raw")));
        assert_eq!(sniff(b""), (ImageKind::Machine, Some("raw")));
    }

    #[tokio::test]
    async fn imports_are_content_addressed_and_leave_nothing_on_failure() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(dir.path().join("images"));
        let src = dir.path().join("disk.img");
        std::fs::write(&src, b"QFI\xfbsome qcow2 bytes").unwrap();
        let a = store.import(src.to_str().unwrap()).await.unwrap();
        assert_eq!(a.size, 20);
        assert_eq!(a.kind, ImageKind::Machine);
        assert_eq!(a.disk_format, Some("qcow2"));
        let want: [u8; 32] = Sha256::digest(b"QFI\xfbsome qcow2 bytes").into();
        assert_eq!(a.sha256, Sha256Digest::from_bytes(&want));
        assert_eq!(
            std::fs::read(store.path(&a.sha256)).unwrap(),
            b"QFI\xfbsome qcow2 bytes"
        );
        // The same bytes again: the same digest, one file.
        let b = store
            .import(&format!("file://{}", src.display()))
            .await
            .unwrap();
        assert_eq!(a, b);

        for bad in ["relative/path", "/no/such/file", "https://127.0.0.1:1/x"] {
            assert!(
                matches!(store.import(bad).await, Err(ImageStoreError::Location(_))),
                "{bad}"
            );
        }
        let empty = dir.path().join("empty");
        std::fs::write(&empty, b"").unwrap();
        assert!(store.import(empty.to_str().unwrap()).await.is_err());
        let names: Vec<String> = std::fs::read_dir(dir.path().join("images"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec![a.sha256.to_string()]);

        let now = std::time::Duration::ZERO;
        assert!(
            store
                .remove_unreferenced(&HashSet::from([a.sha256.clone()]), now)
                .is_empty()
        );
        // Too young: its image row may still be committing.
        let hour = std::time::Duration::from_secs(3600);
        assert!(store.remove_unreferenced(&HashSet::new(), hour).is_empty());
        assert_eq!(
            store.remove_unreferenced(&HashSet::new(), now),
            vec![a.sha256.clone()]
        );
        assert!(!store.contains(&a.sha256));
    }

    #[tokio::test]
    async fn a_copy_is_kept_only_under_its_own_digest() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(dir.path().join("images"));
        let bytes = b"\x7fELF a kernel".to_vec();
        let want: [u8; 32] = Sha256::digest(&bytes).into();
        let want = Sha256Digest::from_bytes(&want);
        let body = |chunks: Vec<&'static [u8]>| {
            tokio_stream::iter(chunks.into_iter().map(Ok::<_, std::io::Error>))
        };

        // Bytes that hash to something else: refused, and nothing left behind.
        let other: [u8; 32] = Sha256::digest(b"other").into();
        let other = Sha256Digest::from_bytes(&other);
        let err = store
            .import_expected(&other, body(vec![b"\x7fELF a ", b"kernel"]))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("hash to"), "{err}");
        assert!(!store.contains(&other));
        assert!(!store.contains(&want));
        assert_eq!(
            std::fs::read_dir(dir.path().join("images"))
                .unwrap()
                .count(),
            0
        );

        let copied = store
            .import_expected(&want, body(vec![b"\x7fELF a ", b"kernel"]))
            .await
            .unwrap();
        assert_eq!(
            (copied.sha256.clone(), copied.size),
            (want.clone(), bytes.len() as u64)
        );
        assert_eq!(std::fs::read(store.path(&want)).unwrap(), bytes);

        // Served back in chunks, byte for byte; an absent digest is NOT_FOUND.
        use tokio_stream::StreamExt;
        let mut served = Vec::new();
        let mut chunks = store.chunks(want.as_str()).await.unwrap();
        while let Some(chunk) = chunks.next().await {
            served.extend(chunk.unwrap().data);
        }
        assert_eq!(served, bytes);
        let absent = store.chunks(other.as_str()).await.err().unwrap();
        assert_eq!(absent.code(), tonic::Code::NotFound);
        let bad = store.chunks("nope").await.err().unwrap();
        assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    }
}
