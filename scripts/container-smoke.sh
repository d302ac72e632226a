#!/usr/bin/env bash
# Build the CPU image and run the BIDS-App through it end to end, the way a
# locked-down cluster would: read-only root file system (tmpfs /tmp), an
# arbitrary non-root user, no network, input mounted read-only.
#
#   scripts/container-smoke.sh                  # build + all stages
#   IMAGE=regionmae:cpu SKIP_BUILD=1 scripts/container-smoke.sh   # reuse an image
#
# Stages: --version, synthetic data (regionmae-synth), participant,
# group pretrain, group finetune, participant predict, bids-validator-deno on
# the outputs. A stage whose workflow module is not in the package yet is
# reported as SKIP; --version and participant are required.
#
# Environment:
#   IMAGE            image tag to build/run            [regionmae:cpu-smoke]
#   SKIP_BUILD=1     do not build; IMAGE must exist
#   BASE_IMAGE       base for the CPU build [output of ../shared/tools/local-docker.sh
#                    when present, else python:3.11-slim-bookworm]
#   TORCH_SPEC       [torch==2.13.0]   TORCH_INDEX_URL (e.g. https://download.pytorch.org/whl/cpu)
#   TEMPLATES_SRC    a TEMPLATEFLOW_HOME-like folder copied into the image
#                    [../shared/data/templateflow when present]
#   SMOKE_DIR        where data/outputs go (kept) [a fresh mktemp dir]
#   SUBJECTS, FRAMES synthetic dataset size [4, 24]
#   VALIDATOR        bids-validator-deno executable [.venv/bin/bids-validator-deno]
#   DOCKER           docker CLI [docker]
#
# Exit status: 0 when every stage passed or was skipped (not implemented),
# 1 when a stage failed or a required stage did not pass.
set -uo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO" || exit 1
DOCKER=${DOCKER:-docker}
IMAGE=${IMAGE:-regionmae:cpu-smoke}
SUBJECTS=${SUBJECTS:-4}
FRAMES=${FRAMES:-24}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-}
LOCAL_DOCKER=${LOCAL_DOCKER:-$REPO/../shared/tools/local-docker.sh}
VALIDATOR=${VALIDATOR:-$REPO/.venv/bin/bids-validator-deno}
VERSION=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' bids_regionmae/__init__.py)

log() { printf '\n== %s\n' "$*" >&2; }
declare -a NAMES=() RESULTS=() NOTES=()
record() { NAMES+=("$1"); RESULTS+=("$2"); NOTES+=("${3:-}"); printf -- '-- %s: %s %s\n' "$1" "$2" "${3:-}" >&2; }
summary() {
  local i failed=0
  printf '\n%-22s %-6s %s\n' "stage" "result" "notes"
  for i in "${!NAMES[@]}"; do
    printf '%-22s %-6s %s\n' "${NAMES[$i]}" "${RESULTS[$i]}" "${NOTES[$i]}"
    [ "${RESULTS[$i]}" = FAIL ] && failed=1
  done
  for required in version participant; do
    local ok=0
    for i in "${!NAMES[@]}"; do
      [ "${NAMES[$i]}" = "$required" ] && [ "${RESULTS[$i]}" = PASS ] && ok=1
    done
    [ $ok = 1 ] || { echo "required stage '$required' did not pass"; failed=1; }
  done
  echo "outputs kept in $SMOKE_DIR"
  exit $failed
}

# ---------------------------------------------------------------- daemon, base
if ! "$DOCKER" info >/dev/null 2>&1; then
  if [ -x "$LOCAL_DOCKER" ]; then
    log "no Docker daemon: starting one with $LOCAL_DOCKER"
    BASE_IMAGE=${BASE_IMAGE:-$("$LOCAL_DOCKER")} || { echo "could not start Docker" >&2; exit 1; }
  else
    echo "no Docker daemon (docker info failed)" >&2; exit 1
  fi
fi
if [ -z "${BASE_IMAGE:-}" ]; then
  if [ -x "$LOCAL_DOCKER" ]; then BASE_IMAGE=$("$LOCAL_DOCKER"); else BASE_IMAGE=python:3.11-slim-bookworm; fi
fi
NET=()
# The local daemon has no bridge network: builds (pip) need the host's network.
"$DOCKER" network inspect bridge >/dev/null 2>&1 || NET=(--network host)

SMOKE_DIR=${SMOKE_DIR:-$(mktemp -d /tmp/regionmae-smoke.XXXXXX)}
mkdir -p "$SMOKE_DIR"
SMOKE_DIR=$(cd "$SMOKE_DIR" && pwd)

