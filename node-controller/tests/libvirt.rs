//! The libvirt driver against a real libvirtd (`qemu:///system`) with the test guest
//! (deploy/guest/build-test-guest.sh): define, boot, console, ACPI shutdown, start again,
//! reboot, volumes attached to the running and to the shut-off guest, snapshots, the
//! flattened copy of a stopped guest's root disk (CreateImage) booting a second guest,
//! destroy, undefine. Skipped without libvirtd, except under CI (CI=true), where
//! .ci/run installs and starts it.
#![cfg(feature = "libvirt")]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use canopy_common::{
    ImageKind, ImageRef, InstanceId, Resources, Sha256Digest, VolumeAttachment, VolumeId,
};
use canopy_node_controller::domain_xml::Accelerator;
use canopy_node_controller::image_cache::{ImageCache, ImageFetcher, ImageStream};
use canopy_node_controller::libvirt::{ImageSource, LibvirtConfig, LibvirtHypervisor};
use canopy_node_controller::{DomainSpec, DomainState, Hypervisor, HypervisorError};
use sha2::{Digest, Sha256};

const BOOT_LINE: &str = "is up";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The test guest, built once (the script keeps a finished build).
fn guest() -> PathBuf {
    let out = repo().join("target/test-guest");
    let status = std::process::Command::new(repo().join("deploy/guest/build-test-guest.sh"))
        .arg(&out)
        .status()
        .expect("run build-test-guest.sh");
    assert!(status.success(), "build-test-guest.sh failed");
    out
}

/// Serves image files by digest and counts the fetches.
#[derive(Default)]
struct FileFetcher {
    files: Mutex<HashMap<Sha256Digest, PathBuf>>,
    fetches: Mutex<usize>,
}

impl FileFetcher {
    fn add(&self, kind: ImageKind, path: &Path) -> ImageRef {
        let bytes = std::fs::read(path).unwrap();
        let digest: [u8; 32] = Sha256::digest(&bytes).into();
        let image = ImageRef {
            image_id: kind.generate_id(),
            sha256: Sha256Digest::from_bytes(&digest),
            size: bytes.len() as u64,
        };
        self.files
            .lock()
            .unwrap()
            .insert(image.sha256.clone(), path.to_owned());
        image
    }

    fn count(&self) -> usize {
        *self.fetches.lock().unwrap()
    }
}

#[async_trait::async_trait]
impl ImageFetcher for FileFetcher {
    async fn fetch(&self, sha256: &Sha256Digest) -> Result<ImageStream, String> {
        *self.fetches.lock().unwrap() += 1;
        let path = self.files.lock().unwrap().get(sha256).cloned();
        let path = path.ok_or_else(|| format!("no such image {sha256}"))?;
        let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
        Ok(Box::pin(tokio_stream::iter(vec![Ok(bytes)])))
    }
}

fn libvirt_available() -> bool {
    let up = Path::new("/run/libvirt/libvirt-sock").exists();
    assert!(
        up || std::env::var_os("CI").is_none(),
        "libvirtd is not running under CI"
    );
    up
}

