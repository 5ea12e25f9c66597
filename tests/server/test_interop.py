"""Interop through the bucket server: the real restic 0.14 and the vault CLI as clients, and buckets
written through the server by either, copied off it with rsync, checked by restic and vault."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from tests.helpers.ci import unavailable
from tests.helpers.restic import Restic
from tests.helpers.trees import assert_same_tree
from tests.server.harness import ServerThread, make_cert, module_server, server_config
from tests.tools.cli import vault

server = module_server("interop")


def rsync(src: Path, dst: Path) -> None:
    binary = shutil.which("rsync")
    if binary is None:
        unavailable("rsync is not installed (apt-get install rsync)")
    subprocess.run([binary, "-a", f"{src}/", f"{dst}/"], check=True, timeout=300)


def test_restic_backs_up_checks_and_restores_through_the_server(server, tricky_tree, tmp_path):
    creds = server.bucket()
    restic = Restic(creds.location, "restic pw")
    restic.init(version=2)
    restic.backup(["."], cwd=tricky_tree, full_id=False)
    restic.check("--read-data")
    restored = restic.restore("latest", tmp_path / "restored")
    assert_same_tree(tricky_tree, restored, owners=True)
    # The bucket, copied off the server, is an ordinary vault for restic and vault alike.
    copy = tmp_path / "copy"
    rsync(Path(server.config.volume_paths[0]) / creds.name, copy)
    Restic(copy, "restic pw").check("--read-data")
    vault("verify", "-r", copy, password=None)
    snaps = json.loads(vault("-r", copy, "snapshots", "--json", password="restic pw").out)
    assert len(snaps) == 1


def test_vault_commands_through_the_server(server, tmp_path):
    creds = server.bucket()
    loc = creds.location
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("hello\n" * 1000)
    (src / "sub" / "b.bin").write_bytes(bytes(range(256)) * 4000)
    vault("-r", loc, "init")
    vault("-r", loc, "backup", src)
    snap = json.loads(vault("-r", loc, "snapshots", "--json").out)[0]["id"]
    listing = vault("-r", loc, "ls", snap).out
    assert "b.bin" in listing
    target = tmp_path / "restored"
    vault("-r", loc, "restore", snap, "--target", target)
    assert_same_tree(src, Path(f"{target}{src}"), owners=True)
    vault("-r", loc, "verify", password=None)
    vault("-r", loc, "deep-verify")
    # The bucket vault wrote through the server, copied off it: vault verify and restic's full
    # check pass, and restic restores the same files.
    copy = tmp_path / "copy"
    rsync(Path(server.config.volume_paths[0]) / creds.name, copy)
    vault("-r", copy, "verify", password=None)
    restic = Restic(copy, "pw")
    restic.check("--read-data")
    by_restic = restic.restore("latest", tmp_path / "by-restic")
    assert_same_tree(src, by_restic / src.relative_to("/"), owners=True)


def test_restic_over_tls(tricky_tree, tmp_path):
    """restic through an https bucket (--cacert for the server's own CA): uploads are received by
    TlsStream's worker-thread path, downloads encrypted by it; backup, full check and restore."""
    cert, key = make_cert(tmp_path)
    srv = ServerThread(server_config(str(tmp_path / "data"), tls_cert=str(cert), tls_key=str(key)))
    try:
        creds = srv.bucket()
        assert creds.location.startswith("rest:https://")
        restic = Restic(creds.location, "restic pw")
        restic.run("--cacert", cert, "init", "--repository-version", "2")
        restic.run("--cacert", cert, "backup", ".", cwd=tricky_tree)
        restic.run("--cacert", cert, "check", "--read-data")
        target = tmp_path / "restored"
        restic.run("--cacert", cert, "restore", "latest", "--target", target)
        assert_same_tree(tricky_tree, target, owners=True)
        failed = restic.run("snapshots", check=False)  # the CA is not trusted without --cacert
        assert failed.returncode != 0 and "certificate" in failed.stderr
    finally:
        srv.stop()
