//! First-start bootstrap shared by `canopy clc` and `canopy dev`: the admin account and
//! its keys, the admin token, a runnable image, and the canopyrc file.

use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use canopy_cloud_controller::Clc;
use canopy_cloud_controller::state::{Command, Image};
use canopy_common::{AccountId, ImageId};
use chrono::Utc;

pub const ADMIN_ACCOUNT: &str = "admin";
/// The image every Canopy registers at first start: runnable on simulated nodes.
pub const SIM_IMAGE_NAME: &str = "canopy-sim-linux";
pub const ENV_ACCESS_KEY: &str = "CANOPY_ADMIN_ACCESS_KEY_ID";
pub const ENV_SECRET: &str = "CANOPY_ADMIN_SECRET_ACCESS_KEY";

#[derive(Debug, Clone)]
pub struct AdminCredentials {
    pub account_id: AccountId,
    pub access_key_id: String,
    pub secret_access_key: String,
}

/// Writes `contents` to `path` with mode 0600, atomically (temp file + rename), so a
/// reader never sees half a secret.
pub fn write_secret_file(path: &Path, contents: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// The admin API token kept in `DIR/admin-token`, created on first use.
pub fn admin_token(data_dir: &Path) -> Result<String> {
    let path = data_dir.join("admin-token");
    if let Ok(t) = std::fs::read_to_string(&path) {
        let t = t.trim().to_owned();
        if !t.is_empty() {
            return Ok(t);
        }
    }
    let token = canopy_cloud_controller::credentials::new_token();
    write_secret_file(&path, &format!("{token}\n"))?;
    Ok(token)
}

/// Credentials given in the environment, checked.
fn env_credentials() -> Result<Option<(String, String)>> {
    let ak = std::env::var(ENV_ACCESS_KEY).ok().filter(|s| !s.is_empty());
    let sk = std::env::var(ENV_SECRET).ok().filter(|s| !s.is_empty());
    match (ak, sk) {
        (None, None) => Ok(None),
        (Some(ak), Some(sk)) => {
            if !(3..=128).contains(&ak.len()) || !ak.bytes().all(|b| b.is_ascii_alphanumeric()) {
                bail!("{ENV_ACCESS_KEY}: 3 to 128 letters and digits");
            }
            if !(8..=128).contains(&sk.len())
                || sk
                    .bytes()
                    .any(|b| b.is_ascii_whitespace() || b.is_ascii_control() || b == b'\'')
            {
                bail!("{ENV_SECRET}: 8 to 128 printable characters without spaces or quotes");
            }
            Ok(Some((ak, sk)))
        }
        _ => bail!("set both {ENV_ACCESS_KEY} and {ENV_SECRET}, or neither"),
    }
}

/// Makes sure the admin account exists with usable keys, and the sim image is registered.
/// The leader writes what is missing; another replica waits until the log brings it (a
/// replica that joins an existing group waits until it has been added and caught up).
pub async fn bootstrap(clc: &Clc) -> Result<AdminCredentials> {
    let wanted = env_credentials()?;
    let mut waiting_since = std::time::Instant::now();
    loop {
        if clc.replica.is_leader() {
            match bootstrap_as_leader(clc, wanted.clone()).await {
                Ok(creds) => return Ok(creds),
                // Leadership moved on mid-way: what was written stays; wait like the others.
                Err(e) if not_leader(&e) => {}
                Err(e) => return Err(e),
            }
        } else if let Some(creds) = bootstrapped(clc, wanted.as_ref()).await? {
            return Ok(creds);
        }
        if waiting_since.elapsed() >= std::time::Duration::from_secs(10) {
            tracing::info!(
                leader = ?clc.replica.leader().map(|(id, _)| id),
                "waiting for the cloud controller group (a leader, or this replica's addition)"
            );
            waiting_since = std::time::Instant::now();
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

fn not_leader(e: &anyhow::Error) -> bool {
    use canopy_cloud_controller::state::StateError;
    matches!(
        e.downcast_ref::<StateError>(),
        Some(StateError::NotLeader { .. } | StateError::Unavailable(_))
    )
}

/// The admin credentials and image, once the log has brought them to this replica.
async fn bootstrapped(
    clc: &Clc,
    wanted: Option<&(String, String)>,
) -> Result<Option<AdminCredentials>> {
    let accounts = clc.store.accounts().await?;
    let Some(admin) = accounts.into_iter().find(|a| a.name == ADMIN_ACCOUNT) else {
        return Ok(None);
    };
    if !clc
        .store
        .images()
        .await?
        .iter()
        .any(|i| i.name == SIM_IMAGE_NAME)
    {
        return Ok(None);
    }
    let key = match choose_key(admin_keys(clc, &admin.account_id).await?, wanted)? {
        KeyChoice::Stored(key) => key,
        // The leader adds the wanted key when it bootstraps with the same environment.
        KeyChoice::Missing(_) | KeyChoice::None => return Ok(None),
    };
    Ok(Some(AdminCredentials {
        account_id: admin.account_id,
        access_key_id: key.0,
        secret_access_key: key.1,
    }))
}

/// The access keys of `account`, with their secrets.
async fn admin_keys(clc: &Clc, account: &AccountId) -> Result<Vec<(String, String)>> {
    Ok(clc
        .store
        .access_keys()
        .await?
        .into_iter()
        .filter(|(_, a, _)| a == account)
        .map(|(k, _, s)| (k, s))
        .collect())
}

/// Which admin key to use.
enum KeyChoice {
    /// A stored key: the wanted one, or the first when none is wanted.
    Stored((String, String)),
    /// The wanted key, not stored yet.
    Missing((String, String)),
    /// No key is wanted and none is stored.
    None,
}

/// Picks the wanted key (from the environment) among the stored ones, or the first stored;
/// refuses a wanted key stored with another secret.
fn choose_key(keys: Vec<(String, String)>, wanted: Option<&(String, String)>) -> Result<KeyChoice> {
    Ok(match wanted {
        Some((ak, sk)) => match keys.into_iter().find(|(k, _)| k == ak) {
            Some((_, stored)) if &stored != sk => {
                bail!("{ENV_ACCESS_KEY} {ak} already exists with another secret")
            }
            Some(found) => KeyChoice::Stored(found),
            None => KeyChoice::Missing((ak.clone(), sk.clone())),
        },
        None => keys
            .into_iter()
            .next()
            .map_or(KeyChoice::None, KeyChoice::Stored),
    })
}

async fn bootstrap_as_leader(
    clc: &Clc,
    wanted: Option<(String, String)>,
) -> Result<AdminCredentials> {
    let accounts = clc.store.accounts().await?;
    let admin = accounts.into_iter().find(|a| a.name == ADMIN_ACCOUNT);
    let creds = match admin {
        None => {
            let (access_key_id, secret_access_key) =
                wanted.unwrap_or_else(canopy_cloud_controller::credentials::new_access_key);
            let account_id = AccountId::generate();
            clc.submit(Command::CreateAccount {
                account_id: account_id.clone(),
                name: ADMIN_ACCOUNT.into(),
                is_admin: true,
                access_key_id: access_key_id.clone(),
                secret_access_key: secret_access_key.clone(),
                at: Utc::now(),
            })
            .await?;
            tracing::info!(%account_id, %access_key_id, "created the admin account");
            AdminCredentials {
                account_id,
                access_key_id,
                secret_access_key,
            }
        }
        Some(admin) => {
            let keys = admin_keys(clc, &admin.account_id).await?;
            let (access_key_id, secret_access_key) = match choose_key(keys, wanted.as_ref())? {
                KeyChoice::Stored(key) => key,
                KeyChoice::Missing((ak, sk)) => {
                    clc.submit(Command::AddAccessKey {
                        account_id: admin.account_id.clone(),
                        access_key_id: ak.clone(),
                        secret_access_key: sk.clone(),
                        at: Utc::now(),
                    })
                    .await?;
                    (ak, sk)
                }
                KeyChoice::None => bail!("the admin account has no access key"),
            };
            AdminCredentials {
                account_id: admin.account_id,
                access_key_id,
                secret_access_key,
            }
        }
    };
    let images = clc.store.images().await?;
    if !images.iter().any(|i| i.name == SIM_IMAGE_NAME) {
        clc.submit(Command::RegisterImage {
            image: Image {
                image_id: ImageId::generate(),
                owner_id: creds.account_id.clone(),
                name: SIM_IMAGE_NAME.into(),
                description: "Simulated Linux guest: boots on Canopy's simulated hypervisor".into(),
                location: "canopy://builtin/sim-linux".into(),
                architecture: "x86_64".into(),
                is_public: true,
                state: "available".into(),
                created_at: Utc::now(),
                kind: canopy_common::ImageKind::Machine,
                kernel_id: None,
                ramdisk_id: None,
                sha256: None,
                size_bytes: 0,
                disk_format: None,
                launch_permissions: vec![],
                root_snapshot: None,
                source_instance_id: None,
                state_reason: None,
            },
        })
        .await?;
    }
    Ok(creds)
}

/// The URL clients use for a listening address (an unspecified address becomes loopback).
pub fn client_url(addr: SocketAddr) -> String {
    let host = if addr.ip().is_unspecified() {
        "127.0.0.1".parse().expect("loopback")
    } else {
        addr.ip()
    };
    format!("http://{}", SocketAddr::new(host, addr.port()))
}

/// Writes `DIR/canopyrc`: `export` lines for the AWS CLI/SDKs and `canopy admin`.
pub fn write_canopyrc(
    data_dir: &Path,
    creds: &AdminCredentials,
    region: &str,
    ec2_addr: SocketAddr,
    admin_addr: SocketAddr,
    admin_token: &str,
) -> Result<PathBuf> {
    let path = data_dir.join("canopyrc");
    let q = |s: &str| format!("'{s}'");
    let text = format!(
        "# Canopy: source this file to point the AWS CLI and SDKs at this cloud.\n\
         export AWS_ENDPOINT_URL_EC2={}\n\
         export AWS_ACCESS_KEY_ID={}\n\
         export AWS_SECRET_ACCESS_KEY={}\n\
         export AWS_DEFAULT_REGION={}\n\
         export CANOPY_ADMIN_ENDPOINT={}\n\
         export CANOPY_ADMIN_TOKEN={}\n",
        q(&client_url(ec2_addr)),
        q(&creds.access_key_id),
        q(&creds.secret_access_key),
        q(region),
        q(&client_url(admin_addr)),
        q(admin_token),
    );
    write_secret_file(&path, &text)?;
    Ok(path)
}
