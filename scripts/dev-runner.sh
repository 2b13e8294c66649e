#!/usr/bin/env bash
# Run the real extension runner (ghcr.io/alga/runner) in Docker for local development.
#
#   scripts/dev-runner.sh runner    # only the runner, on 127.0.0.1:8085: run your gateway on the host
#                                   # (config/runner.yaml's default docker URL is http://127.0.0.1:8085)
#   scripts/dev-runner.sh up        # the runner and the gateway (Dockerfile) on 127.0.0.1:8000
#   scripts/dev-runner.sh down | logs | ps | config
#
# Both come from docker-compose.runner-dev.yml. No Docker? `runner-mw devrunner` is a stand-in
# that speaks the runner's HTTP contract on the same port (python3 scripts/dev.py demo uses it).
set -euo pipefail
cd "$(dirname "$0")/.."

file=docker-compose.runner-dev.yml
if docker compose version >/dev/null 2>&1; then
  compose=(docker compose -f "$file")
elif command -v docker-compose >/dev/null 2>&1; then
  compose=(docker-compose -f "$file")
else
  echo "dev-runner.sh: needs Docker Compose (docker compose, or docker-compose)" >&2
  exit 1
fi

wait_for() {  # wait_for URL NAME: poll until it answers, 120 s at most
  local url=$1 name=$2 deadline=$((SECONDS + 120))
  until curl -fsS -o /dev/null --noproxy '*' "$url" 2>/dev/null; do
    if ((SECONDS > deadline)); then
      echo "dev-runner.sh: $name did not answer at $url within 120 s; see: $0 logs" >&2
      exit 1
    fi
    sleep 1
  done
  echo "$name is up: $url"
}

command=${1:-up}
shift || true
case "$command" in
  runner)
    "${compose[@]}" up -d "$@" runner
    wait_for http://127.0.0.1:8085/healthz "the runner"
    ;;
  up)
    "${compose[@]}" up -d --build "$@"
    wait_for http://127.0.0.1:8085/healthz "the runner"
    wait_for http://127.0.0.1:8000/runner/-/healthz "the gateway"
    echo "open http://127.0.0.1:8000/"
    ;;
  down | logs | ps | config)
    "${compose[@]}" "$command" "$@"
    ;;
  *)
    sed -n '2,10p' "$0" >&2
    exit 2
    ;;
esac
