#!/usr/bin/env bash
# Installs Label Studio 1.23 into its OWN virtualenv (its pins clash with the
# service's ML dependencies) and builds a migrated SQLite template database,
# so that tests/labelstudio_server.py can start a fresh Label Studio in seconds
# instead of running ~40 s of migrations every time.
#
# Idempotent: a second run only checks the installed version and the template
# and takes a few seconds. Works from scratch on a clean machine (needs
# python3 >= 3.10 with venv, and access to PyPI).
#
# Environment:
#   LABEL_STUDIO_VENV   venv path (default ~/.cache/mmdet-ls-backend/labelstudio-1.23-venv)
#   PYTHON              interpreter used to create the venv (default python3)
#   LABEL_STUDIO_SPEC   pip requirement (default "label-studio==1.23.*")
#   FORCE=1             rebuild the template even if it exists
#
# Layout (the harness computes the same paths):
#   $LABEL_STUDIO_VENV/                                  the venv
#   $LABEL_STUDIO_VENV/mmdet-ls-template/<version>/label_studio.sqlite3
#                                                        migrated, empty DB (no users)
set -euo pipefail

SERIES=1.23
VENV=${LABEL_STUDIO_VENV:-$HOME/.cache/mmdet-ls-backend/labelstudio-$SERIES-venv}
PY=${PYTHON:-python3}
SPEC=${LABEL_STUDIO_SPEC:-label-studio==$SERIES.*}
NICE="nice -n ${NICE_LEVEL:-10}"

mkdir -p "$(dirname "$VENV")"

# Serialize concurrent runs (two test sessions starting at once on CI).
if command -v flock >/dev/null 2>&1; then
  exec 9>"$(dirname "$VENV")/.$(basename "$VENV").lock"
  flock 9
fi

installed_version() {
  [ -x "$VENV/bin/python" ] || return 1
  "$VENV/bin/python" - <<'EOF' 2>/dev/null
import importlib.metadata as m
print(m.version("label-studio"))
EOF
}

t0=$(date +%s)
VERSION=$(installed_version || true)
case "$VERSION" in
  "$SERIES".*)
    echo "Label Studio $VERSION already installed in $VENV" ;;
  *)
    if [ -n "$VERSION" ]; then
      echo "Found Label Studio $VERSION in $VENV, want $SERIES.*: reinstalling"
    fi
    if [ -e "$VENV" ] && ! "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
      echo "Broken venv at $VENV: recreating"
      rm -rf "$VENV"
    fi
    if [ ! -x "$VENV/bin/python" ]; then
      "$PY" -m venv "$VENV"
    fi
    echo "Installing $SPEC into $VENV (about 1-3 minutes)..."
    $NICE "$VENV/bin/python" -m pip install -q --upgrade "pip>=24"
    $NICE "$VENV/bin/python" -m pip install -q "$SPEC"
    VERSION=$(installed_version)
    case "$VERSION" in
      "$SERIES".*) ;;
      *) echo "ERROR: pip installed label-studio '$VERSION', expected $SERIES.*" >&2; exit 1 ;;
    esac
    ;;
esac

# Migrated template DB, keyed on the exact Label Studio version.
TEMPLATE_DIR="$VENV/mmdet-ls-template/$VERSION"
TEMPLATE="$TEMPLATE_DIR/label_studio.sqlite3"
if [ ! -s "$TEMPLATE" ] || [ "${FORCE:-0}" = 1 ]; then
  echo "Building migrated template database for Label Studio $VERSION (about 40 s)..."
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/ls-template.XXXXXX")
  trap 'rm -rf "$WORK"' EXIT
  # `label-studio version` runs all migrations on LABEL_STUDIO_BASE_DATA_DIR and
  # exits without starting a server. Minimal environment: Label Studio reads
  # many bare names (HOST, PORT, USERNAME, PASSWORD, DEBUG, ...) from env.
  if ! env -i PATH="/usr/bin:/bin" HOME="$HOME" LANG=C.UTF-8 TMPDIR="${TMPDIR:-/tmp}" \
      LABEL_STUDIO_BASE_DATA_DIR="$WORK/data" \
      COLLECT_ANALYTICS=false LATEST_VERSION_CHECK=false SENTRY_DSN= FRONTEND_SENTRY_DSN= \
      LOG_LEVEL=WARNING \
      $NICE "$VENV/bin/label-studio" version >"$WORK/migrate.log" 2>&1; then
    cat "$WORK/migrate.log" >&2
    echo "ERROR: migrating the template database failed" >&2
    exit 1
  fi
  if [ ! -s "$WORK/data/label_studio.sqlite3" ]; then
    cat "$WORK/migrate.log" >&2
    echo "ERROR: no database produced in $WORK/data" >&2
    exit 1
  fi
  mkdir -p "$TEMPLATE_DIR"
  cp "$WORK/data/label_studio.sqlite3" "$TEMPLATE.tmp"
  mv -f "$TEMPLATE.tmp" "$TEMPLATE"
fi

echo "Label Studio $VERSION: venv $VENV"
echo "  label-studio: $VENV/bin/label-studio"
echo "  template DB:  $TEMPLATE"
echo "  ($(( $(date +%s) - t0 )) s)"
