"""vault key: manage the passwords (key files) of a vault: list, add, remove, passwd.

Every key file wraps the same master key, so adding or removing a password never re-encrypts data. The last
key cannot be removed, nor the key the command was opened with.
"""

from __future__ import annotations

import argparse

from vaultfs.tools.common import Output, open_repository, read_new_password


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("key", help="manage passwords (key files)", description=__doc__)
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    actions.add_parser("list", help="list the key files")
    add = actions.add_parser("add", help="add a password (new key file)")
    passwd = actions.add_parser("passwd", help="change the password used to open the vault")
    for q in (add, passwd):
        q.add_argument(
            "--new-password-file",
            metavar="FILE",
            help="read the new password from FILE (else VAULT_NEW_PASSWORD, else prompt twice)",
        )
        q.add_argument("--user", help="user name recorded in the key file (default: current user)")
        q.add_argument("--host", help="host name recorded in the key file (default: this host)")
    remove = actions.add_parser("remove", help="remove a key file")
    remove.add_argument("id", metavar="ID", help="key ID or unique prefix")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace, out: Output) -> int:
    repo = open_repository(args)
    if args.action == "list":
        keys = repo.list_keys()
        if out.json:
            out.emit(
                [
                    {
                        "current": k.current,
                        "id": k.id,
                        "userName": k.username,
                        "hostName": k.hostname,
                        "created": k.created,
                    }
                    for k in keys
                ]
            )
        else:
            rows = [
                [
                    ("*" if k.current else " ") + k.id[:8],
                    k.username,
                    k.hostname,
                    k.created[:19].replace("T", " "),
                ]
                for k in keys
            ]
            out.table([" ID", "User", "Host", "Created"], rows)
        return 0
    if args.action in ("add", "passwd"):
        with repo.lock(exclusive=args.action == "passwd"):
            password = read_new_password(args)
            new_id = repo.add_key(password, user=args.user, host=args.host)
            old_id = repo.key_id
            if args.action == "passwd":
                repo.key_id = new_id
                repo.remove_key(old_id)
        if out.json:
            doc = {"id": new_id}
            if args.action == "passwd":
                doc["removed"] = old_id
            out.emit(doc)
        elif args.action == "add":
            out.line(f"saved new key as {new_id[:8]}")
        else:
            out.line(f"saved new key as {new_id[:8]}, removed old key {old_id[:8]}")
        return 0
    with repo.lock(exclusive=True):
        key_id = repo.find_key(args.id)
        repo.remove_key(key_id)
    if out.json:
        out.emit({"removed": key_id})
    else:
        out.line(f"removed key {key_id[:8]}")
    return 0
