//! A node host for real guests: the checks `canopy nc` runs before it starts (what is
//! missing is said plainly, at once, instead of failing at the first launch), the wider
//! checks of `canopy nc doctor` ([`doctor`]: also the accelerator, the CC and the clocks),
//! and the libvirt driver put together from the node's configuration.
//!
//! Each check yields a [`Finding`]: a verdict, what was found and what to do. The
//! verdicts are decided by pure functions of what was measured (`*_finding`), tested
//! below; the measuring (connecting, probing, `df`, `timedatectl`) stays around them.
//!
//! Compiled with or without the `libvirt` feature: without it, [`connect_libvirt`] says
//! that this build has no libvirt driver.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::domain_xml::Accelerator;
use crate::hypervisor::Hypervisor;

/// The least free space the image cache's file system must have.
pub const MIN_CACHE_FREE_BYTES: u64 = 1 << 30;

const KVM_DEVICE: &str = "/dev/kvm";

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
    /// How the node talks to it.
    pub transport: canopy_pki::Transport,
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
fn kvm_device_finding(dev: &Path) -> Option<Finding> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta = std::fs::metadata(dev).ok()?;
    let mode = meta.permissions().mode();
    let others = mode & 0o006 == 0o006;
    let group = mode & 0o060 == 0o060 && meta.gid() != 0;
    (!others && !group).then(|| {
        Finding::warn(
            "kvm device",
            format!(
                "{} is {:o} and owned by root only: QEMU cannot use KVM and libvirt re-probes QEMU on every call (slow)",
                dev.display(),
                mode & 0o777
            ),
            format!(
                "give it to the kvm group as udev does: chgrp kvm {0}; chmod 660 {0}",
                dev.display()
            ),
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

/// How one check of the host came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    /// Guests run, but worth the operator's attention (software emulation, an unknown clock).
    Warn,
    /// The node cannot run guests, or not as configured, until this is fixed.
    Fail,
    /// Does not apply to this node (libvirt on a simulated node).
    Skip,
}

/// One check of the host: what was found and, unless it passed, what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// What was checked, in a word or two ("libvirt", "qemu-img", "clock").
    pub check: &'static str,
    pub verdict: Verdict,
    pub detail: String,
    pub fix: Option<String>,
}

impl Finding {
    pub fn ok(check: &'static str, detail: impl Into<String>) -> Self {
        Self::new(check, Verdict::Ok, detail, None)
    }

    pub fn skip(check: &'static str, detail: impl Into<String>) -> Self {
        Self::new(check, Verdict::Skip, detail, None)
    }

    pub fn warn(check: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self::new(check, Verdict::Warn, detail, Some(fix.into()))
    }

    pub fn fail(check: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self::new(check, Verdict::Fail, detail, Some(fix.into()))
    }

    fn new(
        check: &'static str,
        verdict: Verdict,
        detail: impl Into<String>,
        fix: Option<String>,
    ) -> Self {
        Self {
            check,
            verdict,
            detail: detail.into(),
            fix,
        }
    }

    /// The finding in one sentence with what to do, as `canopy nc` says it at start.
    pub fn sentence(&self) -> String {
        match &self.fix {
            Some(fix) => format!("{} ({fix})", self.detail),
            None => self.detail.clone(),
        }
    }
}

fn driver_finding(compiled: bool) -> Finding {
    if compiled {
        Finding::ok("libvirt driver", "built into this canopy")
    } else {
        Finding::fail(
            "libvirt driver",
            "this canopy was built without the libvirt driver",
            "build it with `cargo build --release -p canopy --features libvirt`, which needs libvirt-dev",
        )
    }
}

/// `reachable`: connecting to `uri`, or `None` when this build cannot try.
fn libvirt_finding(uri: &str, reachable: Option<Result<(), String>>) -> Finding {
    match reachable {
        None => Finding::skip("libvirt", "not checked: this build has no libvirt driver"),
        Some(Ok(())) => Finding::ok("libvirt", format!("libvirtd answers at {uri}")),
        Some(Err(e)) => Finding::fail(
            "libvirt",
            format!("libvirtd is not reachable at {uri}: {e}"),
            "install libvirt-daemon-system and start libvirtd: systemctl enable --now libvirtd",
        ),
    }
}

fn program_finding(
    check: &'static str,
    found: Option<PathBuf>,
    missing: &str,
    package: &str,
) -> Finding {
    match found {
        Some(path) => Finding::ok(check, path.display().to_string()),
        None => Finding::fail(check, missing, format!("install {package}")),
    }
}

/// The node's directories: each can be made, and QEMU can reach it when it runs as its own
/// user (`qemu:///system`). Creates them, as the node does at start.
fn directory_findings(opts: &LibvirtNodeOptions) -> Vec<Finding> {
    let mut findings = Vec::new();
    let dirs = [
        ("image cache", &opts.image_cache_dir),
        ("instances", &opts.instances_dir),
        ("volumes", &opts.volumes_dir),
    ];
    for (what, dir) in dirs {
        if let Err(e) = std::fs::create_dir_all(dir) {
            findings.push(Finding::fail(
                "directories",
                format!("cannot create the {what} directory {}: {e}", dir.display()),
                "run as root (as the service does), or choose another state_dir",
            ));
        }
    }
    if opts.uri.ends_with("/system") {
        for (_, dir) in dirs {
            if let Some(blocked) = untraversable_ancestor(dir) {
                findings.push(Finding::fail(
                    "directories",
                    format!(
                        "QEMU runs as its own user under {} and cannot reach {}: {} is not searchable by others",
                        opts.uri,
                        dir.display(),
                        blocked.display()
                    ),
                    format!("chmod o+x {}, or choose another state_dir", blocked.display()),
                ));
            }
        }
    }
    if findings.is_empty() {
        let state = opts.instances_dir.parent().unwrap_or(&opts.instances_dir);
        findings.push(Finding::ok(
            "directories",
            format!("{} and its directories are usable", state.display()),
        ));
    }
    findings
}

/// Room on the image cache's file system (`free` bytes; `None`: could not be measured)
/// for the cache's bound `cache_bytes` and the `disk_gib` offered to instances. Under
/// [`MIN_CACHE_FREE_BYTES`] the node cannot start; less than it offers only warns, since
/// instances' disks are thin overlays that fill as guests write.
pub fn disk_finding(dir: &Path, free: Option<u64>, cache_bytes: u64, disk_gib: u64) -> Finding {
    const GIB: u64 = 1 << 30;
    let Some(free) = free else {
        return Finding::warn(
            "disk space",
            format!(
                "could not measure the free space at {} (df failed)",
                dir.display()
            ),
            "check `df -h` by hand",
        );
    };
    let gib = |b: u64| format!("{:.1} GiB", b as f64 / GIB as f64);
    if free < MIN_CACHE_FREE_BYTES {
        return Finding::fail(
            "disk space",
            format!(
                "no space for the image cache: {} has {} MiB free, at least {} MiB are needed",
                dir.display(),
                free >> 20,
                MIN_CACHE_FREE_BYTES >> 20
            ),
            "free space there, or choose a state_dir on a larger file system",
        );
    }
    let wanted = cache_bytes.saturating_add(disk_gib.saturating_mul(GIB));
    if free < wanted {
        return Finding::warn(
            "disk space",
            format!(
                "{} free at {}, less than the image cache's bound ({}) plus the disk offered to instances (disk_gib = {disk_gib})",
                gib(free),
                dir.display(),
                gib(cache_bytes)
            ),
            "lower image_cache_gib or disk_gib, or give state_dir a larger file system; instances' disks fill as guests write",
        );
    }
    Finding::ok(
        "disk space",
        format!(
            "{} free at {} (image cache bound {}, {disk_gib} GiB offered to instances)",
            gib(free),
            dir.display(),
            gib(cache_bytes)
        ),
    )
}

/// Every check of the host a libvirt node runs at start, and their findings: the driver,
/// libvirtd (`libvirt_reachable`: the result of connecting, `None` when this build has no
/// driver), QEMU and qemu-img, the directories (created here), and the disk space.
pub fn host_findings(
    opts: &LibvirtNodeOptions,
    libvirt_reachable: Option<Result<(), String>>,
) -> Vec<Finding> {
    let mut findings = vec![
        driver_finding(libvirt_compiled()),
        libvirt_finding(&opts.uri, libvirt_reachable),
        program_finding(
            "qemu-system",
            find_qemu(),
            "no QEMU: qemu-system-x86_64 is not on PATH",
            "qemu-system-x86",
        ),
        program_finding(
            "qemu-img",
            find_program("qemu-img"),
            "no qemu-img on PATH",
            "qemu-utils",
        ),
    ];
    findings.extend(directory_findings(opts));
    findings.push(disk_finding(
        &opts.image_cache_dir,
        free_bytes(&opts.image_cache_dir),
        opts.image_cache_max_bytes,
        opts.disk_gib,
    ));
    findings
}

/// The host's problems for running guests, each in a sentence that says what to do; empty
/// when there are none: the failed [`host_findings`].
pub fn host_problems(
    opts: &LibvirtNodeOptions,
    libvirt_reachable: Option<Result<(), String>>,
) -> Vec<String> {
    host_findings(opts, libvirt_reachable)
        .iter()
        .filter(|f| f.verdict == Verdict::Fail)
        .map(Finding::sentence)
        .collect()
}

/// Connects to libvirt at `uri` and lets go: `None` when this build has no libvirt driver.
/// `bound`: how long to wait for an answer (a libvirtd that accepts and never answers).
pub async fn libvirt_reachable(
    uri: &str,
    bound: Option<std::time::Duration>,
) -> Option<Result<(), String>> {
    #[cfg(feature = "libvirt")]
    {
        let uri = uri.to_owned();
        let connect = tokio::task::spawn_blocking(move || {
            virt::error::clear_error_callback();
            virt::connect::Connect::open(Some(&uri))
                .map(drop)
                .map_err(|e| e.to_string())
        });
        let joined = match bound {
            Some(bound) => match tokio::time::timeout(bound, connect).await {
                Ok(joined) => joined,
                Err(_) => return Some(Err(format!("no answer within {} s", bound.as_secs()))),
            },
            None => connect.await,
        };
        Some(joined.unwrap_or_else(|e| Err(e.to_string())))
    }
    #[cfg(not(feature = "libvirt"))]
    {
        let _ = (uri, bound);
        None
    }
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

/// Whether `/dev/kvm` can be opened (by whoever runs this: the doctor runs as the node does).
fn kvm_opens() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(KVM_DEVICE)
        .is_ok()
}

/// The accelerator guests would get (`chosen`, and [`choose_accelerator`]'s `reason`) for
/// the configured `choice`; `kvm_opens`: whether `/dev/kvm` can be opened.
pub fn accelerator_finding(
    choice: AcceleratorChoice,
    chosen: Accelerator,
    reason: &str,
    kvm_opens: bool,
) -> Finding {
    const CHECK: &str = "accelerator";
    match (choice, chosen) {
        (AcceleratorChoice::Kvm, _) if !kvm_opens => Finding::fail(
            CHECK,
            format!("accelerator = kvm, but {KVM_DEVICE} cannot be opened: guests will not start"),
            format!(
                "enable virtualisation (VT-x/AMD-V) in the firmware, load kvm_intel or kvm_amd and give {KVM_DEVICE} to group kvm (mode 660); or set accelerator = auto"
            ),
        ),
        (AcceleratorChoice::Auto, Accelerator::Tcg) => Finding::warn(
            CHECK,
            format!("software emulation (TCG), several times slower than KVM: {reason}"),
            "guests run, slowly; KVM needs virtualisation enabled in the firmware (or nested virtualisation that works, on a VM), kvm_intel or kvm_amd loaded, and /dev/kvm",
        ),
        _ => Finding::ok(CHECK, reason),
    }
}

/// The accelerator check: the probe (`accelerator = auto`) or the configured choice, and
/// whether `/dev/kvm` is set up as libvirt needs it.
async fn accelerator_findings(choice: AcceleratorChoice, scratch: &Path) -> Vec<Finding> {
    let mut findings: Vec<Finding> = kvm_device_finding(Path::new(KVM_DEVICE))
        .into_iter()
        .collect();
    if choice == AcceleratorChoice::Auto && find_qemu().is_none() {
        findings.push(Finding::skip("accelerator", "not probed: no QEMU"));
        return findings;
    }
    let (chosen, reason) = choose_accelerator(choice, scratch).await;
    findings.push(accelerator_finding(choice, chosen, &reason, kvm_opens()));
    findings
}

/// The node id the doctor's heartbeat carries. No node has it, so the CC answers
/// `known: false` and changes nothing: the doctor can ask while the node itself runs.
const PROBE_NODE_ID: &str = "canopy-doctor-probe";

/// The CC's answer to the doctor's call, with this host's clock around it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CcAnswer {
    /// This host's clock when the call went out and when the answer came back.
    pub sent: std::time::SystemTime,
    pub received: std::time::SystemTime,
    /// The CC's clock, from the HTTP `date` header of its answer (whole seconds), if any.
    pub date: Option<std::time::SystemTime>,
}

