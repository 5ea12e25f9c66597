#!/usr/bin/env bash
# `make demo`: the main job end to end on a local vault in ./demo: init, backup, snapshots, verify, deep-verify,
# check with restic, restore, mount the latest snapshot, list it, unmount.
set -euo pipefail
cd "$(dirname "$0")/.."
VAULT=.venv/bin/vault
DEMO=$PWD/demo
rm -rf "$DEMO"
mkdir -p "$DEMO/source"
export VAULT_REPOSITORY=$DEMO/vault VAULT_PASSWORD=demo-password

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "source data: a copy of this project's code and docs"
cp -r vaultfs tools tests man README.md "$DEMO/source/" 2>/dev/null || true
printf 'hello from the vaultfs demo\n' > "$DEMO/source/hello.txt"
du -sh "$DEMO/source"

step "vault init"
$VAULT init

step "vault backup (twice: the second run reads nothing new)"
$VAULT backup "$DEMO/source" --tag demo
printf 'changed\n' >> "$DEMO/source/hello.txt"
$VAULT backup "$DEMO/source" --tag demo

step "vault snapshots"
$VAULT snapshots

step "vault verify (no password needed) and vault deep-verify"
VAULT_PASSWORD= $VAULT verify "$VAULT_REPOSITORY"
$VAULT deep-verify

step "restic check --read-data (the vault is a restic repository)"
mkdir -p "$DEMO/restic-cache"
RESTIC_PASSWORD=$VAULT_PASSWORD RESTIC_CACHE_DIR=$DEMO/restic-cache restic -r "$VAULT_REPOSITORY" check --read-data

step "vault restore latest"
$VAULT restore latest --target "$DEMO/restored"
diff -r "$DEMO/source" "$DEMO/restored$DEMO/source" && echo "restored tree equals the source"

if [ -e /dev/fuse ] && command -v fusermount3 >/dev/null; then
    step "vault mount, list the latest snapshot, unmount"
    mkdir -p "$DEMO/mnt"
    $VAULT mount "$DEMO/mnt" &
    pid=$!
    for _ in $(seq 100); do mountpoint -q "$DEMO/mnt" && break; sleep 0.1; done
    ls -la "$DEMO/mnt/snapshots/latest$DEMO/source" | head -20
    cat "$DEMO/mnt/snapshots/latest$DEMO/source/hello.txt"
    fusermount3 -u "$DEMO/mnt"
    wait "$pid"
else
    echo "no FUSE here (/dev/fuse or fusermount3 missing): skipping the mount step"
fi

step "done: the demo vault is in $DEMO/vault (password: $VAULT_PASSWORD)"
