#!/usr/bin/env bash
# Canopy's one test command (CI runs it through .ci/run; run it yourself the same way):
#   format check, clippy, unit/integration tests, build of the `canopy` binary, and the
#   end-to-end suite (tests/e2e, pytest + boto3 + AWS CLI against a real `canopy dev`).
# Creates .venv with the pinned test clients (tests/requirements.txt) when it is missing.
# Extra arguments go to pytest, e.g. `tests/run.sh -k restart -x`.
# Then, with Docker, the multi-node lab's fault drill (deploy/lab/drill.sh) and the node
# install test (deploy/node/test-install.sh), unless pytest got arguments or SKIP_LAB=1.
# Env: SKIP_RUST_CHECKS=1 skips fmt/clippy/cargo test (build + e2e only).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
VENV="$ROOT/.venv"
REQS="$ROOT/tests/requirements.txt"
START=$(date +%s)

declare -a STAGES=()
FAILED=0
E2E_RESULT="not run"

stage() { printf '\n==> %s\n' "$*"; }
elapsed() { echo "$(( $(date +%s) - START ))s"; }

summary() {
    local status=$?
    local verdict="PASSED"
    if (( FAILED )) || (( status != 0 )); then verdict="FAILED"; fi
    printf '\n'
    printf '==> summary\n'
    local s
    for s in "${STAGES[@]}"; do printf '    %s\n' "$s"; done
    printf 'tests/run.sh: %s (%s) - e2e: %s\n' "$verdict" "$(elapsed)" "$E2E_RESULT"
}
trap summary EXIT

# run NAME CMD...: runs one stage, records ok/FAILED, keeps going.
run() {
    local name=$1; shift
    local t0=$SECONDS
    stage "$name: $*"
    if "$@"; then
        STAGES+=("ok      $name ($(( SECONDS - t0 ))s)")
        return 0
    else
        local rc=$?
        STAGES+=("FAILED  $name (exit $rc, $(( SECONDS - t0 ))s)")
        FAILED=1
        return $rc
    fi
}

ensure_venv() {
    # Runs inside `if`, where `set -e` is off: every step checks itself.
    local stamp="$VENV/.requirements.sha256" want py=${PYTHON:-python3}
    want=$(sha256sum "$REQS" | cut -d' ' -f1) || return 1
    if [[ -x "$VENV/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
        echo "up to date: $VENV"
        return 0
    fi
    if [[ ! -x "$VENV/bin/python" ]]; then
        echo "creating $VENV"
        if ! "$py" -m venv "$VENV"; then
            # Debian's python3 without python3-venv has no ensurepip: make the venv without
            # pip and let the interpreter's own pip install into it.
            rm -rf "$VENV"
            "$py" -m venv --without-pip "$VENV" || return 1
            "$py" -m pip --python "$VENV/bin/python" install -q --disable-pip-version-check -r "$REQS" || return 1
            echo "$want" >"$stamp"
            return 0
        fi
    fi
    echo "installing the test clients from tests/requirements.txt"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$REQS" || return 1
    echo "$want" >"$stamp"
}

e2e() {
    local rc=0
    "$VENV/bin/python" -m pytest tests/e2e -q "$@" || rc=$?
    case $rc in
        0) E2E_RESULT="passed" ;;
        5) E2E_RESULT="FAILED: pytest collected no tests"; echo "pytest ran no tests (exit 5): that is a failure" >&2 ;;
        *) E2E_RESULT="FAILED (pytest exit $rc)" ;;
    esac
    return $rc
}

# The libvirt driver (cargo feature `libvirt` of the canopy crate) builds against libvirt's
# C library: checked, tested and built into the e2e binary when its headers are installed
# (Debian: libvirt-dev), which CI requires (.ci/run sets CI).
FEATURES=()
if pkg-config --exists libvirt 2>/dev/null; then
    FEATURES=(--features canopy/libvirt)
elif [[ -n ${CI:-} ]]; then
    echo "libvirt-dev is missing under CI: the libvirt driver would go unchecked" >&2
    FAILED=1
else
    echo "note: libvirt-dev is not installed: the libvirt driver is not built or tested" >&2
fi

if [[ "${SKIP_RUST_CHECKS:-0}" != 1 ]]; then
    run "cargo fmt" cargo fmt --all -- --check || true
    run "cargo clippy" cargo clippy --workspace --all-targets "${FEATURES[@]}" -- -D warnings || true
    run "cargo test" cargo test --workspace "${FEATURES[@]}" || true
fi
if run "cargo build" cargo build -p canopy "${FEATURES[@]}"; then
    run "python venv" ensure_venv && run "e2e (pytest)" e2e "$@" || true
    # The multi-node lab's fault drill and the node install, in containers (deploy/lab,
    # deploy/node): they need Docker, which CI has. Skipped when pytest was given a
    # selection (a quick local run), or with SKIP_LAB=1.
    if [[ $# -eq 0 && ${SKIP_LAB:-0} != 1 ]]; then
        if docker info >/dev/null 2>&1; then
            run "lab fault drill" env CANOPY_BIN="$ROOT/target/debug/canopy" \
                deploy/lab/drill.sh --fresh --down || true
            run "node install" deploy/node/test-install.sh "$ROOT/target/debug/canopy" || true
        elif [[ -n ${CI:-} ]]; then
            echo "Docker is not usable under CI: the lab's fault drill cannot run" >&2
            FAILED=1
        else
            echo "note: Docker is not usable here: the lab's drill and the node install test are skipped" >&2
        fi
    fi
else
    E2E_RESULT="not run: the build failed"
fi

(( FAILED == 0 ))