/// Calls the CC at `endpoint` as a node would (`ZoneAgent.NodeHeartbeat`), within `bound`.
pub async fn probe_cc(
    endpoint: &str,
    bound: std::time::Duration,
    transport: &canopy_pki::Transport,
) -> Result<CcAnswer, String> {
    use canopy_proto::v1 as pb;
    use canopy_proto::v1::zone_agent_client::ZoneAgentClient;

    let endpoint = tonic::transport::Endpoint::from_shared(endpoint.to_owned())
        .map_err(|e| e.to_string())?
        .connect_timeout(bound)
        .timeout(bound);
    // A node may only speak for itself: with a certificate, the probe heartbeats as the
    // node it names (the CC ignores heartbeats of nodes it has not registered).
    let node_id = match transport {
        canopy_pki::Transport::Tls(tls) => tls.own.identity.name.clone(),
        canopy_pki::Transport::Plaintext => PROBE_NODE_ID.into(),
    };
    let sent = std::time::SystemTime::now();
    let call = async {
        let channel = transport.channel(endpoint, canopy_pki::Role::Zone);
        ZoneAgentClient::new(channel)
            .node_heartbeat(pb::NodeHeartbeatRequest {
                node_id,
                applied_generation: 0,
            })
            .await
            .map_err(|status| match status.code() {
                // Also what an HTTP server that is not gRPC answers (404).
                tonic::Code::Unimplemented => format!(
                    "something answers there, but not a CC ({}): is it the port of a CLC, of a node, or of another service?",
                    status.message()
                ),
                code => {
                    use std::error::Error;
                    let cause = status.source().map(error_chain);
                    format!("{code:?}: {}{}", status.message(), cause.map(|c| format!(" ({c})")).unwrap_or_default())
                }
            })
    };
    let answer = tokio::time::timeout(bound, call)
        .await
        .map_err(|_| format!("no answer within {} s", bound.as_secs()))??;
    let received = std::time::SystemTime::now();
    let date = answer
        .metadata()
        .get("date")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| chrono::DateTime::parse_from_rfc2822(v).ok())
        .map(std::time::SystemTime::from);
    Ok(CcAnswer {
        sent,
        received,
        date,
    })
}

