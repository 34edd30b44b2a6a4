//! A node host for real guests: the checks `canopy nc` runs before it starts (what is
//! missing is said plainly, at once, instead of failing at the first launch), and the
//! libvirt driver put together from the node's configuration.
//!
//! Compiled with or without the `libvirt` feature: without it, [`connect_libvirt`] says
//! that this build has no libvirt driver.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::domain_xml::Accelerator;
use crate::hypervisor::Hypervisor;

/// The least free space the image cache's file system must have.
pub const MIN_CACHE_FREE_BYTES: u64 = 1 << 30;

/// Which accelerator guests get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcceleratorChoice {
    /// Probe: KVM when it really works, else software emulation ([`crate::accel`]).
    Auto,
    Kvm,
    /// QEMU's software emulation (TCG).
    Qemu,
}

impl std::str::FromStr for AcceleratorChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "kvm" => Ok(Self::Kvm),
            "qemu" | "tcg" => Ok(Self::Qemu),
            other => Err(format!("accelerator {other:?}: expected auto, kvm or qemu")),
        }
    }
}

/// What a libvirt node needs.
#[derive(Debug, Clone)]
pub struct LibvirtNodeOptions {
    /// libvirt's connection URI, e.g. `qemu:///system`.
    pub uri: String,
    pub accelerator: AcceleratorChoice,
    /// Per-instance files (root overlays, console logs).
    pub instances_dir: PathBuf,
    /// Volumes' bytes, one qcow2 file each. Shared storage (the same directory on every
    /// node of the zone) lets a volume move between the zone's nodes.
    pub volumes_dir: PathBuf,
    /// The node's image cache, and its bound.
    pub image_cache_dir: PathBuf,
    pub image_cache_max_bytes: u64,
    /// Disk offered to instances.
    pub disk_gib: u64,
    /// Where image bytes come from: the zone's CC.
    pub cc_endpoint: String,
}

/// Whether this build has the libvirt driver.
pub fn libvirt_compiled() -> bool {
    cfg!(feature = "libvirt")
}

/// The first `name` on `PATH` (or the path itself when it has a slash).
pub fn find_program(name: &str) -> Option<PathBuf> {
    if name.contains('/') {
        return Path::new(name).is_file().then(|| PathBuf::from(name));
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    })
}

/// QEMU's x86-64 system emulator, where Debian and others install it.
pub fn find_qemu() -> Option<PathBuf> {
    find_program("qemu-system-x86_64").or_else(|| {
        ["/usr/libexec/qemu-kvm", "/usr/bin/qemu-kvm"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
    })
}

/// Free bytes on the file system that holds `path` (or its nearest existing parent).
fn free_bytes(path: &Path) -> Option<u64> {
    let mut probe = path.to_path_buf();
    while !probe.exists() {
        probe = probe.parent()?.to_path_buf();
    }
    // `df` is everywhere a node runs, and this is a one-off check at start.
    let out = std::process::Command::new("df")
        .args(["-P", "-B1"])
        .arg(&probe)
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines().nth(1)?.split_whitespace().nth(3)?.parse().ok()
}

/// `/dev/kvm` that only root can open. libvirt checks KVM as QEMU's user with its primary
/// group only; when that fails while its capability probe saw KVM, it throws its cached QEMU
/// capabilities away on every call and probes QEMU again (seen: `virsh create` 7 s instead of
/// 0.3 s). udev normally gives the device to group `kvm`, mode 0660; containers often lack
/// that rule.
#[cfg_attr(not(feature = "libvirt"), allow(dead_code))]
fn kvm_device_problem(dev: &Path) -> Option<String> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta = std::fs::metadata(dev).ok()?;
    let mode = meta.permissions().mode();
    let others = mode & 0o006 == 0o006;
    let group = mode & 0o060 == 0o060 && meta.gid() != 0;
    (!others && !group).then(|| {
        format!(
            "{} is {:o} and owned by root only: QEMU cannot use KVM and libvirt re-probes QEMU on every call (slow); give it to the kvm group as udev does: chgrp kvm {0}; chmod 660 {0}",
            dev.display(),
            mode & 0o777
        )
    })
}

/// The first directory on the way to `dir` that other users cannot pass through (no `o+x`).
fn untraversable_ancestor(dir: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    dir.ancestors()
        .filter_map(|a| std::fs::metadata(a).ok().map(|m| (a, m)))
        .find(|(_, m)| m.is_dir() && m.permissions().mode() & 0o001 == 0)
        .map(|(a, _)| a.to_path_buf())
}

