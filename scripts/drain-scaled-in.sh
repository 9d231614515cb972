#!/usr/bin/env bash
# Drains the spools that a scale-in of the huggy-bridge StatefulSet left behind: for every claim
# data-huggy-bridge-N whose N is at or above the StatefulSet's replicas (no pod uses it), runs the
# drain Job of deploy/kubernetes/jobs/drain-spool for ordinal N, waits until it completes and prints
# its log. It deletes nothing: the claims' deletion is printed for you to run once you have read the
# logs. Needs kubectl with access to the namespace.
#   scripts/drain-scaled-in.sh [-n NAMESPACE] [--timeout 1h] [--dry-run]
set -euo pipefail
cd "$(dirname "$0")/.."
ns_args=()
timeout=1h
dry_run=0
while [ $# -gt 0 ]; do
  case "$1" in
    -n|--namespace) ns_args=(-n "$2"); shift 2 ;;
    --timeout) timeout="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    *) echo "usage: $0 [-n NAMESPACE] [--timeout 1h] [--dry-run]" >&2; exit 2 ;;
  esac
done
k() { kubectl ${ns_args[@]+"${ns_args[@]}"} "$@"; }

replicas=$(k get statefulset huggy-bridge -o jsonpath='{.spec.replicas}')
ordinals=$(k get pvc -o name | sed -n 's#^persistentvolumeclaim/data-huggy-bridge-\([0-9][0-9]*\)$#\1#p' | sort -n)
todo=()
for n in $ordinals; do
  if [ "$n" -ge "$replicas" ]; then todo+=("$n"); fi
done
if [ ${#todo[@]} -eq 0 ]; then
  echo "nothing to drain: no data-huggy-bridge-N claim with N >= $replicas (the StatefulSet's replicas)"
  exit 0
fi
echo "replicas: $replicas; claims left by a scale-in: ${todo[*]}"
rendered=$(kubectl kustomize deploy/kubernetes/jobs/drain-spool)
failed=()
for n in "${todo[@]}"; do
  job="huggy-bridge-drain-$n"
  manifest=$(printf '%s\n' "$rendered" | sed "s/ORDINAL/$n/g")
  if [ "$dry_run" = 1 ]; then
    printf '%s\n' "$manifest" | k apply --dry-run=server -f - >/dev/null && echo "$job: would be created"
    continue
  fi
  printf '%s\n' "$manifest" | k apply -f -
  if k wait --for=condition=complete "job/$job" --timeout="$timeout"; then
    k logs "job/$job" --tail=50
    echo "$job: complete. Once you have read its log: kubectl ${ns_args[*]:-} delete pvc data-huggy-bridge-$n files-huggy-bridge-$n"
  else
    k logs "job/$job" --tail=50 || true
    echo "$job: not complete within $timeout; the claims stay. See: kubectl ${ns_args[*]:-} describe job/$job" >&2
    failed+=("$n")
  fi
done
if [ ${#failed[@]} -gt 0 ]; then exit 1; fi
