#!/bin/sh
# The official postgres image's docker-entrypoint.sh, cut down to what a client of it can see,
# in POSIX sh (the image has /bin/sh and PostgreSQL's own programs, nothing else):
# - POSTGRES_USER (default postgres), POSTGRES_PASSWORD (required unless POSTGRES_HOST_AUTH_METHOD=trust),
#   POSTGRES_DB (default: the user's name), POSTGRES_INITDB_ARGS, /docker-entrypoint-initdb.d/*.sql|*.sh;
# - initdb on the first start only, then a temporary server on the Unix socket alone for the set-up,
#   started by pg_ctl (its log goes to stdout), then `exec postgres` (its log goes to stderr): each says
#   "database system is ready to accept connections" once, and testcontainers 4.8 waits for both.
# It runs as the image's user (postgres, uid 999) from the start, so there is no gosu step.
set -eu

: "${PGDATA:=/var/lib/postgresql/data}"
: "${POSTGRES_USER:=postgres}"
: "${POSTGRES_DB:=$POSTGRES_USER}"
: "${POSTGRES_HOST_AUTH_METHOD:=scram-sha-256}"
export PGDATA

if [ "$#" -eq 0 ] || [ "${1#-}" != "$1" ]; then
	set -- postgres "$@"  # `docker run image -c fsync=off` passes settings to postgres, as upstream's does
fi

if [ "$1" = postgres ] && [ ! -s "$PGDATA/PG_VERSION" ]; then
	if [ -z "${POSTGRES_PASSWORD:-}" ] && [ "$POSTGRES_HOST_AUTH_METHOD" != trust ]; then
		echo "Error: Database is uninitialized and superuser password is not specified." >&2
		echo "       Set POSTGRES_PASSWORD, or POSTGRES_HOST_AUTH_METHOD=trust." >&2
		exit 1
	fi
	# shellcheck disable=SC2086  # POSTGRES_INITDB_ARGS is a list of words, as upstream treats it
	initdb --username="$POSTGRES_USER" --auth-local=trust --auth-host="$POSTGRES_HOST_AUTH_METHOD" \
		--encoding=UTF8 --no-locale ${POSTGRES_INITDB_ARGS:-}
	printf '\nhost all all all %s\n' "$POSTGRES_HOST_AUTH_METHOD" >> "$PGDATA/pg_hba.conf"

	pg_ctl -D "$PGDATA" -o "-c listen_addresses='' -p 5432" -w start
	export PGUSER="$POSTGRES_USER" PGDATABASE=postgres
	if [ -n "${POSTGRES_PASSWORD:-}" ]; then
		psql -v ON_ERROR_STOP=1 --no-password --quiet --set pw="$POSTGRES_PASSWORD" <<-'EOSQL'
			ALTER ROLE CURRENT_USER PASSWORD :'pw';
		EOSQL
	fi
	if [ "$POSTGRES_DB" != postgres ]; then
		psql -v ON_ERROR_STOP=1 --no-password --quiet --set db="$POSTGRES_DB" <<-'EOSQL'
			CREATE DATABASE :"db";
		EOSQL
	fi
	# shellcheck disable=SC1090  # sources the user's set-up scripts, whatever their names
	for f in /docker-entrypoint-initdb.d/*; do
		case "$f" in
			*.sh) echo "running $f"; . "$f" ;;  # the user's own set-up scripts, sourced as upstream's are
			*.sql) echo "running $f"; psql -v ON_ERROR_STOP=1 --no-password --dbname "$POSTGRES_DB" -f "$f" ;;
			*) if [ -e "$f" ]; then echo "ignoring $f"; fi ;;
		esac
	done
	unset PGUSER PGDATABASE
	pg_ctl -D "$PGDATA" -m fast -w stop
	echo
	echo 'PostgreSQL init process complete; ready for start up.'
	echo
fi

exec "$@"
