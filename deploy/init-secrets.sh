#!/bin/sh
# Creates the secrets deploy/compose.yaml reads, unless they exist: deploy/secrets/master_key
# (the gateway's admin key, sk-master-...) and deploy/secrets/postgres_password (random).
# The folder is 0700, so other users of this host cannot read them; the files are 0644 because
# compose mounts them as they are, and the gateway does not run as root in its container.
# PostgreSQL takes its password only when its volume is first initialised: to change it later,
# ALTER USER gateway PASSWORD ... as well.
set -eu
dir="$(cd "$(dirname "$0")" && pwd)/secrets"
umask 077
mkdir -p "$dir"
chmod 700 "$dir"
random() { od -An -tx1 -N24 /dev/urandom | tr -d ' \n'; }
if [ ! -s "$dir/master_key" ]; then
    printf 'sk-master-%s\n' "$(random)" > "$dir/master_key"
    echo "created $dir/master_key"
fi
if [ ! -s "$dir/postgres_password" ]; then
    printf '%s\n' "$(random)" > "$dir/postgres_password"
    echo "created $dir/postgres_password"
fi
chmod 644 "$dir/master_key" "$dir/postgres_password"
