"""vault server: administer a bucket server's data folder: buckets and volumes.

Works whether the server runs or not (a running server sees changes within seconds). `bucket create`
prints the new bucket's PSK once: the server keeps only a bcrypt hash of it. Clients use
rest:http(s)://BUCKET:PSK@HOST:PORT/BUCKET/ as vault location (restic: -r with the same URL).
"""

from __future__ import annotations

import argparse

from vaultfs.errors import UsageError
from vaultfs.tools.cmd_serve import add_server_options, load
from vaultfs.tools.common import Output

#: Takes no vault location, password or cache options (see common.add_global_options).
OPENS_VAULT = False


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "server", help="administer the bucket server (buckets, volumes)", description=__doc__
    )
    areas = p.add_subparsers(dest="area", metavar="AREA")
    areas.required = True

    bucket = areas.add_parser("bucket", help="create, list, inspect, change and delete buckets")
    actions = bucket.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    create = actions.add_parser("create", help="create a bucket and print its PSK (once)")
    create.add_argument("name", nargs="?", metavar="NAME", help="bucket name (default: random)")
    create.add_argument("--quota", metavar="SIZE", help="quota, e.g. 500G (K/M/G/T/P = 1024^n)")
    create.add_argument("--append-only", action="store_true", help="refuse deletes except locks")
    actions.add_parser("list", help="list buckets with their usage")
    info = actions.add_parser("info", help="show one bucket")
    info.add_argument("name", metavar="NAME", help="bucket name")
    delete = actions.add_parser(
        "delete",
        help="delete a bucket and its files",
        description="Delete a bucket. One that holds files (someone's backups) is deleted with them "
        "only with --force; --keep-files forgets the bucket and leaves its folders on disk.",
    )
    delete.add_argument("name", metavar="NAME", help="bucket name")
    delete.add_argument(
        "--keep-files", action="store_true", help="forget the bucket but keep its folders"
    )
    delete.add_argument(
        "--force", action="store_true", help="delete the bucket's files too when it holds any"
    )
    change = actions.add_parser("set", help="change quota, append-only mode or PSK")
    change.add_argument("name", metavar="NAME", help="bucket name")
    change.add_argument("--quota", metavar="SIZE", help="new quota (0 = none)")
    mode = change.add_mutually_exclusive_group()
    mode.add_argument(
        "--append-only",
        dest="append_only",
        action="store_true",
        default=None,
        help="refuse deletes except locks",
    )
    mode.add_argument(
        "--no-append-only", dest="append_only", action="store_false", help="allow deletes again"
    )
    change.add_argument(
        "--new-psk", action="store_true", help="replace the PSK with a new one and print it (once)"
    )
    volumes = areas.add_parser("volumes", help="show usage per volume")
    # --config/--data are accepted before or after the area and the action.
    for q in (p, bucket, create, actions.choices["list"], info, delete, change, volumes):
        add_server_options(q)
    p.set_defaults(func=run)
    return p


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(n)


def _doc(info) -> dict:  # noqa: ANN001
    return {
        "name": info.name,
        "quota": info.quota,
        "append_only": info.append_only,
        "created": info.created,
        "stored": info.stored,
        "files": info.files,
    }


def _show(out: Output, info, psk: str | None, config) -> None:  # noqa: ANN001
    rows = [
        ["bucket", info.name],
        ["created", info.created],
        ["quota", _size(info.quota) if info.quota else "none"],
        ["append-only", "yes" if info.append_only else "no"],
        ["stored", f"{_size(info.stored)} in {info.files} files"],
    ]
    if psk:
        scheme = "https" if config.tls_cert else "http"
        host, port = config.host_port
        rows += [
            ["psk", psk],
            ["location", f"rest:{scheme}://{info.name}:{psk}@{host}:{port or 'PORT'}/{info.name}/"],
        ]
    for key, value in rows:
        out.line(f"{key + ':':13}{value}")
    if psk:
        out.note("the PSK is shown only now: store it safely")


def run(args: argparse.Namespace, out: Output) -> int:
    from vaultfs.server.admin import Admin, parse_size

    config = load(args)
    with Admin(config) as admin:
        if args.area == "volumes":
            report = admin.volumes()
            if out.json:
                out.emit([vars(v) for v in report])
            else:
                out.table(
                    ["Volume", "Size", "Free", "Buckets use", "Files", "State"],
                    [
                        [
                            v.path,
                            _size(v.total),
                            _size(v.free),
                            _size(v.stored),
                            str(v.files),
                            "online" if v.online else "OFFLINE",
                        ]
                        for v in report
                    ],
                )
            return 0
        if args.action == "create":
            quota = parse_size(args.quota) if args.quota else 0
            new = admin.create(args.name, quota=quota, append_only=args.append_only)
            if out.json:
                out.emit({**_doc(new.bucket), "psk": new.psk})
            else:
                _show(out, new.bucket, new.psk, config)
            return 0
        if args.action == "list":
            infos = admin.list()
            if out.json:
                out.emit([_doc(i) for i in infos])
            else:
                out.table(
                    ["Bucket", "Stored", "Files", "Quota", "Append-only", "Created"],
                    [
                        [
                            i.name,
                            _size(i.stored),
                            str(i.files),
                            _size(i.quota) if i.quota else "-",
                            "yes" if i.append_only else "no",
                            i.created,
                        ]
                        for i in infos
                    ],
                )
            return 0
        if args.action == "info":
            info = admin.info(args.name)
            if out.json:
                out.emit(_doc(info))
            else:
                _show(out, info, None, config)
            return 0
        if args.action == "delete":
            if not args.keep_files and not args.force:
                held = admin.info(args.name)
                if held.files:
                    raise UsageError(
                        f"bucket {args.name} holds {held.files} file(s), {_size(held.stored)}: add "
                        "--force to delete them with it, or --keep-files to keep its folders"
                    )
            admin.delete(args.name, keep_files=args.keep_files)
            if out.json:
                out.emit({"deleted": args.name})
            else:
                out.line(f"deleted bucket {args.name}")
            return 0
        quota = parse_size(args.quota) if args.quota is not None else None
        info, psk = admin.set(
            args.name, quota=quota, append_only=args.append_only, rotate_psk=args.new_psk
        )
        if out.json:
            out.emit({**_doc(info), **({"psk": psk} if psk else {})})
        else:
            _show(out, info, psk, config)
        return 0
