#!/usr/bin/env bash
# `make test-docker`: the container leg. Budget: 15 minutes on a clean clone of a 2-core machine, apt included.
#
# 1. A Docker daemon: the one at DOCKER_HOST (or the default socket) if it answers. Otherwise, as root
#    on a Debian-like machine, Debian's docker.io (installed if missing, its service left unstarted) is
#    started as a PRIVATE daemon: its own socket, exec root, pid file and bridge, no iptables, no IP
#    forwarding, no masquerading; never /var/run/docker.sock. Anywhere else: one line saying why, exit 2.
# 2. The image: LAB_POSTGRES_IMAGE if set, else the registry-free one (python -m lab.postgres.image),
#    found again by its content: the private daemon's data root is kept in the user's cache.
# 3. The oldest testcontainers that pyproject admits, installed beside the newest (for one test).
# 4. pytest tests/container. Then the private daemon, its containerd, its bridge and its temp dir are
#    gone, and so is every lab container; if not, the leg fails.
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=.venv/bin
OWNER=org.idempotency-lab.owner  # lab/postgres/container.py's label
leg_started=$SECONDS

say() { printf 'test-docker: %s\n' "$*"; }
cannot() { printf 'make test-docker: cannot run here: %s\n' "$*" >&2; said_why=1; exit 2; }
answers() {
	"$BIN/python" -c 'import sys; from lab.postgres.provision import docker_daemon_answers as ping
sys.exit(not ping(2.0, sys.argv[1]))' "$1"
}
elapsed() { printf '%d.%02d s' $(( ($2 - $1) / 1000 )) $(( ($2 - $1) % 1000 / 10 )); }
now_ms() { date +%s%3N; }

remove_lab_containers() {  # prints how many there were
	"$BIN/python" -c 'import contextlib, sys, docker
with contextlib.closing(docker.from_env()) as client:
    found = client.containers.list(all=True, filters={"label": sys.argv[1]})
    [c.remove(force=True, v=True) for c in found]
    print(len(found))' "$OWNER" 2>/dev/null
}

