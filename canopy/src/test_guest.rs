//! The test guest in the all-in-one cloud with real guests: `canopy dev --hypervisor
//! libvirt` builds it (deploy/guest/build-test-guest.sh, embedded in the binary) into
//! `DATA_DIR/test-guest` and registers it, kernel and ramdisk included, as the public
//! machine image [`TEST_GUEST_NAME`] — so `aws ec2 run-instances` boots a real kernel on a
//! fresh machine with nothing else prepared.

use std::path::Path;

use anyhow::{Context, Result, bail};
use canopy_cloud_controller::Clc;
use canopy_cloud_controller::state::{Command, Image};
use canopy_common::{ImageId, ImageKind};

use crate::bootstrap::AdminCredentials;

/// The machine image's name (DescribeImages `--filters Name=name,Values=canopy-test-guest`).
pub const TEST_GUEST_NAME: &str = "canopy-test-guest";

const BUILD_SCRIPT: &str = include_str!("../../deploy/guest/build-test-guest.sh");

/// Builds and registers the test guest unless it is registered already. A guest that cannot
/// be built (no Debian package lists, say) is reported and skipped: the cloud still runs.
pub async fn register_if_buildable(clc: &Clc, admin: &AdminCredentials, data_dir: &Path) {
    match register(clc, admin, data_dir).await {
        Ok(Some(id)) => tracing::info!(image = %id, "test guest registered as {TEST_GUEST_NAME}"),
        Ok(None) => {}
        Err(e) => tracing::warn!("the test guest was not registered: {e:#}"),
    }
}

async fn register(clc: &Clc, admin: &AdminCredentials, data_dir: &Path) -> Result<Option<ImageId>> {
    let images = clc.store.images().await?;
    if images
        .iter()
        .any(|i| i.name == TEST_GUEST_NAME && i.state == "available")
    {
        return Ok(None);
    }
    let dir = data_dir.join("test-guest");
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let script = dir.join("build-test-guest.sh");
    std::fs::write(&script, BUILD_SCRIPT).with_context(|| format!("write {}", script.display()))?;
    tracing::info!(dir = %dir.display(), "building the test guest from Debian packages");
    let out = tokio::process::Command::new("bash")
        .arg(&script)
        .arg(&dir)
        .output()
        .await
        .context("run bash")?;
    if !out.status.success() {
        bail!(
            "build-test-guest.sh failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let version = std::fs::read_to_string(dir.join("VERSION")).unwrap_or_default();
    let mut ids = Vec::new();
    for (file, want) in [
        ("vmlinuz", ImageKind::Kernel),
        ("initrd.gz", ImageKind::Ramdisk),
        ("disk.qcow2", ImageKind::Machine),
    ] {
        let path = dir.join(file);
        let imported = clc
            .images
            .import(&path.display().to_string())
            .await
            .with_context(|| format!("import {}", path.display()))?;
        if imported.kind != want {
            bail!(
                "{} is a {} image, expected a {want} image",
                path.display(),
                imported.kind
            );
        }
        let image_id = want.generate_id();
        let (kernel_id, ramdisk_id) = match want {
            ImageKind::Machine => (ids.first().cloned(), ids.get(1).cloned()),
            _ => (None, None),
        };
        let name = match want {
            ImageKind::Machine => TEST_GUEST_NAME.to_owned(),
            kind => format!("{TEST_GUEST_NAME}-{kind}"),
        };
        clc.submit(Command::RegisterImage {
            image: Image {
                image_id: image_id.clone(),
                owner_id: admin.account_id.clone(),
                name,
                description: format!(
                    "Canopy's test guest ({}): prints 'canopy-test-guest: instance <id> is up' on its console",
                    version.trim().replace('\n', ", ")
                ),
                location: path.display().to_string(),
                architecture: "x86_64".into(),
                is_public: true,
                state: "available".into(),
                created_at: chrono::Utc::now(),
                kind: want,
                kernel_id,
                ramdisk_id,
                sha256: Some(imported.sha256),
                size_bytes: imported.size,
                disk_format: imported.disk_format.map(str::to_owned),
                launch_permissions: vec![],
                root_snapshot: None,
                source_instance_id: None,
                state_reason: None,
            },
        })
        .await?;
        ids.push(image_id);
    }
    Ok(ids.pop())
}