/// An error with its causes: tonic's transport errors say little more than "transport
/// error". A cause that repeats the one before (hyper wraps its own) is said once.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut last = text.clone();
    let mut source = e.source();
    while let Some(cause) = source {
        let said = cause.to_string();
        if !last.ends_with(&said) {
            text = format!("{text}: {said}");
        }
        last = said;
        source = cause.source();
    }
    text
}

fn cc_finding(endpoint: &str, answer: &Result<CcAnswer, String>) -> Finding {
    match answer {
        Ok(a) => {
            let ms = a
                .received
                .duration_since(a.sent)
                .unwrap_or_default()
                .as_millis();
            Finding::ok(
                "cluster controller",
                format!("{endpoint} answered in {ms} ms"),
            )
        }
        Err(e) => Finding::fail(
            "cluster controller",
            format!("no cluster controller at {endpoint}: {e}"),
            "check `cc` in the config, that `canopy cc` runs there and listens on an address this host reaches (its --listen), and the firewall (port 8775)",
        ),
    }
}

/// How far from this host's clock the CC's clock may be before the doctor fails the clock.
pub const MAX_CLOCK_OFFSET_MS: i64 = 5_000;

fn epoch_ms(t: std::time::SystemTime) -> i64 {
    match t.duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => d.as_millis() as i64,
        Err(e) => -(e.duration().as_millis() as i64),
    }
}