/// The host's problems for running guests, each in a sentence that says what to do; empty
/// when there are none. `libvirt_reachable` is the result of connecting (the driver does
/// that); the rest is checked here.
pub fn host_problems(
    opts: &LibvirtNodeOptions,
    libvirt_reachable: Result<(), String>,
) -> Vec<String> {
    let mut problems = Vec::new();
    if !libvirt_compiled() {
        problems.push(
            "this canopy was built without the libvirt driver: build it with `--features libvirt` (needs libvirt-dev)".into(),
        );
    }
    if let Err(e) = libvirt_reachable {
        problems.push(format!(
            "libvirtd is not reachable at {}: {e} (install libvirt-daemon-system and start libvirtd)",
            opts.uri
        ));
    }
    if find_qemu().is_none() {
        problems
            .push("no QEMU: qemu-system-x86_64 is not on PATH (install qemu-system-x86)".into());
    }
    if find_program("qemu-img").is_none() {
        problems.push("no qemu-img on PATH (install qemu-utils)".into());
    }
    for (what, dir) in [
        ("image cache", &opts.image_cache_dir),
        ("instances", &opts.instances_dir),
        ("volumes", &opts.volumes_dir),
    ] {
        if let Err(e) = std::fs::create_dir_all(dir) {
            problems.push(format!(
                "cannot create the {what} directory {}: {e}",
                dir.display()
            ));
        }
    }
    if opts.uri.ends_with("/system") {
        for dir in [
            &opts.image_cache_dir,
            &opts.instances_dir,
            &opts.volumes_dir,
        ] {
            if let Some(blocked) = untraversable_ancestor(dir) {
                problems.push(format!(
                    "QEMU runs as its own user under {} and cannot reach {}: {} is not searchable by others (chmod o+x it, or choose another state_dir)",
                    opts.uri,
                    dir.display(),
                    blocked.display()
                ));
            }
        }
    }
    match free_bytes(&opts.image_cache_dir) {
        Some(free) if free < MIN_CACHE_FREE_BYTES => problems.push(format!(
            "no space for the image cache: {} has {} MiB free, at least {} MiB are needed",
            opts.image_cache_dir.display(),
            free >> 20,
            MIN_CACHE_FREE_BYTES >> 20
        )),
        _ => {}
    }
    problems
}

/// The accelerator to use and why: the configured one, or the probe's choice.
pub async fn choose_accelerator(
    choice: AcceleratorChoice,
    scratch: &Path,
) -> (Accelerator, String) {
    match choice {
        AcceleratorChoice::Kvm => (Accelerator::Kvm, "KVM, as configured".into()),
        AcceleratorChoice::Qemu => (
            Accelerator::Tcg,
            "software emulation (TCG), as configured".into(),
        ),
        AcceleratorChoice::Auto => {
            let Some(qemu) = find_qemu() else {
                return (
                    Accelerator::Tcg,
                    "software emulation: no QEMU to probe".into(),
                );
            };
            let probe = crate::accel::probe(&qemu, scratch).await;
            tracing::info!(chosen = ?probe.chosen, reason = %probe.reason, "accelerator probed");
            (probe.chosen, probe.reason)
        }
    }
}

