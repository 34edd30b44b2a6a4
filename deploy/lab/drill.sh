#!/usr/bin/env bash
# The lab's fault drill (deploy/lab/README.md, "Fault drill"): brings the lab up when it is not
# running (up.sh), runs deploy/lab/drill.py with the repository's venv (boto3), prints its
# summary. Exits 0 only when every check of the drill passed (1: a check failed, 2: the drill
# could not run; up.sh's status when the lab could not be brought up).
#   deploy/lab/drill.sh [--down] [--fresh] [DRILL.PY OPTIONS...]
#     --down    run down.sh afterwards (whatever the result)
#     --fresh   run down.sh before up.sh: the drill starts from an empty cloud
#   e.g. deploy/lab/drill.sh --down --json /tmp/drill.json
#        deploy/lab/drill.sh --faults kill-leader,partition-leader --hold 8
# Env: PYTHON (default .venv/bin/python), and what up.sh and drill.py read (CANOPY_BIN,
# CANOPY_LAB_PORT_PREFIX, CANOPY_DRILL_*).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
[[ -x $PYTHON ]] || die "no $PYTHON (tests/run.sh creates the venv; or set PYTHON to one with boto3)"
"$PYTHON" -c 'import boto3' 2>/dev/null || die "$PYTHON has no boto3 (pip install boto3)"

down=0 fresh=0 args=()
for a in "$@"; do
    case $a in
        --down) down=1 ;;
        --fresh) fresh=1 ;;
        -h | --help)
            sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | grep '^#' | cut -c3-
            echo
            exec "$PYTHON" "$LAB/drill.py" --help
            ;;
        *) args+=("$a") ;;
    esac
done

# Up when every service of docker-compose.yml has a running container and the canopyrc exists
# (drill.py reconnects a container an interrupted drill left off the network).
lab_running() {
    [[ -f $LAB/canopyrc ]] || return 1
    local want n
    want=$(compose config --services | wc -l)
    n=$(docker ps -q --filter "label=com.docker.compose.project=$COMPOSE_PROJECT_NAME" \
        --filter status=running | wc -l)
    ((want > 0 && n == want))
}

started=$SECONDS
if ((fresh)); then
    "$LAB/down.sh"
fi
if ((fresh)) || ! lab_running; then
    log "the lab is not up: up.sh"
    "$LAB/up.sh" >/dev/null
fi

rc=0
"$PYTHON" "$LAB/drill.py" "${args[@]}" || rc=$?
if ((down)); then
    "$LAB/down.sh" || true
fi
log "drill.sh: exit $rc after $((SECONDS - started))s"
exit "$rc"
