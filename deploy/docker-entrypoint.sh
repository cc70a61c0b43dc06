#!/bin/sh
# The image's entrypoint: `gateway "$@"`, after reading secrets from files.
#
# For each of GATEWAY_MASTER_KEY, PGPASSWORD, DATABASE_URL and REDIS_URL, a variable NAME_FILE
# naming a file (a Docker or compose secret under /run/secrets) sets NAME to that file's
# content, without its trailing newline, so the secret never appears in the container's
# configuration (`docker inspect`). Setting both NAME and NAME_FILE is an error. PGPASSWORD is
# read by the PostgreSQL driver when DATABASE_URL carries no password.
set -eu

for name in GATEWAY_MASTER_KEY PGPASSWORD DATABASE_URL REDIS_URL; do
    eval "file=\${${name}_FILE:-}"
    [ -n "$file" ] || continue
    eval "current=\${${name}:-}"
    if [ -n "$current" ]; then
        echo "gateway-entrypoint: both $name and ${name}_FILE are set; set one" >&2
        exit 64
    fi
    if [ ! -r "$file" ]; then
        echo "gateway-entrypoint: ${name}_FILE=$file is not a readable file (uid $(id -u))" >&2
        exit 66
    fi
    value=$(cat "$file")
    if [ -z "$value" ]; then
        echo "gateway-entrypoint: ${name}_FILE=$file is empty" >&2
        exit 66
    fi
    export "$name=$value"
    unset "${name}_FILE"
done

exec gateway "$@"
