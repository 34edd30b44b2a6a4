//! libvirt domain XML from a typed description: the libvirt driver's only way to make a
//! domain. Pure, so every shape is tested against golden files without a host.
//!
//! A [`DomainDescription`] is checked by [`DomainDescription::to_xml`] before anything is
//! written (absolute paths, sizes in range, a MAC address, no control characters), and
//! every text and attribute value is escaped, so nothing a user controls (a kernel command
//! line, a path) can change the document's structure.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use canopy_common::InstanceId;

/// libvirt's domain type: the accelerator the guest runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accelerator {
    /// QEMU/KVM, hardware virtualisation.
    Kvm,
    /// QEMU's software emulation (TCG): slower, works everywhere, including nested.
    Tcg,
}

impl Accelerator {
    fn domain_type(self) -> &'static str {
        match self {
            Accelerator::Kvm => "kvm",
            Accelerator::Tcg => "qemu",
        }
    }
}

/// How the guest boots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Boot {
    /// From the root disk's own boot loader.
    Disk,
    /// Directly from a kernel (an EKI) and optionally an initial ramdisk (an ERI).
    Kernel {
        kernel: PathBuf,
        initrd: Option<PathBuf>,
        cmdline: String,
    },
}

/// A network interface on a libvirt network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nic {
    pub network: String,
    /// `xx:xx:xx:xx:xx:xx`, lower-case hex.
    pub mac: String,
}

/// Everything a domain is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainDescription {
    /// The domain's name: the instance id, so `virsh list` reads as `describe-instances`.
    pub instance_id: InstanceId,
    pub accelerator: Accelerator,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub boot: Boot,
    /// The instance's qcow2 overlay, on a cached base image.
    pub root_disk: PathBuf,
    pub nic: Option<Nic>,
    /// Where the serial console is logged (what GetConsoleOutput returns).
    pub console_log: PathBuf,
}

/// Why a description cannot become a domain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid domain {field}: {reason}")]
pub struct InvalidDomain {
    pub field: &'static str,
    pub reason: String,
}

fn invalid(field: &'static str, reason: impl Into<String>) -> InvalidDomain {
    InvalidDomain {
        field,
        reason: reason.into(),
    }
}

/// libvirt's and QEMU's own bounds are larger; these are what a Canopy node offers.
const MAX_VCPUS: u32 = 512;
const MIN_MEMORY_MIB: u64 = 16;
const MAX_MEMORY_MIB: u64 = 16 * 1024 * 1024;
/// x86's kernel command line limit.
const MAX_CMDLINE: usize = 2048;

impl DomainDescription {
    fn validate(&self) -> Result<(), InvalidDomain> {
        if !(1..=MAX_VCPUS).contains(&self.vcpus) {
            return Err(invalid(
                "vcpus",
                format!("{} is not within 1..={MAX_VCPUS}", self.vcpus),
            ));
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return Err(invalid(
                "memory",
                format!(
                    "{} MiB is not within {MIN_MEMORY_MIB}..={MAX_MEMORY_MIB} MiB",
                    self.memory_mib
                ),
            ));
        }
        check_path("root disk", &self.root_disk)?;
        check_path("console log", &self.console_log)?;
        if let Boot::Kernel {
            kernel,
            initrd,
            cmdline,
        } = &self.boot
        {
            check_path("kernel", kernel)?;
            if let Some(initrd) = initrd {
                check_path("initrd", initrd)?;
            }
            if cmdline.len() > MAX_CMDLINE {
                return Err(invalid(
                    "kernel command line",
                    format!("{} bytes, more than {MAX_CMDLINE}", cmdline.len()),
                ));
            }
            check_text("kernel command line", cmdline)?;
        }
        if let Some(nic) = &self.nic {
            if nic.network.is_empty() {
                return Err(invalid("network", "empty"));
            }
            check_text("network", &nic.network)?;
            let octets: Vec<&str> = nic.mac.split(':').collect();
            let well_formed = octets.len() == 6
                && octets.iter().all(|o| {
                    o.len() == 2
                        && o.bytes()
                            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
                });
            if !well_formed {
                return Err(invalid(
                    "mac",
                    format!("{:?} is not xx:xx:xx:xx:xx:xx", nic.mac),
                ));
            }
        }
        Ok(())
    }

