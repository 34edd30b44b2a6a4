//! The binary's side of the cloud's PKI: `canopy ca …`, loading a component's TLS
//! directory, and a new node's join.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use canopy_common::NodeId;
use canopy_pki::files::{self, TlsFiles};
use canopy_pki::{CertificateAuthority, Identity, JoinToken, Role, Transport};
use canopy_proto::v1 as pb;

#[derive(Debug, Clone, clap::Subcommand)]
pub enum CaCommand {
    /// Creates the cloud CA in DIR (ca.crt, and ca.key, which signs every certificate:
    /// keep it on the cloud controller replicas only).
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// A name for the cloud, shown in the CA's subject.
        #[arg(long, default_value = "canopy")]
        name: String,
    },
    /// Issues a component's certificate and key from the CA in --ca-dir into --out
    /// (ca.crt, tls.crt, tls.key), ready to be that component's --tls-dir.
    Issue {
        /// Where the CA is (ca.crt, ca.key).
        #[arg(long)]
        ca_dir: PathBuf,
        /// clc (a replica; name = its replica id), zone (a CC; name = its zone) or node
        /// (an NC; name = its node id).
        #[arg(long)]
        role: String,
        #[arg(long)]
        name: String,
        /// Host names or IP addresses to add to the certificate (for other tools; Canopy
        /// itself checks the identity, not the address).
        #[arg(long = "san", value_delimiter = ',')]
        sans: Vec<String>,
        /// The component's TLS directory to write.
        #[arg(long)]
        out: PathBuf,
        /// Copy the CA key too (a cloud controller replica: it signs joining nodes).
        #[arg(long)]
        with_ca_key: bool,
    },
    /// Prints the CA's SHA-256 fingerprint (what join tokens pin).
    Fingerprint {
        #[arg(long)]
        dir: PathBuf,
    },
}

pub fn run(cmd: CaCommand) -> Result<String> {
    match cmd {
        CaCommand::Init { dir, name } => {
            let ca = CertificateAuthority::create(&name)?;
            files::write_ca(&dir, &ca)?;
            Ok(format!(
                "created the cloud CA in {} (fingerprint {})\n",
                dir.display(),
                ca.fingerprint()
            ))
        }
        CaCommand::Issue {
            ca_dir,
            role,
            name,
            sans,
            out,
            with_ca_key,
        } => {
            let ca = files::load_ca(&ca_dir)?
                .with_context(|| format!("{} holds no CA key (ca.key)", ca_dir.display()))?;
            let identity = Identity::new(Role::parse(&role)?, &name)?;
            let (tls, serial) = ca.issue_files(&identity, &sans)?;
            tls.write(&out)?;
            if with_ca_key {
                let key = std::fs::read_to_string(ca_dir.join(files::CA_KEY))?;
                write_private(&out.join(files::CA_KEY), &key)?;
            }
            Ok(format!(
                "issued {identity} (serial {serial}) into {}\n",
                out.display()
            ))
        }
        CaCommand::Fingerprint { dir } => {
            let pem = std::fs::read_to_string(dir.join(files::CA_CERT))
                .with_context(|| format!("cannot read {}", dir.join(files::CA_CERT).display()))?;
            let der = files::pem_certificates(&pem)?;
            let first = der.first().context("ca.crt holds no certificate")?;
            Ok(format!("{}\n", canopy_pki::fingerprint(first)))
        }
    }
}

fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

/// Components outside `canopy dev` talk mutual TLS only.
pub fn required(what: &str, tls_dir: Option<PathBuf>) -> Result<PathBuf> {
    tls_dir.with_context(|| {
        format!(
            "{what} needs a TLS directory (--tls-dir or tls_dir): components authenticate each other with certificates from the cloud CA (see `canopy ca --help` and docs/operations.md); plaintext is only for `canopy dev`"
        )
    })
}

