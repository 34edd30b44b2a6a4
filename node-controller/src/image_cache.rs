//! The node's cache of image bytes, as a Eucalyptus NC keeps one: each image's bytes in one
//! file named by their SHA-256, fetched once (from the cluster controller, in production),
//! verified, and kept until the space is needed. Instance disks are qcow2 overlays whose
//! backing file is the cached base, and kernels and ramdisks boot from the cached file, so
//! the caller names the digests defined instances depend on (*pinned*) and those are never
//! evicted.
//!
//! A file gets its digest's name only by a rename after its size and digest were checked and
//! its bytes fsynced, so a file named by a digest holds those bytes: [`ImageCache::open`]
//! trusts the files it finds rather than re-hashing gigabytes at every start. Downloads go to
//! `<digest>.<random>.tmp` beside them; a temporary file is removed when its download fails
//! or is abandoned, and at the next start if the node died during it.

use std::collections::{HashMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use canopy_common::{ImageId, ImageRef, Sha256Digest};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio::sync::OwnedMutexGuard;
use tokio_stream::{Stream, StreamExt};
use tracing::{info, warn};

/// The bytes of one image, in chunks, as a fetcher delivers them.
pub type ImageStream = Pin<Box<dyn Stream<Item = Result<Vec<u8>, String>> + Send>>;

/// Where a node gets image bytes it lacks (its cluster controller, in production).
#[async_trait::async_trait]
pub trait ImageFetcher: Send + Sync {
    /// The bytes whose SHA-256 is `sha256` (an image's or a snapshot's).
    async fn fetch(&self, sha256: &Sha256Digest) -> Result<ImageStream, String>;
}

/// The suffix of the temporary files downloads are written to.
const TMP_SUFFIX: &str = ".tmp";

/// What the cache can fail with.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// A file operation failed; the context names the file and, where there is one, the image.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// The fetcher could not deliver the image.
    #[error("fetching image {image} failed: {message}")]
    Fetch { image: ImageId, message: String },
    /// The bytes fetched are not the image's. `got_sha256` is `None` when the download was
    /// stopped because it ran past the expected size.
    #[error(
        "image {image} failed verification: expected {expected_size} bytes with sha256 \
         {expected_sha256}, got {}",
        describe_got(*.got_size, .got_sha256.as_ref())
    )]
    Corrupt {
        image: ImageId,
        expected_sha256: Sha256Digest,
        expected_size: u64,
        got_sha256: Option<Sha256Digest>,
        got_size: u64,
    },
    /// The image is bigger than the whole cache.
    #[error("image {image} is {size} bytes, more than the whole image cache ({max} bytes)")]
    TooLarge { image: ImageId, size: u64, max: u64 },
    /// The image does not fit even with every evictable entry gone.
    #[error(
        "no room in the image cache for image {image} ({needed} bytes): {pinned_bytes} bytes \
         are pinned by instances and {in_flight_bytes} are being fetched, of {max} bytes"
    )]
    Full {
        image: ImageId,
        needed: u64,
        pinned_bytes: u64,
        in_flight_bytes: u64,
        max: u64,
    },
}

fn describe_got(size: u64, sha256: Option<&Sha256Digest>) -> String {
    match sha256 {
        Some(sha256) => format!("{size} bytes with sha256 {sha256}"),
        None => format!("at least {size} bytes"),
    }
}

fn io_error(context: impl Into<String>) -> impl FnOnce(io::Error) -> CacheError {
    let context = context.into();
    move |source| CacheError::Io { context, source }
}

/// One cached image: its size and when it was last used, on the index's logical clock.
struct Entry {
    size: u64,
    last_used: u64,
}

#[derive(Default)]
struct Index {
    entries: HashMap<Sha256Digest, Entry>,
    /// Bytes of the entries.
    used: u64,
    /// Bytes promised to downloads under way, so concurrent misses cannot overfill the cache.
    reserved: u64,
    clock: u64,
}