/// The CC's clock minus this host's, in milliseconds, as far as the answer can tell: the
/// `date` header was made between `sent` and `received` and is truncated to the second, so
/// any offset in an interval fits; this is the one nearest zero (0 when zero fits).
pub fn clock_offset_ms(answer: &CcAnswer) -> Option<i64> {
    let date = epoch_ms(answer.date?);
    let low = date - epoch_ms(answer.received);
    let high = date + 1_000 - epoch_ms(answer.sent);
    Some(if low > 0 {
        low
    } else if high < 0 {
        high
    } else {
        0
    })
}

fn clock_offset_finding(endpoint: &str, answer: &Result<CcAnswer, String>) -> Finding {
    const CHECK: &str = "clock vs CC";
    let Ok(answer) = answer else {
        return Finding::skip(CHECK, "not compared: the CC did not answer");
    };
    let Some(offset) = clock_offset_ms(answer) else {
        return Finding::skip(CHECK, "not compared: the CC's answer carried no date");
    };
    let secs = offset.unsigned_abs() as f64 / 1000.0;
    let side = if offset > 0 { "behind" } else { "ahead of" };
    if offset == 0 {
        Finding::ok(
            CHECK,
            format!("this host's clock agrees with {endpoint}'s to the second"),
        )
    } else if offset.abs() <= MAX_CLOCK_OFFSET_MS {
        Finding::ok(
            CHECK,
            format!("this host's clock is {secs:.1} s {side} {endpoint}'s"),
        )
    } else {
        Finding::fail(
            CHECK,
            format!(
                "this host's clock is {secs:.1} s {side} {endpoint}'s (more than {} s)",
                MAX_CLOCK_OFFSET_MS / 1000
            ),
            "keep every host of the cloud on NTP (chrony or systemd-timesyncd)",
        )
    }
}