/// At the first start of a new cloud of one replica, an empty TLS directory gets the cloud
/// CA and the replica's certificate: `canopy clc --tls-dir D` alone bootstraps a cloud.
/// Replicas of a group made with `--members` share a CA made beforehand (`canopy ca`).
/// Returns whether it made them.
pub fn bootstrap_ca(dir: &Path, replica_id: u64, cloud_name: &str) -> Result<bool> {
    let empty = !dir.join(files::CA_CERT).exists() && !TlsFiles::present(dir);
    if !empty {
        return Ok(false);
    }
    let ca = CertificateAuthority::create(cloud_name)?;
    files::write_ca(dir, &ca)?;
    let (tls, _) = ca.issue_files(&Identity::new(Role::Clc, &replica_id.to_string())?, &[])?;
    tls.write(dir)?;
    tracing::info!(
        dir = %dir.display(),
        fingerprint = %ca.fingerprint(),
        "created the cloud CA and this replica's certificate (first start of a new cloud); issue the CCs' certificates with `canopy ca issue --ca-dir` on this directory"
    );
    Ok(true)
}

/// The transport of a component's TLS directory.
pub fn transport(dir: &Path) -> Result<Transport> {
    let files = TlsFiles::load(dir).with_context(|| format!("TLS directory {}", dir.display()))?;
    Transport::tls(&files, Default::default())
        .with_context(|| format!("TLS directory {}", dir.display()))
}

/// The CA, when the directory holds its key (a cloud controller replica that signs joins).
pub fn load_ca(dir: &Path) -> Result<Option<std::sync::Arc<CertificateAuthority>>> {
    Ok(files::load_ca(dir)
        .with_context(|| format!("TLS directory {}", dir.display()))?
        .map(std::sync::Arc::new))
}

/// How long a joining node keeps trying a CC (or cloud) that does not answer yet.
const JOIN_PATIENCE: Duration = Duration::from_secs(60);

/// Joins the cloud through the CC at `cc_endpoint` with `token`: makes a key (it never
/// leaves this host), sends a certificate request with the token to the CC, whose own
/// certificate must come from the CA the token pins, and writes ca.crt, tls.crt and
/// tls.key into `dir`.
pub async fn join(dir: &Path, token: &str, cc_endpoint: &str, node: &NodeId) -> Result<()> {
    let token = JoinToken::parse(token)?;
    let (key_pem, csr_pem) = canopy_pki::new_key_and_request()?;
    let endpoint = tonic::transport::Endpoint::from_shared(cc_endpoint.to_owned())
        .with_context(|| format!("cc endpoint {cc_endpoint:?}"))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30));
    let channel = canopy_pki::pinned_channel(endpoint, &token.ca_fingerprint, Role::Zone)?;
    let mut client = pb::enrollment_client::EnrollmentClient::new(channel);
    let request = pb::JoinRequest {
        token_id: token.id.clone(),
        token_secret: token.secret.clone(),
        node_id: node.to_string(),
        csr_pem,
    };
    let deadline = tokio::time::Instant::now() + JOIN_PATIENCE;
    let response = loop {
        match client.join(request.clone()).await {
            Ok(r) => break r.into_inner(),
            Err(status)
                if status.code() == tonic::Code::Unavailable
                    && tokio::time::Instant::now() < deadline =>
            {
                tracing::info!(%status, "joining: the cluster controller is not reachable yet; retrying");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            Err(status) => bail!("joining through {cc_endpoint} failed: {}", status.message()),
        }
    };
    let ca = files::pem_certificates(&response.ca_pem)?;
    if ca.first().map(|c| canopy_pki::fingerprint(c)) != Some(token.ca_fingerprint.clone()) {
        bail!("the cloud answered with a CA other than the one the join token names");
    }
    TlsFiles {
        ca_pem: response.ca_pem,
        cert_pem: response.certificate_pem,
        key_pem,
    }
    .write(dir)?;
    tracing::info!(node = %node, zone = %response.zone, dir = %dir.display(), "joined the cloud");
    Ok(())
}