    /// The domain's XML, for `virDomainDefineXML`.
    pub fn to_xml(&self) -> Result<String, InvalidDomain> {
        self.validate()?;
        let id = self.instance_id.as_str();
        let mut x = String::new();
        // Writing to a String cannot fail: the `let _ =` only drops an always-Ok result.
        let _ = writeln!(x, "<domain type='{}'>", self.accelerator.domain_type());
        let _ = writeln!(x, "  <name>{}</name>", esc(id));
        let _ = writeln!(
            x,
            "  <metadata>\n    <canopy:instance xmlns:canopy='https://canopy.dev/xmlns/domain/1'>{}</canopy:instance>\n  </metadata>",
            esc(id)
        );
        let _ = writeln!(x, "  <memory unit='MiB'>{}</memory>", self.memory_mib);
        let _ = writeln!(x, "  <vcpu>{}</vcpu>", self.vcpus);
        x.push_str("  <os>\n    <type arch='x86_64' machine='pc'>hvm</type>\n");
        match &self.boot {
            Boot::Disk => x.push_str("    <boot dev='hd'/>\n"),
            Boot::Kernel {
                kernel,
                initrd,
                cmdline,
            } => {
                let _ = writeln!(x, "    <kernel>{}</kernel>", esc(&path_str(kernel)));
                if let Some(initrd) = initrd {
                    let _ = writeln!(x, "    <initrd>{}</initrd>", esc(&path_str(initrd)));
                }
                let _ = writeln!(x, "    <cmdline>{}</cmdline>", esc(cmdline));
            }
        }
        x.push_str("  </os>\n  <features>\n    <acpi/>\n    <apic/>\n  </features>\n");
        if self.accelerator == Accelerator::Kvm {
            x.push_str("  <cpu mode='host-passthrough'/>\n");
        }
        // A guest that powers off stays defined and shut off (EC2 `stopped`); a crash is
        // kept for the reconciler to see and report.
        x.push_str(
            "  <on_poweroff>destroy</on_poweroff>\n  <on_reboot>restart</on_reboot>\n  <on_crash>preserve</on_crash>\n",
        );
        x.push_str("  <devices>\n");
        let _ = writeln!(
            x,
            "    <disk type='file' device='disk'>\n      <driver name='qemu' type='qcow2' discard='unmap'/>\n      <source file='{}'/>\n      <target dev='vda' bus='virtio'/>\n    </disk>",
            esc(&path_str(&self.root_disk))
        );
        if let Some(nic) = &self.nic {
            let _ = writeln!(
                x,
                "    <interface type='network'>\n      <source network='{}'/>\n      <mac address='{}'/>\n      <model type='virtio'/>\n    </interface>",
                esc(&nic.network),
                esc(&nic.mac)
            );
        }
        // The console stays a pty (virsh console works) and is logged to a file by
        // virtlogd, which GetConsoleOutput reads.
        let _ = writeln!(
            x,
            "    <serial type='pty'>\n      <log file='{}' append='on'/>\n      <target port='0'/>\n    </serial>",
            esc(&path_str(&self.console_log))
        );
        x.push_str(
            "    <console type='pty'>\n      <target type='serial' port='0'/>\n    </console>\n",
        );
        x.push_str("    <memballoon model='none'/>\n  </devices>\n</domain>\n");
        Ok(x)
    }
}

/// A volume's disk element, for libvirt's attach and detach. The guest sees a virtio disk
/// whose serial is the volume id without its dash (`vol0123…`, 20 characters: virtio's
/// limit, and EC2's convention for NVMe volumes), so `/dev/disk/by-id/virtio-vol…` names it.
pub fn volume_disk_xml(
    volume: &canopy_common::VolumeId,
    file: &Path,
    guest_disk: &str,
) -> Result<String, InvalidDomain> {
    check_path("volume file", file)?;
    if guest_disk.is_empty() || !guest_disk.bytes().all(|b| b.is_ascii_lowercase()) {
        return Err(invalid(
            "volume target",
            format!("{guest_disk:?} is not a disk name"),
        ));
    }
    Ok(format!(
        "<disk type='file' device='disk'>\n  <driver name='qemu' type='qcow2' discard='unmap'/>\n  <source file='{}'/>\n  <target dev='{}' bus='virtio'/>\n  <serial>{}</serial>\n</disk>\n",
        esc(&path_str(file)),
        guest_disk,
        volume_serial(volume)
    ))
}