impl Index {
    /// Marks the entry most recently used; false when there is none.
    fn touch(&mut self, digest: &Sha256Digest) -> bool {
        self.clock += 1;
        match self.entries.get_mut(digest) {
            Some(entry) => {
                entry.last_used = self.clock;
                true
            }
            None => false,
        }
    }

    fn insert(&mut self, digest: Sha256Digest, size: u64) {
        self.clock += 1;
        let entry = Entry {
            size,
            last_used: self.clock,
        };
        if let Some(old) = self.entries.insert(digest, entry) {
            self.used -= old.size;
        }
        self.used += size;
    }

    fn remove(&mut self, digest: &Sha256Digest) {
        if let Some(old) = self.entries.remove(digest) {
            self.used -= old.size;
        }
    }

    fn pinned_bytes(&self, pinned: &HashSet<Sha256Digest>) -> u64 {
        self.entries
            .iter()
            .filter(|(digest, _)| pinned.contains(*digest))
            .map(|(_, entry)| entry.size)
            .sum()
    }

    /// Evicts unpinned entries, least recently used first, until used and reserved bytes
    /// together are within `limit`. The files are removed while the caller holds the index
    /// lock: removed after it, a file could be a new download of the same digest.
    fn evict_to(
        &mut self,
        limit: u64,
        pinned: &HashSet<Sha256Digest>,
        dir: &Path,
    ) -> Vec<Sha256Digest> {
        let mut candidates: Vec<(u64, Sha256Digest)> = self
            .entries
            .iter()
            .filter(|(digest, _)| !pinned.contains(*digest))
            .map(|(digest, entry)| (entry.last_used, digest.clone()))
            .collect();
        candidates.sort();
        let mut removed = Vec::new();
        for (_, digest) in candidates {
            if self.used + self.reserved <= limit {
                break;
            }
            let size = self.entries.get(&digest).map_or(0, |e| e.size);
            self.remove(&digest);
            let path = dir.join(digest.as_str());
            match std::fs::remove_file(&path) {
                Ok(()) => info!(sha256 = %digest, size, "evicted image from cache"),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => warn!(path = %path.display(), error = %e, "cannot remove evicted image"),
            }
            removed.push(digest);
        }
        removed
    }
}

/// A node's size-bounded, verified LRU cache of image bytes, in one directory.
pub struct ImageCache {
    dir: PathBuf,
    max_bytes: u64,
    index: Mutex<Index>,
    /// One lock per digest being ensured, so concurrent misses share one download.
    flights: Mutex<HashMap<Sha256Digest, Arc<tokio::sync::Mutex<()>>>>,
}

impl ImageCache {
    /// Opens (creating) `dir`, bounded to `max_bytes` of image files. Removes leftover
    /// temporary files of interrupted downloads; adopts the complete files already there
    /// (named by their sha256, sizes from metadata, LRU order from mtime). Files beyond
    /// `max_bytes` stay until [`evict`](Self::evict) is called with the pinned set.
    pub fn open(dir: impl Into<PathBuf>, max_bytes: u64) -> Result<Self, CacheError> {
        let dir = dir.into();
        let shown = dir.display();
        std::fs::create_dir_all(&dir)
            .map_err(io_error(format!("creating image cache directory {shown}")))?;
        let listing = format!("listing image cache directory {shown}");
        let mut found = Vec::new();
        for item in std::fs::read_dir(&dir).map_err(io_error(&listing))? {
            let item = item.map_err(io_error(&listing))?;
            let path = item.path();
            let meta = item
                .metadata()
                .map_err(io_error(format!("reading metadata of {}", path.display())))?;
            let name = item.file_name();
            let name = name.to_string_lossy();
            if !meta.is_file() {
                warn!(path = %path.display(), "ignoring non-file in image cache");
            } else if name.ends_with(TMP_SUFFIX) {
                std::fs::remove_file(&path).map_err(io_error(format!(
                    "removing interrupted download {}",
                    path.display()
                )))?;
                info!(path = %path.display(), "removed interrupted download");
            } else if let Ok(digest) = Sha256Digest::parse(&name) {
                let mtime = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                found.push((mtime, digest, meta.len()));
            } else {
                warn!(path = %path.display(), "ignoring unknown file in image cache");
            }
        }
        found.sort();
        let mut index = Index::default();
        for (_, digest, size) in found {
            index.insert(digest, size);
        }
        info!(
            dir = %shown,
            images = index.entries.len(),
            used_bytes = index.used,
            max_bytes,
            "opened image cache"
        );
        Ok(Self {
            dir,
            max_bytes,
            index: Mutex::new(index),
            flights: Mutex::default(),
        })
    }

