#!/usr/bin/env bash
# Copies the CRDs of crds/ (the one source) into the chart, byte for byte:
# charts/memspace/files/crds/, which templates/crds.yaml renders (crds.install). A test
# (tests/chart/test_chart.py) fails when the copy is stale; this script is the fix.
#
#   hack/sync-chart-crd.sh           copy
#   hack/sync-chart-crd.sh --check   exit 1 (saying which file) when the copy differs
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
source_dir="$repo/crds"
chart_dir="$repo/charts/memspace/files/crds"
check=false
case "${1:-}" in
  "") ;;
  --check) check=true ;;
  *) echo "usage: $0 [--check]" >&2; exit 2 ;;
esac

status=0
mkdir -p "$chart_dir"
for source in "$source_dir"/*.yaml; do
  copy="$chart_dir/$(basename "$source")"
  if cmp -s "$source" "$copy"; then
    continue
  fi
  if "$check"; then
    echo "sync-chart-crd: ${copy#"$repo/"} differs from ${source#"$repo/"}; run hack/sync-chart-crd.sh" >&2
    status=1
  else
    cp "$source" "$copy"
    echo "sync-chart-crd: updated ${copy#"$repo/"}"
  fi
done
# A CRD removed from crds/ goes from the chart too.
for copy in "$chart_dir"/*.yaml; do
  [[ -e "$copy" ]] || continue
  if [[ ! -e "$source_dir/$(basename "$copy")" ]]; then
    if "$check"; then
      echo "sync-chart-crd: ${copy#"$repo/"} has no source in crds/" >&2
      status=1
    else
      rm "$copy"
      echo "sync-chart-crd: removed ${copy#"$repo/"}"
    fi
  fi
done
exit "$status"