/// Checks the host, then connects the libvirt driver with the node's image cache filled
/// from its CC. Every problem found is in the error, one per line.
#[cfg(feature = "libvirt")]
pub async fn connect_libvirt(opts: &LibvirtNodeOptions) -> Result<Arc<dyn Hypervisor>, String> {
    use crate::image_cache::ImageCache;
    use crate::image_fetch::CcImageFetcher;
    use crate::libvirt::{ImageSource, LibvirtConfig, LibvirtHypervisor};

    let reachable = {
        let uri = opts.uri.clone();
        tokio::task::spawn_blocking(move || {
            virt::error::clear_error_callback();
            virt::connect::Connect::open(Some(&uri))
                .map(drop)
                .map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| e.to_string())?
    };
    let problems = host_problems(opts, reachable);
    if !problems.is_empty() {
        return Err(problems.join("\n"));
    }
    // Guests still run (without KVM), only slower to define and start: said, not refused.
    if let Some(problem) = kvm_device_problem(Path::new("/dev/kvm")) {
        tracing::warn!("{problem}");
    }
    let (accelerator, accelerator_reason) =
        choose_accelerator(opts.accelerator, &opts.instances_dir).await;
    let cache = ImageCache::open(&opts.image_cache_dir, opts.image_cache_max_bytes)
        .map_err(|e| e.to_string())?;
    let fetcher = CcImageFetcher::new(&opts.cc_endpoint)?;
    let driver = LibvirtHypervisor::connect(
        LibvirtConfig {
            uri: opts.uri.clone(),
            accelerator,
            accelerator_reason,
            instances_dir: opts.instances_dir.clone(),
            volumes_dir: opts.volumes_dir.clone(),
            disk_gib: opts.disk_gib,
        },
        ImageSource {
            cache: Arc::new(cache),
            fetcher: Arc::new(fetcher),
        },
    )
    .await
    .map_err(|e| e.to_string())?;
    Ok(driver)
}

/// Without the `libvirt` feature: says so (with whatever else is missing).
#[cfg(not(feature = "libvirt"))]
pub async fn connect_libvirt(opts: &LibvirtNodeOptions) -> Result<Arc<dyn Hypervisor>, String> {
    Err(host_problems(opts, Ok(())).join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(dir: &Path) -> LibvirtNodeOptions {
        LibvirtNodeOptions {
            uri: "qemu:///system".into(),
            accelerator: AcceleratorChoice::Qemu,
            instances_dir: dir.join("instances"),
            volumes_dir: dir.join("volumes"),
            image_cache_dir: dir.join("cache"),
            image_cache_max_bytes: 1 << 30,
            disk_gib: 10,
            cc_endpoint: "http://127.0.0.1:1".into(),
        }
    }

    #[test]
    fn problems_are_named_with_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let problems = host_problems(&opts(dir.path()), Err("connection refused".into()));
        assert!(
            problems.iter().any(
                |p| p.contains("libvirtd is not reachable") && p.contains("connection refused")
            ),
            "{problems:?}"
        );
        // A directory that cannot be made (a file is in the way).
        let blocked = dir.path().join("file");
        std::fs::write(&blocked, b"").unwrap();
        let mut o = opts(dir.path());
        o.image_cache_dir = blocked.join("cache");
        let problems = host_problems(&o, Ok(()));
        assert!(
            problems
                .iter()
                .any(|p| p.contains("cannot create the image cache directory")),
            "{problems:?}"
        );
    }

    #[test]
    fn a_state_dir_qemu_cannot_reach_is_named() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let private = dir.path().join("private");
        std::fs::create_dir(&private).unwrap();
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
        let mut o = opts(&private);
        o.uri = "qemu:///system".into();
        let problems = host_problems(&o, Ok(()));
        assert!(
            problems
                .iter()
                .any(|p| p.contains("cannot reach") && p.contains("private")),
            "{problems:?}"
        );
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o755)).unwrap();
        let problems = host_problems(&o, Ok(()));
        assert!(
            !problems.iter().any(|p| p.contains("private")),
            "{problems:?}"
        );
    }

    #[test]
    fn a_kvm_device_only_root_can_open_is_named() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let dev = dir.path().join("kvm");
        std::fs::write(&dev, b"").unwrap();
        std::fs::set_permissions(&dev, std::fs::Permissions::from_mode(0o600)).unwrap();
        // The test runs as whoever owns the file; only the mode decides for group 0 files.
        let owned_by_root_group = {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(&dev).unwrap().gid() == 0
        };
        assert!(kvm_device_problem(&dev).is_some_and(|p| p.contains("chmod 660")));
        std::fs::set_permissions(&dev, std::fs::Permissions::from_mode(0o666)).unwrap();
        assert_eq!(kvm_device_problem(&dev), None);
        std::fs::set_permissions(&dev, std::fs::Permissions::from_mode(0o660)).unwrap();
        assert_eq!(kvm_device_problem(&dev).is_some(), owned_by_root_group);
        assert_eq!(kvm_device_problem(&dir.path().join("absent")), None);
    }

    #[test]
    fn accelerator_names_parse() {
        assert_eq!("auto".parse(), Ok(AcceleratorChoice::Auto));
        assert_eq!("tcg".parse(), Ok(AcceleratorChoice::Qemu));
        assert!("xen".parse::<AcceleratorChoice>().is_err());
    }
}