    /// Where the bytes of `digest` live in the cache (whether or not present).
    pub fn path(&self, digest: &Sha256Digest) -> PathBuf {
        // A digest is 64 hex digits, so it cannot leave the directory.
        self.dir.join(digest.as_str())
    }

    pub fn contains(&self, digest: &Sha256Digest) -> bool {
        self.lock().entries.contains_key(digest)
    }

    /// Bytes held now.
    pub fn used_bytes(&self) -> u64 {
        self.lock().used
    }

    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Makes sure the image's bytes are in the cache and returns their path.
    ///
    /// A hit marks the entry most recently used, and bumps the file's mtime so the order
    /// survives a restart. A miss first makes room, evicting least recently used entries
    /// that are not in `pinned` (the digests defined instances depend on); then fetches
    /// through `fetcher` into a temporary file while hashing, checks the size and SHA-256
    /// against `image`, fsyncs, and renames the file into place. An image bigger than the
    /// cache is `TooLarge`; one that pinned entries and other downloads leave no room for is
    /// `Full`; neither is fetched. Concurrent calls for one digest share one fetch; if it
    /// fails, each waiting call tries its own.
    pub async fn ensure(
        &self,
        image: &ImageRef,
        fetcher: &dyn ImageFetcher,
        pinned: &HashSet<Sha256Digest>,
    ) -> Result<PathBuf, CacheError> {
        let digest = &image.sha256;
        let path = self.path(digest);
        let _flight = self.flight(digest).await;
        if self.lock().touch(digest) {
            match touch_file(path.clone()).await {
                Ok(()) => return Ok(path),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    warn!(
                        image = %image.image_id,
                        sha256 = %digest,
                        "cached image file is gone; fetching it again"
                    );
                    self.lock().remove(digest);
                }
                Err(e) => {
                    // The in-memory order is right; only the order after a restart suffers.
                    warn!(
                        path = %path.display(),
                        error = %e,
                        "cannot update mtime of cached image"
                    );
                    return Ok(path);
                }
            }
        }
        let reservation = self.make_room(image, pinned)?;
        self.download(image, fetcher, &path).await?;
        reservation.commit(digest.clone());
        Ok(path)
    }

    /// Removes every unpinned entry beyond `max_bytes` (LRU first); returns the digests removed.
    pub fn evict(&self, pinned: &HashSet<Sha256Digest>) -> Vec<Sha256Digest> {
        self.lock().evict_to(self.max_bytes, pinned, &self.dir)
    }

    fn lock(&self) -> MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits for this digest's turn.
    async fn flight(&self, digest: &Sha256Digest) -> Flight<'_> {
        let lock = {
            let mut flights = self.flights.lock().unwrap_or_else(|e| e.into_inner());
            flights.entry(digest.clone()).or_default().clone()
        };
        Flight {
            cache: self,
            digest: digest.clone(),
            guard: Some(lock.lock_owned().await),
        }
    }

    /// Evicts until the image fits and reserves its size, or says why it cannot fit.
    fn make_room(
        &self,
        image: &ImageRef,
        pinned: &HashSet<Sha256Digest>,
    ) -> Result<Reservation<'_>, CacheError> {
        let max = self.max_bytes;
        if image.size > max {
            return Err(CacheError::TooLarge {
                image: image.image_id.clone(),
                size: image.size,
                max,
            });
        }
        let mut index = self.lock();
        let pinned_bytes = index.pinned_bytes(pinned);
        if pinned_bytes.saturating_add(index.reserved) > max - image.size {
            return Err(CacheError::Full {
                image: image.image_id.clone(),
                needed: image.size,
                pinned_bytes,
                in_flight_bytes: index.reserved,
                max,
            });
        }
        index.evict_to(max - image.size, pinned, &self.dir);
        index.reserved += image.size;
        Ok(Reservation {
            cache: self,
            size: image.size,
            committed: false,
        })
    }

    /// Fetches the image into a temporary file, verifies it, and renames it to `path`.
    async fn download(
        &self,
        image: &ImageRef,
        fetcher: &dyn ImageFetcher,
        path: &Path,
    ) -> Result<(), CacheError> {
        let id = &image.image_id;
        let name = format!(
            "{}.{:016x}{TMP_SUFFIX}",
            image.sha256,
            rand::random::<u64>()
        );
        let mut tmp = TempFile(Some(self.dir.join(name)));
        let tmp_path = tmp.0.clone().unwrap_or_default();
        let writing = format!("writing image {id} to {}", tmp_path.display());
        info!(image = %id, sha256 = %image.sha256, size = image.size, "fetching image into cache");
        let fetch_error = |message| CacheError::Fetch {
            image: id.clone(),
            message,
        };
        let mut stream = fetcher.fetch(&image.sha256).await.map_err(fetch_error)?;
        let mut file = tokio::fs::File::create_new(&tmp_path)
            .await
            .map_err(io_error(&writing))?;
        let corrupt = |got_sha256, got_size| CacheError::Corrupt {
            image: id.clone(),
            expected_sha256: image.sha256.clone(),
            expected_size: image.size,
            got_sha256,
            got_size,
        };
        let mut hasher = Sha256::new();
        let mut got = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(fetch_error)?;
            got = got.saturating_add(chunk.len() as u64);
            if got > image.size {
                return Err(corrupt(None, got));
            }
            hasher.update(&chunk);
            file.write_all(&chunk).await.map_err(io_error(&writing))?;
        }
        let sha256 = Sha256Digest::from_bytes(&hasher.finalize().into());
        if got != image.size || sha256 != image.sha256 {
            return Err(corrupt(Some(sha256), got));
        }
        file.flush().await.map_err(io_error(&writing))?;
        file.sync_all().await.map_err(io_error(&writing))?;
        drop(file);
        tokio::fs::rename(&tmp_path, path)
            .await
            .map_err(io_error(format!(
                "moving image {id} into {}",
                path.display()
            )))?;
        // Until the directory is synced the rename may not survive a crash; if syncing
        // fails, the file goes rather than stay uncounted.
        tmp.0 = Some(path.to_path_buf());
        let syncing = format!("syncing image cache directory {}", self.dir.display());
        tokio::fs::File::open(&self.dir)
            .await
            .map_err(io_error(&syncing))?
            .sync_all()
            .await
            .map_err(io_error(&syncing))?;
        tmp.0 = None;
        info!(image = %id, sha256 = %image.sha256, size = image.size, "image cached");
        Ok(())
    }
}

