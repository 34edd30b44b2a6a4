#!/usr/bin/env bash
# Drives a running lab with the AWS CLI, as a user would: the zones, 4 instances in each zone
# (Placement.AvailabilityZone) and one through another replica, all running (shown with their
# zone, address and the nodes' load), then everything terminated. Run after up.sh.
# Uses `aws` from PATH, else .venv/bin/aws (tests/run.sh creates it).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

[[ -f $LAB/canopyrc ]] || die "no deploy/lab/canopyrc: run deploy/lab/up.sh first"
set -a; . "$LAB/canopyrc"; set +a
AWS=$(command -v aws || echo "$ROOT/.venv/bin/aws")
[[ -x $AWS ]] || die "no AWS CLI: pip install awscli, or run tests/run.sh for .venv/bin/aws"
aws() { "$AWS" "$@"; }

# Polls until every instance given is in state $1 (the CLI's waiters poll only every 15 s).
wait_state() {
    local want=$1 states
    shift
    for _ in $(seq 1 120); do
        states=$(aws ec2 describe-instances --instance-ids "$@" \
            --query 'Reservations[].Instances[].State.Name' --output text)
        [[ $(tr '\t' '\n' <<<"$states" | sort -u) == "$want" ]] && return 0
        sleep 0.5
    done
    die "instances not $want after 60s: $states"
}

zones=$(aws ec2 describe-availability-zones --query 'AvailabilityZones[?State==`available`].ZoneName' --output text)
log "available zones: $zones"
[[ $zones == *canopy-1a* && $zones == *canopy-1b* ]] || die "expected canopy-1a and canopy-1b"
# With real guests (CANOPY_LAB_HYPERVISOR=libvirt, up.sh registered the test guest): one
# guest per zone, each booted under QEMU in its node's container; else 4 simulated ones.
image=$(aws ec2 describe-images --filters Name=name,Values=canopy-test-guest --query 'Images[0].ImageId' --output text)
count=1
if [[ $image != ami-* ]]; then
    image=$(aws ec2 describe-images --query 'Images[0].ImageId' --output text)
    count=4
fi

ids=()
for zone in canopy-1a canopy-1b; do
    # shellcheck disable=SC2207
    launched=($(aws ec2 run-instances --image-id "$image" --instance-type t2.micro --count "$count" \
        --placement "AvailabilityZone=$zone" --query 'Instances[].InstanceId' --output text))
    log "$zone: launched ${launched[*]}"
    ids+=("${launched[@]}")
done
# Followers forward to the leader: launch through clc-2's endpoint too (clc-1's is P1773).
# shellcheck disable=SC2207
ids+=($(AWS_ENDPOINT_URL_EC2=${AWS_ENDPOINT_URL_EC2%1773}2773 aws ec2 run-instances \
    --image-id "$image" --instance-type t2.nano --query 'Instances[].InstanceId' --output text))
wait_state running "${ids[@]}"
if ((count == 1)); then
    # Real guests: each says on its console that it booted.
    for iid in "${ids[@]}"; do
        for _ in $(seq 1 90); do
            out=$(aws ec2 get-console-output --instance-id "$iid" --query Output --output text 2>/dev/null || true)
            [[ $out == *"canopy-test-guest: instance $iid is up"* ]] && break
            sleep 1
        done
        [[ $out == *"canopy-test-guest: instance $iid is up"* ]] || die "$iid did not boot: ${out: -400}"
        log "$iid booted: $(grep -m1 'is up' <<<"$out")"
    done
fi
aws ec2 describe-instances --instance-ids "${ids[@]}" --output text \
    --query 'Reservations[].Instances[].[InstanceId,State.Name,Placement.AvailabilityZone,PrivateIpAddress]' |
    sort -k3 >&2
docker exec "$(compose ps -q clc-1)" sh -c '. /var/lib/canopy/clc/canopyrc && canopy admin nodes' >&2
used=$(aws ec2 describe-instances --instance-ids "${ids[@]}" \
    --query 'Reservations[].Instances[].Placement.AvailabilityZone' --output text | tr '\t' '\n' | sort -u | xargs)
[[ $used == "canopy-1a canopy-1b" ]] || die "instances ran in: $used"

aws ec2 terminate-instances --instance-ids "${ids[@]}" >/dev/null
wait_state terminated "${ids[@]}"
log "smoke test passed: ${#ids[@]} instances ran in $used and were terminated"