/// A domain's (persistent) XML as libvirt gives it back, with other vCPUs and memory and
/// everything else as it was: its disks (the root overlay, attached volumes), console and
/// boot. Defining the result under the same name replaces the shut-off domain's
/// configuration. libvirt writes `<memory unit='KiB'>`, `<currentMemory>` and
/// `<vcpu placement='static'>` once each, as children of `<domain>`.
pub fn resized_xml(domain_xml: &str, vcpus: u32, memory_mib: u64) -> Result<String, InvalidDomain> {
    if !(1..=MAX_VCPUS).contains(&vcpus) {
        return Err(invalid(
            "vcpus",
            format!("{vcpus} is not within 1..={MAX_VCPUS}"),
        ));
    }
    if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&memory_mib) {
        return Err(invalid(
            "memory",
            format!("{memory_mib} MiB is not within {MIN_MEMORY_MIB}..={MAX_MEMORY_MIB} MiB"),
        ));
    }
    let memory = format!("<memory unit='MiB'>{memory_mib}</memory>");
    let current = format!("<currentMemory unit='MiB'>{memory_mib}</currentMemory>");
    let vcpu = format!("<vcpu placement='static'>{vcpus}</vcpu>");
    let xml = replace_element(domain_xml, "memory", &memory)
        .ok_or_else(|| invalid("memory", "the domain's XML has no <memory> element"))?;
    let xml = replace_element(&xml, "currentMemory", &current).unwrap_or(xml);
    replace_element(&xml, "vcpu", &vcpu)
        .ok_or_else(|| invalid("vcpus", "the domain's XML has no <vcpu> element"))
}

/// `xml` with its first `<name …>text</name>` element (one holding text only) replaced by
/// `with`, if it has one.
fn replace_element(xml: &str, name: &str, with: &str) -> Option<String> {
    let open = format!("<{name}");
    let close = format!("</{name}>");
    let mut from = 0;
    loop {
        let start = from + xml[from..].find(&open)?;
        from = start + open.len();
        // `<memory` must not match `<memoryBacking`, nor `<vcpu` match `<vcpus>` or the
        // empty `<vcpu id='0' …/>` elements inside it.
        if !matches!(xml[from..].chars().next(), Some('>' | ' ')) {
            continue;
        }
        let tag_end = from + xml[from..].find('>')?;
        if xml[..tag_end].ends_with('/') {
            continue;
        }
        let text_end = tag_end + xml[tag_end..].find('<')?;
        if xml[text_end..].starts_with(&close) {
            let end = text_end + close.len();
            return Some(format!("{}{with}{}", &xml[..start], &xml[end..]));
        }
    }
}

/// The disk serial a volume is attached with.
pub fn volume_serial(volume: &canopy_common::VolumeId) -> String {
    volume.as_str().replacen('-', "", 1)
}

/// The volumes attached in a domain's XML: every disk whose serial is a volume's.
pub fn attached_volumes(domain_xml: &str) -> Vec<canopy_common::VolumeId> {
    let mut out = Vec::new();
    let mut rest = domain_xml;
    while let Some(at) = rest.find("<serial>vol") {
        rest = &rest[at + "<serial>vol".len()..];
        let Some(end) = rest.find("</serial>") else {
            break;
        };
        if let Ok(id) = canopy_common::VolumeId::parse(&format!("vol-{}", &rest[..end])) {
            out.push(id);
        }
    }
    out
}

fn check_path(field: &'static str, path: &Path) -> Result<(), InvalidDomain> {
    let Some(s) = path.to_str() else {
        return Err(invalid(field, format!("{} is not UTF-8", path.display())));
    };
    if !path.is_absolute() {
        return Err(invalid(field, format!("{s:?} is not an absolute path")));
    }
    check_text(field, s)
}