/// Sets a file's mtime to now.
async fn touch_file(path: PathBuf) -> io::Result<()> {
    tokio::task::spawn_blocking(move || std::fs::File::open(&path)?.set_modified(SystemTime::now()))
        .await
        .map_err(io::Error::other)?
}

/// Holds a digest's single-flight lock; forgets the lock when nobody else waits for it.
struct Flight<'a> {
    cache: &'a ImageCache,
    digest: Sha256Digest,
    guard: Option<OwnedMutexGuard<()>>,
}

impl Drop for Flight<'_> {
    fn drop(&mut self) {
        let mut flights = self.cache.flights.lock().unwrap_or_else(|e| e.into_inner());
        drop(self.guard.take());
        // Waiters clone the lock under `flights`, so a count of one (the map's) means none.
        if flights
            .get(&self.digest)
            .is_some_and(|lock| Arc::strong_count(lock) == 1)
        {
            flights.remove(&self.digest);
        }
    }
}

/// Bytes set aside for a download; given back if the download does not complete.
struct Reservation<'a> {
    cache: &'a ImageCache,
    size: u64,
    committed: bool,
}

impl Reservation<'_> {
    /// Turns the reservation into the cached entry.
    fn commit(mut self, digest: Sha256Digest) {
        let mut index = self.cache.lock();
        index.reserved -= self.size;
        index.insert(digest, self.size);
        self.committed = true;
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if !self.committed {
            self.cache.lock().reserved -= self.size;
        }
    }
}

