//! The libvirt driver against a real libvirtd (`qemu:///system`) with the test guest
//! (deploy/guest/build-test-guest.sh): define, boot, console, ACPI shutdown, start again,
//! reboot, destroy, undefine. Skipped without libvirtd, except under CI (CI=true), where
//! .ci/run installs and starts it.
#![cfg(feature = "libvirt")]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use canopy_common::{ImageId, InstanceId, Resources};
use canopy_node_controller::domain_xml::Accelerator;
use canopy_node_controller::libvirt::{LibvirtConfig, LibvirtHypervisor};
use canopy_node_controller::{DomainSpec, DomainState, Hypervisor, HypervisorError};

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
    let images = scratch.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    let (emi, eki, eri) = (
        ImageId::generate(),
        ImageId::generate(),
        ImageId::generate(),
    );
    for (id, file) in [(&emi, "disk.qcow2"), (&eki, "vmlinuz"), (&eri, "initrd.gz")] {
        std::fs::copy(guest.join(file), images.join(id.as_str())).unwrap();
    }
    let hv = LibvirtHypervisor::connect(LibvirtConfig {
        uri: "qemu:///system".into(),
        // Software emulation: works on every host, nested included.
        accelerator: Accelerator::Tcg,
        instances_dir: scratch.path().join("instances"),
        images_dir: images,
        disk_gib: 100,
    })
    .await
    .expect("connect");
    assert!(hv.capacity().vcpus >= 1 && hv.capacity().memory_mib >= 256);

    // An image that is not there: refused, and nothing is left behind.
    let lost = InstanceId::generate();
    let mut bad = DomainSpec::new(
        lost.clone(),
        Resources::new(1, 256, 1),
        emi.clone(),
        Vec::new(),
    );
    bad.kernel_id = Some(ImageId::generate());
    assert!(
        matches!(hv.define(&bad).await, Err(HypervisorError::Failed(m)) if m.contains("is not in"))
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
    let mut spec = DomainSpec::new(id.clone(), Resources::new(1, 256, 1), emi, Vec::new());
    spec.kernel_id = Some(eki);
    spec.ramdisk_id = Some(eri);
    hv.define(&spec).await.expect("define");
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

    // Start again: a second boot, logged after the first.
    hv.start(&id).await.expect("start again");
    wait_until(
        "the guest boots again",
        Duration::from_secs(90),
        async || (console_count(&hv, &id, &boot_line).await == 2).then_some(()),
    )
    .await;

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

    // Terminate: destroy and undefine leave no domain and no files.
    hv.destroy(&id).await.expect("destroy");
    assert_eq!(hv.state(&id).await.unwrap(), Some(DomainState::ShutOff));
    hv.undefine(&id).await.expect("undefine");
    assert_eq!(hv.state(&id).await.unwrap(), None);
    assert!(!scratch.path().join("instances").join(id.as_str()).exists());
    assert!(matches!(
        hv.start(&id).await,
        Err(HypervisorError::NotFound(_))
    ));
}
