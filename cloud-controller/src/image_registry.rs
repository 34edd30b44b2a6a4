//! Registering an image, whichever way its bytes arrive: EC2 RegisterImage (a location the
//! CLC reads) and the admin API's upload (the bytes in the request). Both check the request
//! the same way before any byte is stored, and commit the same `RegisterImage` command.

use canopy_common::{AccountId, ImageId, ImageKind};

use crate::clc::Clc;
use crate::images::{ImageStoreError, Imported};
use crate::state::{BootImageError, Command, Image, StateError};

/// What a registration asks for, besides the bytes.
#[derive(Debug, Clone)]
pub struct Registration {
    pub name: String,
    pub description: String,
    pub architecture: String,
    pub kernel_id: Option<ImageId>,
    pub ramdisk_id: Option<ImageId>,
    pub is_public: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum RegistrationError {
    #[error(
        "image names must be 3 to 128 characters of letters, digits, spaces and ()[]./-'@_: {0:?}"
    )]
    InvalidName(String),
    #[error("image name {0} is already in use by an image of this account")]
    DuplicateName(String),
    #[error("{0}")]
    Invalid(String),
    #[error("the image id '[{0}]' does not exist")]
    ImageNotFound(ImageId),
    #[error("{param}: {id} is a {found} image, not a {want} image")]
    WrongKind {
        param: &'static str,
        id: ImageId,
        found: ImageKind,
        want: ImageKind,
    },
    #[error("the bytes are a {0} image: a kernel and a ramdisk belong to machine images")]
    BootImagesOnNonMachine(ImageKind),
    #[error(transparent)]
    Store(#[from] ImageStoreError),
    #[error(transparent)]
    State(#[from] StateError),
}

/// EC2's rule for AMI names: 3 to 128 characters of letters, digits, spaces and `()[]./-'@_`.
pub fn valid_name(name: &str) -> bool {
    (3..=128).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || " ()[]./-'@_".contains(c))
}

impl Registration {
    /// Everything that can be checked before the bytes are read: the name, the
    /// architecture, and the kernel and ramdisk (visible to `account`, available, of their
    /// kind).
    pub async fn check(&self, clc: &Clc, account: &AccountId) -> Result<(), RegistrationError> {
        if !valid_name(&self.name) {
            return Err(RegistrationError::InvalidName(self.name.clone()));
        }
        if self.description.len() > 255 {
            return Err(RegistrationError::Invalid(
                "the description must be at most 255 characters long".into(),
            ));
        }
        if self.architecture != "x86_64" {
            return Err(RegistrationError::Invalid(format!(
                "architecture {:?} is not supported: Canopy runs x86_64 guests",
                self.architecture
            )));
        }
        if self.ramdisk_id.is_some() && self.kernel_id.is_none() {
            return Err(RegistrationError::Invalid(
                "a ramdisk needs a kernel: give the kernel id too".into(),
            ));
        }
        let catalog = clc.store.catalog().await?;
        for (param, id, want) in [
            ("KernelId", &self.kernel_id, ImageKind::Kernel),
            ("RamdiskId", &self.ramdisk_id, ImageKind::Ramdisk),
        ] {
            let Some(id) = id else { continue };
            catalog.boot_image(id, account, want).map_err(|e| match e {
                BootImageError::NotFound => RegistrationError::ImageNotFound(id.clone()),
                BootImageError::WrongKind(found) => RegistrationError::WrongKind {
                    param,
                    id: id.clone(),
                    found,
                    want,
                },
            })?;
        }
        if catalog
            .images
            .iter()
            .any(|i| &i.owner_id == account && i.name == self.name && i.state != "deregistered")
        {
            return Err(RegistrationError::DuplicateName(self.name.clone()));
        }
        Ok(())
    }

    /// Commits the image whose bytes were stored as `imported`; returns its new id.
    pub async fn commit(
        self,
        clc: &Clc,
        account: &AccountId,
        location: String,
        imported: Imported,
    ) -> Result<ImageId, RegistrationError> {
        if imported.kind != ImageKind::Machine
            && (self.kernel_id.is_some() || self.ramdisk_id.is_some())
        {
            return Err(RegistrationError::BootImagesOnNonMachine(imported.kind));
        }
        let image_id = imported.kind.generate_id();
        tracing::info!(
            image = %image_id,
            kind = %imported.kind,
            sha256 = %imported.sha256,
            size = imported.size,
            %location,
            "image registered"
        );
        clc.submit(Command::RegisterImage {
            image: Image {
                image_id: image_id.clone(),
                owner_id: account.clone(),
                name: self.name,
                description: self.description,
                location,
                architecture: self.architecture,
                is_public: self.is_public,
                state: "available".into(),
                created_at: chrono::Utc::now(),
                kind: imported.kind,
                kernel_id: self.kernel_id,
                ramdisk_id: self.ramdisk_id,
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
        Ok(image_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_ec2s_rule() {
        assert!(valid_name("debian-12 (2026.11) [x86_64]/v1.0@lab_'a'"));
        for bad in ["ab", "no*stars", "tab\there", &"x".repeat(129)] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }
}