run_dir="" dockerd_pid="" bridge="" policy_added="" dockerd_made="" said_why=""
cleanup() {
	local status=$? left
	trap - EXIT INT TERM
	if [ -n "${DOCKER_HOST:-}" ] && left=$(remove_lab_containers) && [ "$left" != 0 ]; then
		say "FAILED: $left lab container(s) were left on the daemon (removed now)"
		status=1
	fi
	if [ -n "$dockerd_pid" ]; then
		kill -TERM "$dockerd_pid" 2>/dev/null || true
		for _ in $(seq 1 200); do kill -0 "$dockerd_pid" 2>/dev/null || break; sleep 0.1; done
		if kill -0 "$dockerd_pid" 2>/dev/null; then
			say "FAILED: the private daemon did not stop within 20 s; killed"
			kill -KILL "$dockerd_pid" 2>/dev/null || true
			status=1
		fi
		wait "$dockerd_pid" 2>/dev/null || true
		left=$(pgrep -f -- "$run_dir" || true)  # containerd and its shims name the exec root
		if [ -n "$left" ]; then
			say "FAILED: processes of the private daemon outlived it (killed now): $left"
			# shellcheck disable=SC2086  # one pid a word
			kill -KILL $left 2>/dev/null || true
			status=1
		fi
	fi
	if [ -n "$bridge" ]; then
		ip link del "$bridge" 2>/dev/null || true
		if ip link show "$bridge" >/dev/null 2>&1; then say "FAILED: bridge $bridge is still there"; status=1; fi
	fi
	if [ -n "$policy_added" ]; then rm -f /usr/sbin/policy-rc.d; fi
	for made in $dockerd_made; do rm -rf "$made"; done  # written by dockerd whatever its flags say
	if [ -n "$run_dir" ]; then rm -rf "$run_dir"; fi
	if [ -z "$said_why" ]; then  # "cannot run here" is the one line
		say "$( [ "$status" = 0 ] && echo passed || echo "failed (exit $status)" ) in $(( SECONDS - leg_started )) s"
	fi
	exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

install_docker() {
	command -v apt-get >/dev/null || cannot "no Docker daemon answers and this is no Debian-like machine (no apt-get) to install one on"
	local t0 packages=(docker.io)
	t0=$(now_ms)
	command -v ip >/dev/null || packages+=(iproute2)
	if [ ! -e /usr/sbin/policy-rc.d ]; then  # Debian's way to keep a package's service from starting
		printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
		policy_added=1
	fi
	say "installing Debian's ${packages[*]} (its service stays stopped; the leg starts a private daemon)"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq >/dev/null
	apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
	if [ -n "$policy_added" ]; then rm -f /usr/sbin/policy-rc.d; policy_added=""; fi
	say "installed in $(elapsed "$t0" "$(now_ms)")"
}

start_private_daemon() {
	local cache t0 octet net
	cache=${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/idempotency-lab/dockerd  # images survive the leg: built once
	mkdir -p "$cache"
	exec 9>"$cache.lock"
	flock -w 900 9 || cannot "another make test-docker has held $cache for 15 minutes"
	for octet in $(shuf -i 0-255 -n 32); do  # a /24 that no interface or route of this machine uses
		net=10.213.$octet
		ip -4 route | grep -q "^$net\." || break
	done
	bridge=labdock$$
	ip link add "$bridge" type bridge
	ip addr add "$net.1/24" dev "$bridge"
	ip link set "$bridge" up
	for made in /etc/docker/key.json /var/run/docker; do [ -e "$made" ] || dockerd_made+=" $made"; done
	t0=$(now_ms)
	dockerd -H "unix://$run_dir/docker.sock" --data-root "$cache" --exec-root "$run_dir/exec" \
		--pidfile "$run_dir/dockerd.pid" --bridge="$bridge" --iptables=false --ip-forward=false --ip-masq=false \
		>"$run_dir/dockerd.log" 2>&1 &
	dockerd_pid=$!
	export DOCKER_HOST=unix://$run_dir/docker.sock
	until answers "$DOCKER_HOST"; do
		if ! kill -0 "$dockerd_pid" 2>/dev/null || [ $(( $(now_ms) - t0 )) -gt 60000 ]; then
			say "FAILED: the private daemon did not answer; its log ends:"
			tail -n 5 "$run_dir/dockerd.log" >&2
			exit 1
		fi
		sleep 0.05
	done
	say "private daemon (Debian's dockerd $(dockerd --version | cut -d' ' -f3 | tr -d ,)) answered in" \
		"$(elapsed "$t0" "$(now_ms)") at $DOCKER_HOST, bridge $bridge $net.1/24, data root $cache"
}

[ -x "$BIN/python" ] || cannot "no $BIN/python: run it through make test-docker"
run_dir=$(mktemp -d /tmp/lab-dockerd.XXXXXX)  # logs; the private daemon's socket, exec root and pid file
host=${DOCKER_HOST:-unix:///var/run/docker.sock}
if answers "$host"; then
	export DOCKER_HOST=$host
	say "using the Docker daemon that answers at $DOCKER_HOST"
else
	[ "$(id -u)" = 0 ] || cannot "no Docker daemon answers at $host, and only root can start a private one"
	command -v dockerd >/dev/null || install_docker
	start_private_daemon
fi

if [ -z "${LAB_POSTGRES_IMAGE:-}" ]; then
	LAB_POSTGRES_IMAGE=$("$BIN/python" -m lab.postgres.image 2>"$run_dir/image.log") || { cat "$run_dir/image.log" >&2; exit 1; }
	export LAB_POSTGRES_IMAGE
	say "image $LAB_POSTGRES_IMAGE $(cat "$run_dir/image.log")"
fi

floor=$(sed -n 's/.*"testcontainers>=\([0-9.]*\)".*/\1/p' pyproject.toml)
LAB_TESTCONTAINERS_FLOOR=$PWD/.venv/testcontainers-$floor  # under .venv: make clean removes it
if [ ! -e "$LAB_TESTCONTAINERS_FLOOR/.installed" ]; then
	rm -rf "$LAB_TESTCONTAINERS_FLOOR"
	if ! out=$("$BIN/python" -m pip install --quiet --disable-pip-version-check --no-deps \
		--target "$LAB_TESTCONTAINERS_FLOOR" "testcontainers==$floor" 2>&1); then
		echo "$out" >&2
		exit 1
	fi
	touch "$LAB_TESTCONTAINERS_FLOOR/.installed"
fi
export LAB_TESTCONTAINERS_FLOOR
say "testcontainers $("$BIN/python" -c 'import importlib.metadata as m; print(m.version("testcontainers"))')" \
	"and, for the oldest pyproject admits, $floor in $LAB_TESTCONTAINERS_FLOOR"

t0=$(now_ms)
"$BIN/python" -m pytest tests/container "$@"
say "tests/container took $(elapsed "$t0" "$(now_ms)")"