# ---------------------------------------------------------------- build
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  TEMPLATES_SRC=${TEMPLATES_SRC:-$REPO/../shared/data/templateflow}
  templates_from=none
  rm -rf .docker-templates
  if [ -d "$TEMPLATES_SRC" ]; then
    mkdir -p .docker-templates/templateflow
    cp -r "$TEMPLATES_SRC"/. .docker-templates/templateflow/
    templates_from=context
  fi
  log "building $IMAGE from $BASE_IMAGE (CPU torch: $TORCH_SPEC, templates: $templates_from)"
  start=$(date +%s)
  if "$DOCKER" build "${NET[@]}" -t "$IMAGE" \
      --build-arg BASE_IMAGE="$BASE_IMAGE" --build-arg BUILDER_IMAGE="$BASE_IMAGE" \
      --build-arg WITH_MAMBA=0 --build-arg TORCH_SPEC="$TORCH_SPEC" \
      --build-arg TORCH_INDEX_URL="$TORCH_INDEX_URL" --build-arg TEMPLATES_FROM="$templates_from" \
      --build-arg VERSION="$VERSION" --build-arg IMAGE_NAME="${IMAGE%%:*}" \
      --build-arg BUILD_DATE="$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
      --build-arg VCS_REF="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" \
      . >"$SMOKE_DIR/build.log" 2>&1; then
    record build PASS "$(( $(date +%s) - start )) s; $("$DOCKER" image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.2f GB", $1/1e9}')"
  else
    tail -40 "$SMOKE_DIR/build.log" >&2
    record build FAIL "see $SMOKE_DIR/build.log"
    rm -rf .docker-templates
    summary
  fi
  rm -rf .docker-templates
fi

# ---------------------------------------------------------------- helpers
DATA=$SMOKE_DIR/fmriprep OUT=$SMOKE_DIR/derivatives WORK=$SMOKE_DIR/work
rm -rf "$OUT" "$WORK"; mkdir -p "$OUT" "$WORK" "$DATA"
# The caller's uid/gid; as root, an arbitrary uid with no /etc/passwd entry
# instead, to prove the image does not need a known user.
RUN_UID=${RUN_UID:-$(id -u)} RUN_GID=${RUN_GID:-$(id -g)}
if [ "$RUN_UID" = 0 ]; then RUN_UID=54321 RUN_GID=54321; fi
if [ "$(id -u)" = 0 ]; then chown "$RUN_UID:$RUN_GID" "$OUT" "$WORK" "$DATA"; fi
# Locked down: read-only root, tmpfs /tmp, that uid/gid, no network at all.
RUN=("$DOCKER" run --rm --read-only --tmpfs "/tmp:rw,exec,size=4g" -u "$RUN_UID:$RUN_GID" --network none)

# Settings for a dataset this small: no validation split inside the two
# cross-validation folds (4 participants leave 2 per fold for training).
mkdir -p "$SMOKE_DIR/config"
printf '# container smoke test: tiny dataset\n[train]\nval_fraction = 0.0\n' >"$SMOKE_DIR/config/smoke.toml"

regionmae() {  # regionmae ARGS... (input and config read-only, output and work dirs mounted)
  "${RUN[@]}" -v "$DATA":/data:ro -v "$SMOKE_DIR/config":/config:ro -v "$OUT":/out -v "$WORK":/work \
    "$IMAGE" "$@"
}
has_module() {  # has_module bids_regionmae.workflows.X
  "${RUN[@]}" --entrypoint python "$IMAGE" -c \
    "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('$1') else 1)" 2>/dev/null
}
run_stage() {  # run_stage NAME MODULE ARGS...
  local name=$1 module=$2; shift 2
  if ! has_module "$module"; then record "$name" SKIP "$module not in the package yet"; return 1; fi
  log "$name: regionmae $*"
  local start; start=$(date +%s)
  if regionmae "$@" >"$SMOKE_DIR/$name.log" 2>&1; then
    record "$name" PASS "$(( $(date +%s) - start )) s"
  else
    local rc=$?
    tail -25 "$SMOKE_DIR/$name.log" >&2
    record "$name" FAIL "exit $rc, see $SMOKE_DIR/$name.log"
    return 1
  fi
}
models() {  # the model directories in OUT/models, one per line
  find "$OUT/models" -mindepth 1 -maxdepth 1 -type d -printf '%f\n' 2>/dev/null | sort
}
new_model() {  # new_model BEFORE: a model directory that appeared since BEFORE, as seen in the container
  local d
  d=$(comm -13 <(echo "$1") <(models) | tail -1)
  if [ -n "$d" ]; then echo "/out/models/$d"; fi
}

