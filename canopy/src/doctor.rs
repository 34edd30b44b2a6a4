//! `canopy nc doctor`: checks a node's host with the node's own configuration and prints
//! each finding, with what to do about it. The checks are `node_controller::host`'s (the
//! ones `canopy nc` runs at start, and more); this module loads the config and prints.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use canopy::config::{self, HypervisorChoice, NcFile};
use canopy_node_controller::host::{self, DoctorOptions, Finding, Verdict};
use serde::Serialize;

/// How long libvirtd and the CC each get to answer.
const BOUND: Duration = Duration::from_secs(5);

/// Checks the host as configured by `file` and `overrides` (the flags given), printing
/// each finding on stdout as it comes. True when no check failed.
pub async fn run(file: Option<&Path>, overrides: impl Serialize) -> bool {
    let mut out = std::io::stdout();
    let mut print = |f: &Finding| {
        let _ = out.write_all(line(f).as_bytes());
        let _ = out.flush();
    };
    let source = match file {
        Some(path) => path.display().to_string(),
        None => "flags, environment and defaults (no --config)".to_owned(),
    };
    let opts = match options(file, overrides) {
        Ok((opts, summary)) => {
            print(&Finding::ok("config", format!("{source}: {summary}")));
            opts
        }
        Err(e) => {
            print(&Finding::fail(
                "config",
                format!("{source}: {e:#}"),
                "fix the configuration; `canopy nc --help` lists the keys",
            ));
            print!("{}", summary(&[Verdict::Fail]));
            return false;
        }
    };
    let findings = host::doctor(&opts, print).await;
    let verdicts: Vec<Verdict> = findings.iter().map(|f| f.verdict).collect();
    print!("{}", summary(&verdicts));
    !verdicts.contains(&Verdict::Fail)
}

/// What to check, from the node's configuration, and the configuration in a line.
fn options(
    file: Option<&Path>,
    overrides: impl Serialize,
) -> anyhow::Result<(DoctorOptions, String)> {
    let nc: NcFile = config::load(file, overrides)?;
    let cfg = nc.validate()?;
    let advertise = cfg
        .advertise
        .clone()
        .unwrap_or_else(|| format!("http://{}", cfg.listen));
    let (libvirt, hypervisor) = match nc.hypervisor {
        HypervisorChoice::Sim => (None, "sim"),
        HypervisorChoice::Libvirt => (Some(nc.libvirt_options()?), "libvirt"),
        HypervisorChoice::Auto => (
            Some(nc.libvirt_options()?),
            "auto (libvirt when the checks below pass, else simulated guests)",
        ),
    };
    let summary = format!(
        "node {}, hypervisor {hypervisor}, CC {}",
        cfg.node_id, cfg.cc_endpoint
    );
    let tls_dir = canopy::pki::required("the node", nc.tls_dir.clone())?;
    let transport = if canopy_pki::TlsFiles::present(&tls_dir) {
        Some(canopy::pki::transport(&tls_dir)?)
    } else if nc.join_token.is_some() {
        None
    } else {
        anyhow::bail!(
            "{} holds no certificate and no join_token is given: the node could not join",
            tls_dir.display()
        );
    };
    Ok((
        DoctorOptions {
            libvirt,
            cc_endpoint: cfg.cc_endpoint,
            transport,
            advertise,
            bound: BOUND,
        },
        summary,
    ))
}

/// `OK    check               detail`, and the fix on the next line when there is one.
fn line(f: &Finding) -> String {
    let verdict = match f.verdict {
        Verdict::Ok => "OK",
        Verdict::Warn => "WARN",
        Verdict::Fail => "FAIL",
        Verdict::Skip => "SKIP",
    };
    let mut text = format!("{verdict:<5} {:<19} {}\n", f.check, f.detail);
    if let Some(fix) = &f.fix {
        text.push_str(&format!("{:<25} fix: {fix}\n", ""));
    }
    text
}

