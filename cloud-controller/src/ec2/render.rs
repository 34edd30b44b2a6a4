//! EC2 XML shapes shared by several actions.

use canopy_common::InstanceState;
use canopy_ec2_wire::xml::{XmlWriter, timestamp};

use crate::state::{Instance, Tag};

pub fn state(w: &mut XmlWriter, name: &str, s: InstanceState) {
    w.nested(name, |w| {
        w.elem("code", s.code()).elem("name", s.name());
    });
}

pub fn tag_set(w: &mut XmlWriter, tags: &[Tag]) {
    w.list("tagSet", tags, |w, t| {
        w.elem("key", &t.key).elem("value", &t.value);
    });
}

/// The private DNS name Canopy gives an instance until networking assigns addresses.
pub fn private_dns(i: &Instance) -> String {
    format!("{}.{}.compute.internal", i.instance_id, i.zone)
}

/// EC2's `InstanceMetadataOptionsResponse`.
pub fn metadata_options(w: &mut XmlWriter, name: &str, o: crate::state::MetadataOptions) {
    w.nested(name, |w| {
        w.elem("state", "applied")
            .elem("httpTokens", o.http_tokens())
            .elem("httpPutResponseHopLimit", 1)
            .elem("httpEndpoint", o.http_endpoint())
            .elem("httpProtocolIpv6", "disabled")
            .elem("instanceMetadataTags", "disabled");
    });
}

/// EC2's `Instance` shape, as DescribeInstances and RunInstances return it.
pub fn instance(w: &mut XmlWriter, i: &Instance) {
    w.elem("instanceId", &i.instance_id)
        .elem("imageId", &i.image_id);
    state(w, "instanceState", i.state);
    let dns = if i.state == InstanceState::Terminated {
        String::new()
    } else {
        private_dns(i)
    };
    w.elem("privateDnsName", &dns)
        .opt_elem(
            "privateIpAddress",
            i.private_ip
                .filter(|_| i.state != InstanceState::Terminated),
        )
        .elem("dnsName", "")
        .opt_elem("ipAddress", i.public_ip)
        .elem("reason", &i.transition_reason)
        .opt_elem("keyName", i.key_name.as_ref())
        .elem("amiLaunchIndex", i.launch_index)
        .list("productCodes", std::iter::empty::<()>(), |_, _| {})
        .elem("instanceType", &i.instance_type)
        .opt_elem("kernelId", i.kernel_id.as_ref())
        .opt_elem("ramdiskId", i.ramdisk_id.as_ref())
        .elem("launchTime", timestamp(i.launch_time))
        .nested("placement", |w| {
            w.elem("availabilityZone", &i.zone)
                .elem("groupName", "")
                .elem("tenancy", "default");
        })
        .nested("monitoring", |w| {
            w.elem("state", "disabled");
        })
        .list("groupSet", &i.security_groups, |w, (id, name)| {
            w.elem("groupId", id).elem("groupName", name);
        });
    if let Some(reason) = &i.state_reason {
        w.nested("stateReason", |w| {
            w.elem("code", &reason.code)
                .elem("message", &reason.message);
        });
    }
    w.elem("architecture", "x86_64")
        .elem("rootDeviceType", "instance-store")
        .elem("rootDeviceName", "/dev/sda1")
        .list("blockDeviceMapping", &i.volumes, |w, v| {
            w.elem("deviceName", &v.device).nested("ebs", |w| {
                w.elem("volumeId", &v.volume_id)
                    .elem("status", v.status.name())
                    .elem("attachTime", timestamp(v.attach_time))
                    .bool_elem("deleteOnTermination", v.delete_on_termination);
            });
        })
        .elem("virtualizationType", "hvm")
        .opt_elem("clientToken", i.client_token.as_ref())
        .elem("hypervisor", "xen")
        .list("networkInterfaceSet", std::iter::empty::<()>(), |_, _| {})
        .bool_elem("ebsOptimized", false)
        .bool_elem("enaSupport", false)
        .bool_elem("sourceDestCheck", true)
        .nested("cpuOptions", |w| {
            w.elem("coreCount", i.resources.vcpus)
                .elem("threadsPerCore", 1);
        })
        .elem("platformDetails", "Linux/UNIX")
        .elem("usageOperation", "RunInstances")
        .elem("currentInstanceBootMode", "legacy-bios");
    metadata_options(w, "metadataOptions", i.metadata_options);
    tag_set(w, &i.tags);
}