/// `NTPSynchronized=yes|no` from `timedatectl show -p NTPSynchronized`.
pub fn parse_ntp_synchronized(output: &str) -> Option<bool> {
    output
        .lines()
        .find_map(|l| l.trim().strip_prefix("NTPSynchronized="))
        .and_then(|v| match v {
            "yes" => Some(true),
            "no" => Some(false),
            _ => None,
        })
}

/// The system clock's synchronization, from `timedatectl`'s output (or why it gave none).
pub fn ntp_finding(timedatectl: Result<String, String>) -> Finding {
    const CHECK: &str = "clock sync";
    match timedatectl.as_deref().map(parse_ntp_synchronized) {
        Ok(Some(true)) => Finding::ok(CHECK, "the system clock is synchronized (NTP)"),
        Ok(Some(false)) => Finding::fail(
            CHECK,
            "the system clock is not synchronized (timedatectl: NTPSynchronized=no)",
            "run an NTP client: apt-get install chrony, or timedatectl set-ntp true with systemd-timesyncd",
        ),
        Ok(None) => Finding::warn(
            CHECK,
            "unknown: timedatectl did not say NTPSynchronized",
            "check the clock's synchronization by hand (chronyc tracking, timedatectl)",
        ),
        Err(e) => Finding::warn(
            CHECK,
            format!("unknown: {e}"),
            "check the clock's synchronization by hand (chronyc tracking, timedatectl)",
        ),
    }
}

/// `timedatectl show -p NTPSynchronized`, bounded (it asks systemd over D-Bus).
async fn timedatectl_ntp() -> Result<String, String> {
    let Some(program) = find_program("timedatectl") else {
        return Err("no timedatectl on PATH (not a systemd host?)".into());
    };
    let run = tokio::process::Command::new(program)
        .args(["show", "-p", "NTPSynchronized"])
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(std::time::Duration::from_secs(5), run).await {
        Err(_) => Err("timedatectl did not answer within 5 s".into()),
        Ok(Err(e)) => Err(format!("timedatectl: {e}")),
        Ok(Ok(out)) if out.status.success() => Ok(String::from_utf8_lossy(&out.stdout).into()),
        Ok(Ok(out)) => Err(format!(
            "timedatectl failed: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .next()
                .unwrap_or("no message")
        )),
    }
}

/// The host part of an `http://HOST:PORT/…` URL, without brackets.
fn url_host(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or(rest);
    match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(v6),
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    }
}