/// The last line: how many checks failed or warned.
fn summary(verdicts: &[Verdict]) -> String {
    let count = |v| verdicts.iter().filter(|&&x| x == v).count();
    let plural = |n: usize, what: &str| format!("{n} {what}{}", if n == 1 { "" } else { "s" });
    let (failed, warned) = (count(Verdict::Fail), count(Verdict::Warn));
    let warnings = if warned > 0 {
        format!(", {}", plural(warned, "warning"))
    } else {
        String::new()
    };
    if failed == 0 {
        format!("\nno check failed{warnings}: this host can run a node\n")
    } else {
        format!(
            "\n{} failed{warnings}: fix what is marked FAIL and run `canopy nc doctor` again\n",
            plural(failed, "check")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_finding_prints_on_one_line_with_its_fix_below() {
        let ok = line(&Finding::ok("qemu-img", "/usr/bin/qemu-img"));
        assert_eq!(ok, format!("OK    {:<19} /usr/bin/qemu-img\n", "qemu-img"));
        let fail = line(&Finding::fail("libvirt", "not reachable", "start libvirtd"));
        let lines: Vec<&str> = fail.lines().collect();
        assert!(lines[0].starts_with("FAIL  libvirt "), "{fail}");
        assert_eq!(lines[1].trim_start(), "fix: start libvirtd");
        // The fix lines up with the detail.
        assert_eq!(lines[1].find("fix"), lines[0].find("not reachable"));
    }

    #[test]
    fn the_summary_counts_failures_and_warnings() {
        use Verdict::*;
        assert!(summary(&[Ok, Skip]).contains("no check failed: this host can run a node"));
        assert!(summary(&[Ok, Warn]).contains("no check failed, 1 warning"));
        let s = summary(&[Fail, Fail, Warn, Warn]);
        assert!(s.contains("2 checks failed, 2 warnings"), "{s}");
    }

    #[test]
    fn a_bad_config_is_a_failed_check() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("nc.toml");
        std::fs::write(&f, "cc = \"cc-1a:8775\"\n").unwrap();
        let err = options(Some(&f), serde_json::json!({})).unwrap_err();
        assert!(format!("{err:#}").contains("cc"), "{err:#}");
        // A node needs its TLS directory, and a certificate there or a token to join with.
        let err = options(None, serde_json::json!({"hypervisor": "sim"})).unwrap_err();
        assert!(format!("{err:#}").contains("TLS directory"), "{err:#}");
        let tls = dir.path().join("tls");
        let err = options(None, serde_json::json!({"tls_dir": tls})).unwrap_err();
        assert!(format!("{err:#}").contains("no join_token"), "{err:#}");
        let (opts, summary) = options(
            None,
            serde_json::json!({"hypervisor": "sim", "node_id": "hv-9", "tls_dir": tls, "join_token": "t"}),
        )
        .unwrap();
        assert!(opts.libvirt.is_none());
        assert!(
            opts.transport.is_none(),
            "no certificate yet: the CC is not asked"
        );
        assert!(summary.contains("node hv-9, hypervisor sim"), "{summary}");
        let (opts, _) = options(
            None,
            serde_json::json!({"state_dir": "/srv/nc", "tls_dir": tls, "join_token": "t"}),
        )
        .unwrap();
        let libvirt = opts.libvirt.unwrap();
        assert_eq!(libvirt.image_cache_dir, Path::new("/srv/nc/images"));
        assert_eq!(opts.advertise, "http://127.0.0.1:8777");
    }

    /// A real CC answers the doctor's call, with a date the clock check can use.
    #[tokio::test]
    async fn a_running_cc_answers_with_its_clock() {
        let zone = canopy_common::ZoneName::parse("canopy-1a").unwrap();
        let any = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        // No CLC behind it: the CC answers its nodes anyway.
        let cc = canopy_cluster_controller::start(canopy_cluster_controller::CcConfig::new(
            zone,
            any,
            vec!["http://127.0.0.1:9".into()],
        ))
        .await
        .unwrap();
        let url = format!("http://{}", cc.local_addr());
        let answer = host::probe_cc(&url, BOUND, &Default::default())
            .await
            .unwrap();
        assert!(answer.date.is_some(), "the CC sent no date header");
        assert_eq!(host::clock_offset_ms(&answer), Some(0));
        cc.shutdown().await;
    }
}