/// Control characters cannot be escaped in XML 1.0 (and have no place in these values).
fn check_text(field: &'static str, s: &str) -> Result<(), InvalidDomain> {
    if s.chars().any(char::is_control) {
        return Err(invalid(field, format!("{s:?} holds a control character")));
    }
    Ok(())
}

/// Checked UTF-8 by `validate` before any XML is written.
fn path_str(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

/// Escapes text and attribute values (attributes are single-quoted).
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_disks_carry_the_volume_in_their_serial_and_are_found_again() {
        let vol = canopy_common::VolumeId::parse("vol-0123456789abcdef0").unwrap();
        let xml =
            volume_disk_xml(&vol, Path::new("/var/lib/canopy/volumes/v.qcow2"), "vdf").unwrap();
        assert!(
            xml.contains("<serial>vol0123456789abcdef0</serial>"),
            "{xml}"
        );
        assert_eq!(
            volume_serial(&vol).len(),
            20,
            "virtio serials hold 20 characters"
        );
        assert!(xml.contains("<target dev='vdf' bus='virtio'/>"));
        let domain =
            format!("<domain><devices><disk><serial>other</serial></disk>{xml}</devices></domain>");
        assert_eq!(attached_volumes(&domain), vec![vol.clone()]);
        assert!(volume_disk_xml(&vol, Path::new("relative"), "vdf").is_err());
        assert!(volume_disk_xml(&vol, Path::new("/v"), "vd'f").is_err());
    }

    fn id() -> InstanceId {
        InstanceId::parse("i-0123456789abcdef0").unwrap()
    }

    fn kernel_boot() -> DomainDescription {
        DomainDescription {
            instance_id: id(),
            accelerator: Accelerator::Tcg,
            vcpus: 1,
            memory_mib: 256,
            boot: Boot::Kernel {
                kernel: "/var/lib/canopy/images/sha256-aa/eki".into(),
                initrd: Some("/var/lib/canopy/images/sha256-bb/eri".into()),
                cmdline: "console=ttyS0 canopy.instance_id=i-0123456789abcdef0".into(),
            },
            root_disk: "/var/lib/canopy/instances/i-0123456789abcdef0/root.qcow2".into(),
            nic: None,
            console_log: "/var/lib/canopy/instances/i-0123456789abcdef0/console.log".into(),
        }
    }

    fn disk_boot_kvm() -> DomainDescription {
        DomainDescription {
            accelerator: Accelerator::Kvm,
            vcpus: 2,
            memory_mib: 2048,
            boot: Boot::Disk,
            nic: Some(Nic {
                network: "canopy".into(),
                mac: "d0:0d:01:23:45:67".into(),
            }),
            ..kernel_boot()
        }
    }

    /// Compares with `tests/golden/NAME`; `UPDATE_GOLDEN=1` rewrites the file instead.
    fn golden(name: &str, xml: &str) {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/golden")
            .join(name);
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, xml).unwrap();
        }
        let want = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (UPDATE_GOLDEN=1 writes it)", path.display()));
        assert_eq!(
            xml, want,
            "{name} differs from its golden file (UPDATE_GOLDEN=1 rewrites it)"
        );
    }

    #[test]
    fn a_kernel_boot_under_tcg() {
        golden("domain-kernel-tcg.xml", &kernel_boot().to_xml().unwrap());
    }

    #[test]
    fn a_disk_boot_under_kvm_with_a_nic() {
        golden("domain-disk-kvm.xml", &disk_boot_kvm().to_xml().unwrap());
    }

    #[test]
    fn values_cannot_change_the_document() {
        let mut d = kernel_boot();
        d.boot = Boot::Kernel {
            kernel: "/images/k'&<x>".into(),
            initrd: None,
            cmdline: "a='1' b=\"2\" </cmdline><kernel>/evil</kernel>".into(),
        };
        let xml = d.to_xml().unwrap();
        assert!(
            xml.contains("<kernel>/images/k&apos;&amp;&lt;x&gt;</kernel>"),
            "{xml}"
        );
        assert!(
            xml.contains(
                "<cmdline>a=&apos;1&apos; b=&quot;2&quot; &lt;/cmdline&gt;&lt;kernel&gt;/evil&lt;/kernel&gt;</cmdline>"
            ),
            "{xml}"
        );
        assert_eq!(xml.matches("<kernel>").count(), 1);
        assert!(!xml.contains("<initrd>"));
    }

    #[test]
    fn bad_descriptions_are_refused_with_the_field() {
        let refused = |d: DomainDescription| d.to_xml().unwrap_err().field;
        assert_eq!(
            refused(DomainDescription {
                vcpus: 0,
                ..kernel_boot()
            }),
            "vcpus"
        );
        assert_eq!(
            refused(DomainDescription {
                memory_mib: 8,
                ..kernel_boot()
            }),
            "memory"
        );
        assert_eq!(
            refused(DomainDescription {
                root_disk: "relative/root.qcow2".into(),
                ..kernel_boot()
            }),
            "root disk"
        );
        assert_eq!(
            refused(DomainDescription {
                console_log: "/tmp/a\nb".into(),
                ..kernel_boot()
            }),
            "console log"
        );
        assert_eq!(
            refused(DomainDescription {
                boot: Boot::Kernel {
                    kernel: "/k".into(),
                    initrd: None,
                    cmdline: "x\u{1}".into()
                },
                ..kernel_boot()
            }),
            "kernel command line"
        );
        assert_eq!(
            refused(DomainDescription {
                boot: Boot::Kernel {
                    kernel: "/k".into(),
                    initrd: None,
                    cmdline: "x".repeat(MAX_CMDLINE + 1)
                },
                ..kernel_boot()
            }),
            "kernel command line"
        );
        for mac in [
            "d0:0d:01:23:45",
            "D0:0D:01:23:45:67",
            "d0:0d:01:23:45:6g",
            "d00d01234567",
        ] {
            let mut d = disk_boot_kvm();
            d.nic.as_mut().unwrap().mac = mac.into();
            assert_eq!(refused(d), "mac", "{mac}");
        }
    }

    #[test]
    fn a_resized_definition_keeps_everything_but_its_size() {
        let xml = "<domain type='kvm'>\n  <name>i-0123456789abcdef0</name>\n  <memoryBacking><source type='memfd'/></memoryBacking>\n  <memory unit='KiB'>1048576</memory>\n  <currentMemory unit='KiB'>1048576</currentMemory>\n  <vcpus><vcpu id='0' enabled='yes'/></vcpus>\n  <vcpu placement='static' current='1'>1</vcpu>\n  <devices>\n    <disk type='file' device='disk'><source file='/var/lib/canopy/i-0123456789abcdef0/root.qcow2'/></disk>\n    <disk type='file' device='disk'><serial>vol0123456789abcdef0</serial></disk>\n  </devices>\n</domain>\n";
        let out = resized_xml(xml, 2, 8192).unwrap();
        assert!(out.contains("<memory unit='MiB'>8192</memory>"), "{out}");
        assert!(
            out.contains("<currentMemory unit='MiB'>8192</currentMemory>"),
            "{out}"
        );
        assert!(out.contains("<vcpu placement='static'>2</vcpu>"), "{out}");
        assert!(!out.contains("1048576"), "{out}");
        // The look-alike elements and the disks are untouched.
        assert!(out.contains("<memoryBacking><source type='memfd'/></memoryBacking>"));
        assert!(out.contains("<vcpus><vcpu id='0' enabled='yes'/></vcpus>"));
        assert!(out.contains("root.qcow2"));
        assert_eq!(
            attached_volumes(&out),
            vec![canopy_common::VolumeId::parse("vol-0123456789abcdef0").unwrap()]
        );
        // What Canopy itself writes resizes too.
        let ours = resized_xml(&kernel_boot().to_xml().unwrap(), 4, 2048).unwrap();
        assert!(ours.contains("<memory unit='MiB'>2048</memory>"), "{ours}");
        assert!(ours.contains("<vcpu placement='static'>4</vcpu>"), "{ours}");
        assert_eq!(resized_xml(xml, 0, 8192).unwrap_err().field, "vcpus");
        assert_eq!(
            resized_xml("<domain/>", 1, 512).unwrap_err().field,
            "memory"
        );
    }
}
