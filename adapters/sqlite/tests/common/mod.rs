//! Test resources that are real files. Acquiring creates `held/<handle>` (holding the
//! session id) and logs the handle in `acquired`; releasing moves it to
//! `released/<handle>` (one atomic rename: only one release can ever take effect) and
//! appends the handle to `ledger`. The ledger lives outside the engine and survives a
//! killed engine process.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use session_lifecycle::{Resource, ResourceKind, SessionId};
use session_lifecycle_runtime::{
    AcquireError, AcquireRequest, Acquired, BoxFuture, EventSink, ReleaseError, ReleaseNote,
    ResourceBackend,
};

pub const FILE_KIND: ResourceKind = ResourceKind(9);

pub struct FileBackend {
    dir: PathBuf,
    next: AtomicU64,
    /// When set, releases fail (to exercise retries).
    pub fail_releases: AtomicBool,
    /// When set, acquires fail with "no capacity".
    pub exhausted: AtomicBool,
}

impl FileBackend {
    pub fn new(dir: &Path) -> Arc<FileBackend> {
        std::fs::create_dir_all(dir.join("held")).unwrap();
        std::fs::create_dir_all(dir.join("released")).unwrap();
        Arc::new(FileBackend {
            dir: dir.to_path_buf(),
            // Unique across processes sharing the directory.
            next: AtomicU64::new(u64::from(std::process::id()) << 32),
            fail_releases: AtomicBool::new(false),
            exhausted: AtomicBool::new(false),
        })
    }

    fn held(&self, handle: u64) -> PathBuf {
        self.dir.join("held").join(handle.to_string())
    }

    fn ledger(&self) -> PathBuf {
        self.dir.join("ledger")
    }

    /// Handles acquired (a file was created) and still held.
    pub fn still_held(&self) -> Vec<u64> {
        std::fs::read_dir(self.dir.join("held"))
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect()
    }

    /// Release count per handle, from the ledger. A process killed between a release's
    /// rename and its ledger line leaves the line out: `released/` has the truth then.
    pub fn releases(&self) -> HashMap<u64, u32> {
        let text = std::fs::read_to_string(self.ledger()).unwrap_or_default();
        let mut counts = HashMap::new();
        for line in text.lines() {
            *counts.entry(line.parse().unwrap()).or_default() += 1;
        }
        counts
    }

    /// Handles whose release took effect.
    pub fn released(&self) -> Vec<u64> {
        std::fs::read_dir(self.dir.join("released"))
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect()
    }

    /// Handles ever acquired, from the acquisitions log.
    pub fn acquired(&self) -> Vec<u64> {
        let text = std::fs::read_to_string(self.dir.join("acquired")).unwrap_or_default();
        text.lines().map(|l| l.parse().unwrap()).collect()
    }
}

fn append(path: &Path, line: &str) {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    f.write_all(line.as_bytes()).unwrap();
    f.sync_data().unwrap();
}

impl ResourceBackend for FileBackend {
    fn kind(&self) -> ResourceKind {
        FILE_KIND
    }
    fn name(&self) -> &'static str {
        "file"
    }
    fn acquire<'a>(
        &'a self,
        request: AcquireRequest<'a>,
        _events: EventSink,
    ) -> BoxFuture<'a, Result<Acquired, AcquireError>> {
        Box::pin(async move {
            if self.exhausted.load(Ordering::SeqCst) {
                return Err(AcquireError::CapacityExhausted("no file slots".into()));
            }
            let handle = self.next.fetch_add(1, Ordering::SeqCst);
            // Atomic: the file appears in held/ complete, or not at all.
            let tmp = self.dir.join(format!("tmp-{handle}"));
            std::fs::write(&tmp, request.session.to_string()).unwrap();
            std::fs::rename(&tmp, self.held(handle)).unwrap();
            append(&self.dir.join("acquired"), &format!("{handle}\n"));
            Ok(Acquired {
                resource: Resource {
                    kind: FILE_KIND,
                    handle,
                },
                env: vec![("TEST_FILE_HANDLE".into(), handle.to_string())],
            })
        })
    }
    fn release(
        &self,
        _session: SessionId,
        resource: Resource,
    ) -> BoxFuture<'_, Result<ReleaseNote, ReleaseError>> {
        Box::pin(async move {
            if self.fail_releases.load(Ordering::SeqCst) {
                return Err(ReleaseError::transient("release refused for the test"));
            }
            let to = self.dir.join("released").join(resource.handle.to_string());
            match std::fs::rename(self.held(resource.handle), to) {
                Ok(()) => {
                    append(&self.ledger(), &format!("{}\n", resource.handle));
                    Ok("deleted".into())
                }
                // Already released (a retry, or a re-run after a crash): nothing to do.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ReleaseNote::Gone),
                Err(e) => Err(ReleaseError::transient("moving the file").caused_by(e)),
            }
        })
    }
    fn find_held<'a>(
        &'a self,
        sessions: &'a [SessionId],
    ) -> BoxFuture<'a, Result<Vec<(SessionId, Resource)>, ReleaseError>> {
        Box::pin(async move {
            let mut found = Vec::new();
            for handle in self.still_held() {
                let owner = std::fs::read_to_string(self.held(handle)).unwrap_or_default();
                if let Some(id) = sessions.iter().find(|s| s.to_string() == owner) {
                    found.push((
                        *id,
                        Resource {
                            kind: FILE_KIND,
                            handle,
                        },
                    ));
                }
            }
            Ok(found)
        })
    }
}

/// Every handle ever acquired was released exactly once, and none is still held.
pub fn assert_released_exactly_once(backend: &FileBackend) {
    let releases = backend.releases();
    let acquired = backend.acquired();
    assert!(
        backend.still_held().is_empty(),
        "still held: {:?}",
        backend.still_held()
    );
    for h in &acquired {
        assert_eq!(
            releases.get(h).copied().unwrap_or(0),
            1,
            "resource {h} released {:?} times",
            releases.get(h)
        );
    }
    assert_eq!(
        releases.len(),
        acquired.len(),
        "released something never acquired"
    );
}

/// After processes were killed mid-release: every resource that was ever created is
/// released (its rename took effect once), none is held, and no ledger line is doubled.
pub fn assert_released_once_after_crashes(backend: &FileBackend) {
    assert!(
        backend.still_held().is_empty(),
        "leaked: {:?}",
        backend.still_held()
    );
    let releases = backend.releases();
    for (h, n) in &releases {
        assert_eq!(*n, 1, "resource {h} released {n} times");
    }
    let mut released = backend.released();
    released.sort_unstable();
    // Every logged release took effect; an unlogged one was cut off by a kill.
    assert!(releases.keys().all(|h| released.binary_search(h).is_ok()));
}