# ---------------------------------------------------------------- stages
log "--version"
if v=$("${RUN[@]}" "$IMAGE" --version 2>&1) && [[ $v == *"$VERSION"* ]]; then
  record version PASS "$v"
else
  record version FAIL "$v"
  summary
fi

log "synthetic dataset ($SUBJECTS subjects x $FRAMES frames)"
if "${RUN[@]}" -v "$DATA":/data --entrypoint regionmae-synth "$IMAGE" \
     /data --subjects "$SUBJECTS" --frames "$FRAMES" >"$SMOKE_DIR/synth.log" 2>&1; then
  record synth PASS "in the container"
elif command -v regionmae-synth >/dev/null 2>&1 || [ -x "$REPO/.venv/bin/regionmae-synth" ]; then
  synth=$(command -v regionmae-synth || echo "$REPO/.venv/bin/regionmae-synth")
  rm -rf "$DATA"
  if "$synth" "$DATA" --subjects "$SUBJECTS" --frames "$FRAMES" >>"$SMOKE_DIR/synth.log" 2>&1; then
    record synth PASS "on the host (not in the image: $(tail -1 "$SMOKE_DIR/synth.log"))"
  else
    record synth FAIL "see $SMOKE_DIR/synth.log"; summary
  fi
else
  record synth FAIL "regionmae-synth neither in the image nor on the host"; summary
fi

run_stage participant bids_regionmae.workflows.participant \
  /data /out participant --work-dir /work --nprocs 2 -v

before=$(models)
if run_stage pretrain bids_regionmae.workflows.pretrain \
     /data /out group --stage pretrain --variant tiny --max-steps 5 --batch-size 2 --work-dir /work -v; then
  pretrained=$(new_model "$before")
fi

finetune_args=(/data /out group --stage finetune --target diagnosis --folds 2 --epochs 1 --batch-size 2
               --config-file /config/smoke.toml --work-dir /work -v)
if [ -n "${pretrained:-}" ]; then finetune_args+=(--model "$pretrained"); fi
before=$(models)
if run_stage finetune bids_regionmae.workflows.finetune "${finetune_args[@]}"; then
  finetuned=$(new_model "$before")
fi

model=${finetuned:-${pretrained:-}}
if [ -n "$model" ]; then
  run_stage predict bids_regionmae.workflows.predict \
    /data /out participant --model "$model" --work-dir /work -v
else
  record predict SKIP "no trained model from the stages above"
fi

# ---------------------------------------------------------------- checks
log "checks on $OUT"
if [ -f "$OUT/dataset_description.json" ]; then
  container=$(python3 -c "import json,sys; d=json.load(open(sys.argv[1])); \
print(json.dumps(d['GeneratedBy'][0].get('Container')))" "$OUT/dataset_description.json" 2>&1)
  if [[ $container == *'"docker"'* ]]; then record provenance PASS "GeneratedBy.Container=$container"
  else record provenance FAIL "GeneratedBy.Container=$container"; fi
  foreign=$(find "$OUT" "$WORK" ! -uid "$RUN_UID" | head -3)
  if [ -z "$foreign" ]; then record ownership PASS "all outputs owned by uid $RUN_UID"
  else record ownership FAIL "not owned by uid $RUN_UID: $foreign"; fi
else
  record provenance FAIL "no dataset_description.json in $OUT"
fi

if [ -x "$VALIDATOR" ] || VALIDATOR=$(command -v bids-validator-deno); then
  "$VALIDATOR" "$OUT" --format json --datasetTypes derivative >"$SMOKE_DIR/validator.json" 2>"$SMOKE_DIR/validator.err"
  errors=$(python3 - "$SMOKE_DIR/validator.json" <<'EOF'
import json, sys
try:
    issues = json.load(open(sys.argv[1]))["issues"]["issues"]
except Exception as exc:  # noqa: BLE001
    print(f"unreadable report: {exc}"); sys.exit()
errs = [i for i in issues if i.get("severity") == "error"]
print(len(errs), "errors", "; ".join(sorted({i.get("code", "?") for i in errs}))[:300])
EOF
)
  if [[ $errors == "0 errors"* ]]; then record bids-validator PASS "$errors"
  else record bids-validator FAIL "$errors (report: $SMOKE_DIR/validator.json)"; fi
else
  record bids-validator SKIP "bids-validator-deno not installed (pip install bids-validator-deno)"
fi

summary