async fn wait_until<T>(what: &str, timeout: Duration, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Destroys and undefines the test's domains when the test ends, passed or failed: a failed
/// run must not leave a guest holding the host's vCPUs (later tests on the host would find
/// no room). Declared after the scratch directory, so it runs before that goes.
struct Domains(Vec<InstanceId>);

impl Drop for Domains {
    fn drop(&mut self) {
        for id in &self.0 {
            for verb in ["destroy", "undefine"] {
                // Absent (the test removed it) or not running: nothing to do.
                let _ = std::process::Command::new("virsh")
                    .args(["-c", "qemu:///system", verb, id.as_str()])
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .status();
            }
        }
    }
}

async fn console_count(hv: &LibvirtHypervisor, id: &InstanceId, line: &str) -> usize {
    let console = hv.console(id).await.expect("console");
    String::from_utf8_lossy(&console).matches(line).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_boots_stops_starts_reboots_and_goes_away() {
    if !libvirt_available() {
        eprintln!("skipped: libvirtd is not running");
        return;
    }
    let guest = guest();
    let scratch = tempfile::tempdir_in(repo().join("target")).unwrap();
    let mut domains = Domains(Vec::new());
    let fetcher = Arc::new(FileFetcher::default());
    let emi = fetcher.add(ImageKind::Machine, &guest.join("disk.qcow2"));
    let eki = fetcher.add(ImageKind::Kernel, &guest.join("vmlinuz"));
    let eri = fetcher.add(ImageKind::Ramdisk, &guest.join("initrd.gz"));
    let cache = Arc::new(ImageCache::open(scratch.path().join("cache"), 1 << 30).unwrap());
    let hv = LibvirtHypervisor::connect(
        LibvirtConfig {
            uri: "qemu:///system".into(),
            // Software emulation: works on every host, nested included.
            accelerator: Accelerator::Tcg,
            accelerator_reason: "software emulation, for the test".into(),
            instances_dir: scratch.path().join("instances"),
            volumes_dir: scratch.path().join("volumes"),
            disk_gib: 100,
        },
        ImageSource {
            cache: cache.clone(),
            fetcher: fetcher.clone(),
        },
    )
    .await
    .expect("connect");
    assert!(hv.capacity().vcpus >= 1 && hv.capacity().memory_mib >= 256);

    // An image the fetcher cannot deliver: refused, and nothing is left behind.
    let lost = InstanceId::generate();
    let mut bad = DomainSpec::new(
        lost.clone(),
        Resources::new(1, 256, 1),
        emi.image_id.clone(),
        Vec::new(),
    );
    bad.boot.disk = Some(emi.clone());
    bad.boot.kernel = Some(ImageRef {
        image_id: ImageKind::Kernel.generate_id(),
        sha256: Sha256Digest::from_bytes(&[7; 32]),
        size: 10,
    });
    assert!(
        matches!(hv.define(&bad).await, Err(HypervisorError::Failed(m)) if m.contains("no such image")),
    );
    // An image without content cannot be launched on a real node.
    let mut empty = DomainSpec::new(
        lost.clone(),
        Resources::new(1, 256, 1),
        emi.image_id.clone(),
        Vec::new(),
    );
    empty.boot.disk = None;
    assert!(
        matches!(hv.define(&empty).await, Err(HypervisorError::Failed(m)) if m.contains("no content")),
    );
    assert_eq!(hv.state(&lost).await.unwrap(), None);
    assert!(
        !scratch
            .path()
            .join("instances")
            .join(lost.as_str())
            .exists()
    );

    let id = InstanceId::generate();
    domains.0.push(id.clone());
    let mut spec = DomainSpec::new(
        id.clone(),
        Resources::new(1, 256, 1),
        emi.image_id.clone(),
        Vec::new(),
    );
    spec.boot.disk = Some(emi.clone());
    spec.boot.kernel = Some(eki.clone());
    spec.boot.ramdisk = Some(eri.clone());
    let fetched = fetcher.count();
    hv.define(&spec).await.expect("define");
    // Fetched once into the cache (the failed define above had fetched the disk already).
    assert_eq!(fetcher.count(), fetched + 2);
    for image in [&emi, &eki, &eri] {
        assert!(cache.contains(&image.sha256));
    }
    assert_eq!(hv.state(&id).await.unwrap(), Some(DomainState::ShutOff));
    assert!(matches!(
        hv.define(&spec).await,
        Err(HypervisorError::AlreadyExists(_))
    ));
    assert!(hv.list().await.unwrap().iter().any(|d| d.instance_id == id));
    let mut events = hv.events();

    // Boot: the guest names its instance on the console.
    hv.start(&id).await.expect("start");
    let boot_line = format!("instance {id} {BOOT_LINE}");
    wait_until("the guest boots", Duration::from_secs(90), async || {
        (console_count(&hv, &id, &boot_line).await == 1).then_some(())
    })
    .await;
    assert_eq!(hv.state(&id).await.unwrap(), Some(DomainState::Running));
    let event = tokio::time::timeout(Duration::from_secs(5), events.recv())
        .await
        .expect("an event within a poll")
        .expect("event");
    assert_eq!(event.instance_id, id);

    // A volume: its bytes made at the first attach (a qcow2 file of the volume's size),
    // attached to the running guest and to the definition; detached again.
    let volume = |device: &str| VolumeAttachment {
        volume_id: VolumeId::generate(),
        device: device.into(),
        size_gib: 2,
        initialized: false,
        source: None,
    };
    let listed = async |hv: &LibvirtHypervisor| -> Vec<VolumeId> {
        let all = hv.list().await.unwrap();
        all.into_iter()
            .find(|d| d.instance_id == id)
            .map(|d| d.volumes)
            .unwrap_or_default()
    };
    let data = volume("/dev/sdf");
    hv.attach_volume(&id, &data)
        .await
        .expect("attach to the running guest");
    let file = scratch
        .path()
        .join("volumes")
        .join(format!("{}.qcow2", data.volume_id));
    let info = std::process::Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(&file)
        .output()
        .expect("qemu-img info");
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).expect("json");
    assert_eq!(info["virtual-size"], 2u64 << 30, "{info}");
    assert_eq!(listed(&hv).await, vec![data.volume_id.clone()]);
    hv.detach_volume(&id, &data.volume_id)
        .await
        .expect("detach");
    wait_until(
        "the guest lets the volume go",
        Duration::from_secs(60),
        async || listed(&hv).await.is_empty().then_some(()),
    )
    .await;
    assert!(file.exists(), "a detached volume keeps its bytes");

    // Snapshot round trip: bytes written into the volume, copied, and a new volume made
    // from the copy (bigger) has them.
    // Reads share the file a guest's QEMU may hold (`-r -U`: force-share needs read-only).
    let qemu_io = |file: &Path, command: &str| {
        let share: &[&str] = if command.starts_with("read") {
            &["-r", "-U"]
        } else {
            &["-n"]
        };
        let out = std::process::Command::new("qemu-io")
            .args(share)
            .args(["-f", "qcow2", "-c", command])
            .arg(file)
            .output()
            .expect("qemu-io");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success() && !text.contains("fail"),
            "{command}: {text}"
        );
    };
    qemu_io(&file, "write -P 0xab 1M 64k");
    let snapshot = async |hv: &LibvirtHypervisor, volume: &VolumeId, to: &Path| {
        use tokio_stream::StreamExt;
        let mut copy = hv
            .snapshot_volume(volume)
            .await
            .expect("snapshot")
            .expect("the node holds the volume");
        let mut bytes = Vec::new();
        while let Some(chunk) = copy.bytes.next().await {
            bytes.extend(chunk.expect("chunk"));
        }
        assert_eq!(bytes.len() as u64, copy.size);
        std::fs::write(to, &bytes).unwrap();
    };
    let copied = scratch.path().join("snapshot.qcow2");
    snapshot(&hv, &data.volume_id, &copied).await;
    assert!(
        hv.snapshot_volume(&VolumeId::generate())
            .await
            .unwrap()
            .is_none(),
        "a volume this node does not hold"
    );
    let content = fetcher.add(ImageKind::Machine, &copied);
    let restored = VolumeAttachment {
        size_gib: 3,
        source: Some(canopy_common::SnapshotRef {
            snapshot_id: canopy_common::SnapshotId::generate(),
            sha256: content.sha256.clone(),
            size: content.size,
        }),
        ..volume("/dev/sdh")
    };
    hv.attach_volume(&id, &restored)
        .await
        .expect("attach a volume made from the snapshot");
    let restored_file = scratch
        .path()
        .join("volumes")
        .join(format!("{}.qcow2", restored.volume_id));
    qemu_io(&restored_file, "read -P 0xab 1M 64k");
    qemu_io(&restored_file, "read -P 0 0 64k");
    let info = std::process::Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(&restored_file)
        .output()
        .expect("qemu-img info");
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).expect("json");
    assert_eq!(info["virtual-size"], 3u64 << 30, "{info}");
    // A snapshot of a volume attached to the running guest pauses it for the copy only.
    let again = scratch.path().join("snapshot-live.qcow2");
    snapshot(&hv, &restored.volume_id, &again).await;
    assert_eq!(hv.state(&id).await.unwrap(), Some(DomainState::Running));
    qemu_io(&again, "read -P 0xab 1M 64k");
    hv.detach_volume(&id, &restored.volume_id)
        .await
        .expect("detach");
    wait_until(
        "the guest lets the restored volume go",
        Duration::from_secs(60),
        async || listed(&hv).await.is_empty().then_some(()),
    )
    .await;
    hv.delete_volume(&restored.volume_id).await.expect("delete");

    hv.delete_volume(&data.volume_id).await.expect("delete");
    assert!(!file.exists());
    hv.delete_volume(&data.volume_id)
        .await
        .expect("nothing left to delete is fine");
    // A volume attached before (somewhere) whose bytes this node lacks is refused, not
    // replaced by an empty disk.
    let elsewhere = VolumeAttachment {
        initialized: true,
        ..volume("/dev/sdi")
    };
    assert!(matches!(
        hv.attach_volume(&id, &elsewhere).await,
        Err(HypervisorError::Failed(m)) if m.contains("another node")
    ));
    assert!(listed(&hv).await.is_empty());

    // Undefining a running domain is refused.
    assert!(matches!(
        hv.undefine(&id).await,
        Err(HypervisorError::InvalidState { .. })
    ));

    // ACPI shutdown: the guest powers itself off; the domain stays defined, shut off.
    wait_until(
        "the guest waits for the power button",
        Duration::from_secs(30),
        async || (console_count(&hv, &id, "waits for an ACPI power-off").await == 1).then_some(()),
    )
    .await;
    hv.shutdown(&id).await.expect("shutdown");
    wait_until(
        "the domain is shut off",
        Duration::from_secs(60),
        async || (hv.state(&id).await.unwrap() == Some(DomainState::ShutOff)).then_some(()),
    )
    .await;

    // A volume attached while shut off goes into the definition, and boots with the guest.
    let logs = volume("/dev/xvdg");
    hv.attach_volume(&id, &logs)
        .await
        .expect("attach to the stopped guest");
    assert_eq!(listed(&hv).await, vec![logs.volume_id.clone()]);

    // Its instance type changed while stopped: redefined with more memory, keeping its
    // disks (the root overlay and the volume just attached).
    let size = async |hv: &LibvirtHypervisor| {
        hv.list()
            .await
            .unwrap()
            .into_iter()
            .find(|d| d.instance_id == id)
            .map(|d| d.resources)
    };
    assert_eq!(size(&hv).await, Some(Resources::new(1, 256, 0)));
    hv.resize(&id, Resources::new(1, 384, 1))
        .await
        .expect("resize the stopped guest");
    assert_eq!(size(&hv).await, Some(Resources::new(1, 384, 0)));
    assert_eq!(listed(&hv).await, vec![logs.volume_id.clone()]);
    assert!(matches!(
        hv.resize(&id, Resources::new(1, 1 << 40, 1)).await,
        Err(HypervisorError::InsufficientCapacity { .. })
    ));

    // CreateImage's copy of the shut-off guest's root disk: bytes written into its overlay
    // are in the copy, which is one standalone image (no backing file: the machine image
    // under the overlay is flattened into it) of the root's size, and boots a new guest
    // whose root starts with those bytes.
    let root = scratch
        .path()
        .join("instances")
        .join(id.as_str())
        .join("root.qcow2");
    qemu_io(&root, "write -P 0xcd 2M 64k");
    let flattened = scratch.path().join("image.qcow2");
    {
        use tokio_stream::StreamExt;
        let mut copy = hv
            .snapshot_root(&id)
            .await
            .expect("copy the root disk")
            .expect("the domain is here");
        let mut bytes = Vec::new();
        while let Some(chunk) = copy.bytes.next().await {
            bytes.extend(chunk.expect("chunk"));
        }
        assert_eq!(bytes.len() as u64, copy.size);
        std::fs::write(&flattened, &bytes).unwrap();
    }
    assert!(
        hv.snapshot_root(&InstanceId::generate())
            .await
            .unwrap()
            .is_none(),
        "an instance this node has no domain for"
    );
    let info = std::process::Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(&flattened)
        .output()
        .expect("qemu-img info");
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).expect("json");
    assert_eq!(info["format"], "qcow2", "{info}");
    assert!(info.get("backing-filename").is_none(), "standalone: {info}");
    assert_eq!(info["virtual-size"], 1u64 << 30, "{info}");
    qemu_io(&flattened, "read -P 0xcd 2M 64k");
    qemu_io(&flattened, "read -P 0 0 64k");
    assert!(
        std::fs::read_dir(scratch.path().join("instances"))
            .unwrap()
            .all(|e| !e
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with(".image-")),
        "the copy's scratch file is gone once read"
    );
    let made = fetcher.add(ImageKind::Machine, &flattened);
    let child = InstanceId::generate();
    domains.0.push(child.clone());
    let mut child_spec = DomainSpec::new(
        child.clone(),
        Resources::new(1, 256, 1),
        made.image_id.clone(),
        Vec::new(),
    );
    child_spec.boot.disk = Some(made.clone());
    child_spec.boot.kernel = Some(eki.clone());
    child_spec.boot.ramdisk = Some(eri.clone());
    hv.define(&child_spec)
        .await
        .expect("define from the made image");
    let child_root = scratch
        .path()
        .join("instances")
        .join(child.as_str())
        .join("root.qcow2");
    qemu_io(&child_root, "read -P 0xcd 2M 64k");
    hv.start(&child).await.expect("start the child");
    let child_line = format!("instance {child} {BOOT_LINE}");
    wait_until(
        "the guest from the made image boots",
        Duration::from_secs(90),
        async || (console_count(&hv, &child, &child_line).await == 1).then_some(()),
    )
    .await;
    // A running guest's root disk is never copied.
    assert!(matches!(
        hv.snapshot_root(&child).await,
        Err(HypervisorError::InvalidState { .. })
    ));
    hv.destroy(&child).await.expect("destroy the child");
    hv.undefine(&child).await.expect("undefine the child");

    // Start again: a second boot, logged after the first, with the new size.
    hv.start(&id).await.expect("start again");
    wait_until(
        "the guest boots again",
        Duration::from_secs(90),
        async || (console_count(&hv, &id, &boot_line).await == 2).then_some(()),
    )
    .await;
    assert_eq!(size(&hv).await, Some(Resources::new(1, 384, 0)));
    assert!(matches!(
        hv.resize(&id, Resources::new(1, 256, 1)).await,
        Err(HypervisorError::InvalidState { .. })
    ));

    // Reboot (ACPI): the guest powers off and libvirt starts it again.
    wait_until(
        "the guest waits again",
        Duration::from_secs(30),
        async || (console_count(&hv, &id, "waits for an ACPI power-off").await == 2).then_some(()),
    )
    .await;
    hv.reboot(&id).await.expect("reboot");
    wait_until(
        "the guest boots a third time",
        Duration::from_secs(90),
        async || (console_count(&hv, &id, &boot_line).await == 3).then_some(()),
    )
    .await;
    assert_eq!(hv.state(&id).await.unwrap(), Some(DomainState::Running));
    assert_eq!(
        listed(&hv).await,
        vec![logs.volume_id.clone()],
        "the stopped guest's volume is attached to the running one"
    );

    // Terminate: destroy and undefine leave no domain and no files.
    hv.destroy(&id).await.expect("destroy");
    assert_eq!(hv.state(&id).await.unwrap(), Some(DomainState::ShutOff));
    hv.undefine(&id).await.expect("undefine");
    assert_eq!(hv.state(&id).await.unwrap(), None);
    assert!(!scratch.path().join("instances").join(id.as_str()).exists());
    assert!(
        scratch
            .path()
            .join("volumes")
            .join(format!("{}.qcow2", logs.volume_id))
            .exists(),
        "a volume outlives its instance"
    );
    assert!(matches!(
        hv.start(&id).await,
        Err(HypervisorError::NotFound(_))
    ));
}