fn is_loopback_host(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Whether the CC can dial the URL this node gives it (`advertise`): a loopback address
/// only works for a CC on this same host.
pub fn advertise_finding(advertise: &str, cc_endpoint: &str) -> Finding {
    const CHECK: &str = "advertise";
    if is_loopback_host(url_host(advertise)) && !is_loopback_host(url_host(cc_endpoint)) {
        Finding::fail(
            CHECK,
            format!(
                "the CC ({cc_endpoint}) is told to reach this node at {advertise}, a loopback address it cannot dial"
            ),
            "set listen = \"0.0.0.0:8777\" and advertise = \"http://THIS-HOST:8777\" (a name or address the CC reaches) in the config",
        )
    } else {
        Finding::ok(CHECK, format!("the CC reaches this node at {advertise}"))
    }
}

/// What `canopy nc doctor` checks.
#[derive(Debug, Clone)]
pub struct DoctorOptions {
    /// The libvirt driver's settings; `None`: a simulated node (no libvirt, no QEMU).
    pub libvirt: Option<LibvirtNodeOptions>,
    pub cc_endpoint: String,
    /// How the node talks to the CC; `None`: it has no certificate yet (it joins at its
    /// first start), so the CC cannot be asked.
    pub transport: Option<canopy_pki::Transport>,
    /// The URL the CC reaches this node at.
    pub advertise: String,
    /// How long the CC and libvirtd each get to answer.
    pub bound: std::time::Duration,
}

/// Checks the host for `canopy nc doctor`: what [`host_findings`] checks at start, the
/// accelerator, the CC's answer and clock, the system clock and the advertised address.
/// `report` sees each finding as soon as it is made (the accelerator probe takes seconds).
pub async fn doctor(opts: &DoctorOptions, mut report: impl FnMut(&Finding)) -> Vec<Finding> {
    let mut findings = Vec::new();
    let mut add = |new: Vec<Finding>| {
        for f in new {
            report(&f);
            findings.push(f);
        }
    };
    match &opts.libvirt {
        None => add(vec![Finding::skip(
            "hypervisor",
            "simulated guests (hypervisor = sim): libvirt, QEMU and the accelerator are not checked",
        )]),
        Some(libvirt) => {
            let reachable = libvirt_reachable(&libvirt.uri, Some(opts.bound)).await;
            add(host_findings(libvirt, reachable));
            // The probe's scratch files go where the node puts them, when it can.
            let scratch = if libvirt.instances_dir.is_dir() {
                libvirt.instances_dir.clone()
            } else {
                std::env::temp_dir()
            };
            add(accelerator_findings(libvirt.accelerator, &scratch).await);
        }
    }
    match &opts.transport {
        Some(transport) => {
            let answer = probe_cc(&opts.cc_endpoint, opts.bound, transport).await;
            add(vec![
                cc_finding(&opts.cc_endpoint, &answer),
                clock_offset_finding(&opts.cc_endpoint, &answer),
            ]);
        }
        None => add(vec![Finding::skip(
            "cluster controller",
            "no certificate yet (the node joins with its join token at its first start): the CC and its clock are not checked",
        )]),
    }
    add(vec![
        ntp_finding(timedatectl_ntp().await),
        advertise_finding(&opts.advertise, &opts.cc_endpoint),
    ]);
    findings
}

/// Checks the host, then connects the libvirt driver with the node's image cache filled
/// from its CC. Every problem found is in the error, one per line.
#[cfg(feature = "libvirt")]
pub async fn connect_libvirt(opts: &LibvirtNodeOptions) -> Result<Arc<dyn Hypervisor>, String> {
    use crate::image_cache::ImageCache;
    use crate::image_fetch::CcImageFetcher;
    use crate::libvirt::{ImageSource, LibvirtConfig, LibvirtHypervisor};

    let reachable = libvirt_reachable(&opts.uri, None).await;
    let problems = host_problems(opts, reachable);
    if !problems.is_empty() {
        return Err(problems.join("\n"));
    }
    // Guests still run (without KVM), only slower to define and start: said, not refused.
    if let Some(finding) = kvm_device_finding(Path::new(KVM_DEVICE)) {
        tracing::warn!("{}", finding.sentence());
    }
    let (accelerator, accelerator_reason) =
        choose_accelerator(opts.accelerator, &opts.instances_dir).await;
    let cache = ImageCache::open(&opts.image_cache_dir, opts.image_cache_max_bytes)
        .map_err(|e| e.to_string())?;
    let fetcher = CcImageFetcher::new(&opts.cc_endpoint, &opts.transport)?;
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
    Err(host_problems(opts, None).join("\n"))
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
            transport: Default::default(),
        }
    }

    #[test]
    fn problems_are_named_with_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let problems = host_problems(&opts(dir.path()), Some(Err("connection refused".into())));
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
        let problems = host_problems(&o, Some(Ok(())));
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
        let problems = host_problems(&o, Some(Ok(())));
        assert!(
            problems
                .iter()
                .any(|p| p.contains("cannot reach") && p.contains("private")),
            "{problems:?}"
        );
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o755)).unwrap();
        let problems = host_problems(&o, Some(Ok(())));
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
        assert!(
            kvm_device_finding(&dev)
                .is_some_and(|f| f.verdict == Verdict::Warn && f.sentence().contains("chmod 660"))
        );
        std::fs::set_permissions(&dev, std::fs::Permissions::from_mode(0o666)).unwrap();
        assert_eq!(kvm_device_finding(&dev), None);
        std::fs::set_permissions(&dev, std::fs::Permissions::from_mode(0o660)).unwrap();
        assert_eq!(kvm_device_finding(&dev).is_some(), owned_by_root_group);
        assert_eq!(kvm_device_finding(&dir.path().join("absent")), None);
    }

    #[test]
    fn accelerator_names_parse() {
        assert_eq!("auto".parse(), Ok(AcceleratorChoice::Auto));
        assert_eq!("tcg".parse(), Ok(AcceleratorChoice::Qemu));
        assert!("xen".parse::<AcceleratorChoice>().is_err());
    }

    #[test]
    fn a_build_without_the_driver_says_so_and_skips_libvirtd() {
        let dir = tempfile::tempdir().unwrap();
        let findings = host_findings(&opts(dir.path()), None);
        let libvirt = findings.iter().find(|f| f.check == "libvirt").unwrap();
        assert_eq!(libvirt.verdict, Verdict::Skip);
        let driver = findings
            .iter()
            .find(|f| f.check == "libvirt driver")
            .unwrap();
        assert_eq!(
            driver.verdict == Verdict::Fail,
            !libvirt_compiled(),
            "{driver:?}"
        );
        if !libvirt_compiled() {
            // The phrase the e2e tests look for in the node's log.
            assert!(driver.sentence().contains("without the libvirt driver"));
        }
    }

    #[test]
    fn disk_space_fails_below_the_minimum_and_warns_below_what_is_offered() {
        const GIB: u64 = 1 << 30;
        let dir = Path::new("/var/lib/canopy/nc/images");
        let f = disk_finding(dir, Some(512 << 20), 20 * GIB, 500);
        assert_eq!(f.verdict, Verdict::Fail);
        assert!(f.detail.contains("512 MiB free"), "{f:?}");
        let f = disk_finding(dir, Some(100 * GIB), 20 * GIB, 500);
        assert_eq!(f.verdict, Verdict::Warn);
        assert!(f.detail.contains("100.0 GiB free"), "{f:?}");
        let f = disk_finding(dir, Some(600 * GIB), 20 * GIB, 500);
        assert_eq!(f.verdict, Verdict::Ok, "{f:?}");
        assert_eq!(disk_finding(dir, None, GIB, 1).verdict, Verdict::Warn);
    }

    #[test]
    fn software_emulation_warns_only_when_it_was_not_asked_for() {
        let tcg = |choice| accelerator_finding(choice, Accelerator::Tcg, "probe said so", true);
        assert_eq!(tcg(AcceleratorChoice::Auto).verdict, Verdict::Warn);
        assert!(
            tcg(AcceleratorChoice::Auto)
                .detail
                .contains("probe said so")
        );
        assert_eq!(tcg(AcceleratorChoice::Qemu).verdict, Verdict::Ok);
        let kvm = |opens| {
            accelerator_finding(
                AcceleratorChoice::Kvm,
                Accelerator::Kvm,
                "as configured",
                opens,
            )
        };
        assert_eq!(kvm(true).verdict, Verdict::Ok);
        assert_eq!(kvm(false).verdict, Verdict::Fail);
        assert!(kvm(false).detail.contains("/dev/kvm"));
        let probed =
            accelerator_finding(AcceleratorChoice::Auto, Accelerator::Kvm, "KVM works", true);
        assert_eq!(probed.verdict, Verdict::Ok);
    }

    fn answer(sent_ms: u64, received_ms: u64, date_s: Option<u64>) -> CcAnswer {
        let at = |ms| std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
        CcAnswer {
            sent: at(sent_ms),
            received: at(received_ms),
            date: date_s.map(|s| at(s * 1000)),
        }
    }

    #[test]
    fn the_clock_offset_is_what_the_date_header_cannot_explain() {
        // Sent at 100.2 s, answered at 100.3 s, the CC said 100 (truncated): in agreement.
        assert_eq!(
            clock_offset_ms(&answer(100_200, 100_300, Some(100))),
            Some(0)
        );
        // The same second, even when the answer took the CC into the next one.
        assert_eq!(
            clock_offset_ms(&answer(100_900, 101_100, Some(101))),
            Some(0)
        );
        // The CC is at least 6.7 s ahead: its second began after our answer came.
        assert_eq!(
            clock_offset_ms(&answer(100_200, 100_300, Some(107))),
            Some(6_700)
        );
        // The CC is behind: its second ended (99 + 1) 2.2 s before we sent.
        assert_eq!(
            clock_offset_ms(&answer(102_200, 102_300, Some(99))),
            Some(-2_200)
        );
        assert_eq!(clock_offset_ms(&answer(1, 2, None)), None);

        let url = "http://cc:8775";
        let finding = |a| clock_offset_finding(url, &Ok(a));
        assert_eq!(
            finding(answer(100_200, 100_300, Some(100))).verdict,
            Verdict::Ok
        );
        let ahead = finding(answer(100_200, 100_300, Some(107)));
        assert_eq!(ahead.verdict, Verdict::Fail);
        assert!(ahead.detail.contains("6.7 s behind"), "{ahead:?}");
        let slightly = finding(answer(102_200, 102_300, Some(99)));
        assert_eq!(slightly.verdict, Verdict::Ok);
        assert!(slightly.detail.contains("2.2 s ahead of"), "{slightly:?}");
        assert_eq!(
            clock_offset_finding(url, &Err("refused".into())).verdict,
            Verdict::Skip
        );
        assert_eq!(finding(answer(1, 2, None)).verdict, Verdict::Skip);
    }

    #[test]
    fn ntp_status_is_read_from_timedatectl() {
        assert_eq!(parse_ntp_synchronized("NTPSynchronized=yes\n"), Some(true));
        assert_eq!(parse_ntp_synchronized("NTPSynchronized=no\n"), Some(false));
        assert_eq!(parse_ntp_synchronized(""), None);
        assert_eq!(
            ntp_finding(Ok("NTPSynchronized=yes\n".into())).verdict,
            Verdict::Ok
        );
        assert_eq!(
            ntp_finding(Ok("NTPSynchronized=no\n".into())).verdict,
            Verdict::Fail
        );
        let unknown = ntp_finding(Err("System has not been booted with systemd".into()));
        assert_eq!(unknown.verdict, Verdict::Warn);
        assert!(unknown.detail.starts_with("unknown"), "{unknown:?}");
    }

    #[test]
    fn a_loopback_advertise_fails_only_for_a_cc_elsewhere() {
        assert_eq!(url_host("http://[::1]:8777"), "::1");
        assert_eq!(url_host("http://hv-01.example:8777/"), "hv-01.example");
        assert_eq!(url_host("https://10.0.0.5"), "10.0.0.5");
        let f = advertise_finding("http://127.0.0.1:8777", "http://cc-1a.example:8775");
        assert_eq!(f.verdict, Verdict::Fail);
        assert!(f.sentence().contains("advertise"), "{f:?}");
        for (advertise, cc) in [
            ("http://127.0.0.1:8777", "http://localhost:8775"),
            ("http://[::1]:8777", "http://127.0.0.1:8775"),
            ("http://hv-01.example:8777", "http://cc-1a.example:8775"),
            ("http://10.0.0.7:8777", "http://127.0.0.1:8775"),
        ] {
            assert_eq!(
                advertise_finding(advertise, cc).verdict,
                Verdict::Ok,
                "{advertise} {cc}"
            );
        }
    }

    #[tokio::test]
    async fn a_cc_that_is_not_there_is_named() {
        // Bind, then free the port: nothing listens there.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let url = format!("http://{addr}");
        let answer = probe_cc(&url, std::time::Duration::from_secs(3), &Default::default()).await;
        let f = cc_finding(&url, &answer);
        assert_eq!(f.verdict, Verdict::Fail);
        assert!(f.detail.contains("refused"), "{f:?}");
    }
}