/// A file removed when dropped, unless its path was taken back.
struct TempFile(Option<PathBuf>);

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(path) = self.0.take()
            && let Err(e) = std::fs::remove_file(&path)
            && e.kind() != io::ErrorKind::NotFound
        {
            warn!(path = %path.display(), error = %e, "cannot remove temporary image file");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    /// Serves image bytes from memory in 3-byte chunks, counting fetches.
    #[derive(Default)]
    struct FakeFetcher {
        images: HashMap<Sha256Digest, Vec<u8>>,
        calls: AtomicUsize,
        delay: Duration,
    }

    impl FakeFetcher {
        /// Serves `bytes` and returns a correct reference to them.
        fn add(&mut self, bytes: &[u8]) -> ImageRef {
            let image = image_ref(bytes);
            self.images.insert(image.sha256.clone(), bytes.to_vec());
            image
        }

        /// Serves `bytes` under `image`'s digest, whatever they are.
        fn serve(&mut self, image: &ImageRef, bytes: &[u8]) {
            self.images.insert(image.sha256.clone(), bytes.to_vec());
        }

        fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
        }
    }

    #[async_trait::async_trait]
    impl ImageFetcher for FakeFetcher {
        async fn fetch(&self, sha256: &Sha256Digest) -> Result<ImageStream, String> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(self.delay).await;
            let bytes = self
                .images
                .get(sha256)
                .ok_or_else(|| format!("no image {sha256}"))?;
            let chunks: Vec<Result<Vec<u8>, String>> =
                bytes.chunks(3).map(|c| Ok(c.to_vec())).collect();
            Ok(Box::pin(tokio_stream::iter(chunks)))
        }
    }

    fn digest_of(bytes: &[u8]) -> Sha256Digest {
        Sha256Digest::from_bytes(&Sha256::digest(bytes).into())
    }

    fn image_ref(bytes: &[u8]) -> ImageRef {
        ImageRef {
            image_id: ImageId::generate(),
            sha256: digest_of(bytes),
            size: bytes.len() as u64,
        }
    }

    fn files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    fn pins(images: &[&ImageRef]) -> HashSet<Sha256Digest> {
        images.iter().map(|i| i.sha256.clone()).collect()
    }

    #[tokio::test]
    async fn a_miss_fetches_once_and_a_hit_does_not_fetch() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ImageCache::open(dir.path(), 1000).unwrap();
        let mut fetcher = FakeFetcher::default();
        let bytes = b"a machine image, in a few chunks".to_vec();
        let image = fetcher.add(&bytes);

        let path = cache.ensure(&image, &fetcher, &pins(&[])).await.unwrap();
        assert_eq!(path, cache.path(&image.sha256));
        assert_eq!(std::fs::read(&path).unwrap(), bytes);
        assert!(cache.contains(&image.sha256));
        assert_eq!(cache.used_bytes(), bytes.len() as u64);
        assert_eq!(fetcher.calls(), 1);

        let again = cache.ensure(&image, &fetcher, &pins(&[])).await.unwrap();
        assert_eq!(again, path);
        assert_eq!(fetcher.calls(), 1);
        assert_eq!(files(dir.path()), vec![image.sha256.to_string()]);
    }

    #[tokio::test]
    async fn a_file_removed_behind_the_cache_is_fetched_again() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ImageCache::open(dir.path(), 1000).unwrap();
        let mut fetcher = FakeFetcher::default();
        let image = fetcher.add(b"some kernel");
        let path = cache.ensure(&image, &fetcher, &pins(&[])).await.unwrap();
        std::fs::remove_file(&path).unwrap();

        assert_eq!(
            cache.ensure(&image, &fetcher, &pins(&[])).await.unwrap(),
            path
        );
        assert_eq!(std::fs::read(&path).unwrap(), b"some kernel");
        assert_eq!(cache.used_bytes(), 11);
        assert_eq!(fetcher.calls(), 2);
    }

    #[tokio::test]
    async fn corrupt_or_failed_downloads_leave_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ImageCache::open(dir.path(), 1000).unwrap();
        let mut fetcher = FakeFetcher::default();
        let bytes = b"0123456789abcdef".to_vec();

        let wrong_bytes = image_ref(&bytes);
        fetcher.serve(&wrong_bytes, b"0123456789abcdeX");
        let too_many = ImageRef {
            size: bytes.len() as u64 - 1,
            ..image_ref(b"too many")
        };
        fetcher.serve(&too_many, &bytes);
        let too_few = ImageRef {
            size: bytes.len() as u64 + 1,
            ..image_ref(b"too few")
        };
        fetcher.serve(&too_few, &bytes);

        for image in [&wrong_bytes, &too_many, &too_few] {
            let err = cache.ensure(image, &fetcher, &pins(&[])).await.unwrap_err();
            assert!(
                matches!(&err, CacheError::Corrupt { image: id, .. } if *id == image.image_id),
                "{err:?}"
            );
            assert!(err.to_string().contains(image.image_id.as_str()), "{err}");
            assert!(!cache.contains(&image.sha256));
            assert!(files(dir.path()).is_empty(), "{:?}", files(dir.path()));
        }
        let err = cache
            .ensure(&too_many, &fetcher, &pins(&[]))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("at least 16 bytes"), "{err}");

        let missing = image_ref(b"not served");
        let err = cache
            .ensure(&missing, &fetcher, &pins(&[]))
            .await
            .unwrap_err();
        assert!(matches!(err, CacheError::Fetch { .. }), "{err:?}");
        assert!(files(dir.path()).is_empty());
        assert_eq!(cache.used_bytes(), 0);
    }

    #[tokio::test]
    async fn the_least_recently_used_unpinned_entry_goes_first() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ImageCache::open(dir.path(), 20).unwrap();
        let mut fetcher = FakeFetcher::default();
        let a = fetcher.add(b"aaaaaaaaaa");
        let b = fetcher.add(b"bbbbbbbbbb");
        let c = fetcher.add(b"cccccccccc");

        for image in [&a, &b, &a, &c] {
            cache.ensure(image, &fetcher, &pins(&[])).await.unwrap();
        }
        assert!(cache.contains(&a.sha256) && cache.contains(&c.sha256));
        assert!(!cache.contains(&b.sha256));
        assert!(!cache.path(&b.sha256).exists());
        assert_eq!(cache.used_bytes(), 20);
        assert_eq!(fetcher.calls(), 3);
    }

    #[tokio::test]
    async fn pinned_entries_stay_and_an_image_that_cannot_fit_is_not_fetched() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ImageCache::open(dir.path(), 20).unwrap();
        let mut fetcher = FakeFetcher::default();
        let a = fetcher.add(b"aaaaaaaaaa");
        let b = fetcher.add(b"bbbbbbbbbb");
        let c = fetcher.add(b"cccccccccc");
        let huge = fetcher.add(&[7; 21]);
        cache.ensure(&a, &fetcher, &pins(&[])).await.unwrap();
        cache.ensure(&b, &fetcher, &pins(&[])).await.unwrap();

        let err = cache
            .ensure(&c, &fetcher, &pins(&[&a, &b]))
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                CacheError::Full {
                    needed: 10,
                    pinned_bytes: 20,
                    max: 20,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(cache.contains(&a.sha256) && cache.contains(&b.sha256));
        assert_eq!(fetcher.calls(), 2);

        // A is the least recently used, but pinned: B goes instead.
        cache.ensure(&c, &fetcher, &pins(&[&a])).await.unwrap();
        assert!(cache.contains(&a.sha256) && cache.contains(&c.sha256));
        assert!(!cache.contains(&b.sha256));

        let err = cache.ensure(&huge, &fetcher, &pins(&[])).await.unwrap_err();
        assert!(
            matches!(
                err,
                CacheError::TooLarge {
                    size: 21,
                    max: 20,
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(fetcher.calls(), 3);
        assert!(cache.contains(&a.sha256) && cache.contains(&c.sha256));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_misses_share_one_fetch() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(ImageCache::open(dir.path(), 1 << 20).unwrap());
        let mut fetcher = FakeFetcher {
            delay: Duration::from_millis(200),
            ..FakeFetcher::default()
        };
        let image = fetcher.add(&[42; 100_000]);
        let fetcher = Arc::new(fetcher);

        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..8 {
            let (cache, fetcher, image) = (cache.clone(), fetcher.clone(), image.clone());
            tasks.spawn(async move {
                cache
                    .ensure(&image, fetcher.as_ref(), &HashSet::new())
                    .await
            });
        }
        let paths: Vec<PathBuf> = tasks
            .join_all()
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(paths.len(), 8);
        assert!(paths.iter().all(|p| *p == cache.path(&image.sha256)));
        assert_eq!(fetcher.calls(), 1);
        assert_eq!(cache.used_bytes(), 100_000);
        assert!(cache.flights.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn reopening_adopts_files_in_mtime_order_and_removes_temporaries() {
        let dir = tempfile::tempdir().unwrap();
        let mut fetcher = FakeFetcher::default();
        let a = fetcher.add(b"aaaaaaaaaa");
        let b = fetcher.add(b"bbbbbbbbbb");
        let c = fetcher.add(b"cccccccccc");
        {
            let cache = ImageCache::open(dir.path(), 20).unwrap();
            cache.ensure(&a, &fetcher, &pins(&[])).await.unwrap();
            cache.ensure(&b, &fetcher, &pins(&[])).await.unwrap();
            // Used before B, in the previous life of the cache.
            let old = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
            std::fs::File::open(cache.path(&a.sha256))
                .unwrap()
                .set_modified(old)
                .unwrap();
        }
        let leftover = dir
            .path()
            .join(format!("{}.00000000deadbeef.tmp", c.sha256));
        std::fs::write(&leftover, b"ccc").unwrap();

        let cache = ImageCache::open(dir.path(), 20).unwrap();
        assert!(!leftover.exists());
        assert!(cache.contains(&a.sha256) && cache.contains(&b.sha256));
        assert_eq!(cache.used_bytes(), 20);

        cache.ensure(&c, &fetcher, &pins(&[])).await.unwrap();
        assert!(!cache.contains(&a.sha256), "A had the oldest mtime");
        assert!(cache.contains(&b.sha256) && cache.contains(&c.sha256));
        let mut kept = vec![b.sha256.to_string(), c.sha256.to_string()];
        kept.sort();
        assert_eq!(files(dir.path()), kept);
        drop(cache);

        // A smaller cache keeps the files until told what is pinned.
        let cache = ImageCache::open(dir.path(), 10).unwrap();
        assert_eq!(cache.used_bytes(), 20);
        assert_eq!(cache.evict(&pins(&[&b])), vec![c.sha256.clone()]);
        assert_eq!(cache.used_bytes(), 10);
        assert_eq!(files(dir.path()), vec![b.sha256.to_string()]);
        assert!(cache.evict(&pins(&[])).is_empty());
    }
}
