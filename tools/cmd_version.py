"""vault version: print the vaultfs version and the versions of the libraries it runs on."""

from __future__ import annotations

import argparse
import platform

from vaultfs import __version__
from vaultfs.tools.common import Output

#: Takes no vault location, password or cache options (see common.add_global_options).
OPENS_VAULT = False


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("version", help="print version information", description=__doc__)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace, out: Output) -> int:
    import cryptography
    import zstandard

    doc = {
        "version": __version__,
        "python": platform.python_version(),
        "platform": f"{platform.system().lower()}/{platform.machine()}",
        "cryptography": cryptography.__version__,
        "zstandard": zstandard.__version__,
    }
    if out.json:
        out.emit(doc)
    else:
        out.line(
            f"vaultfs {__version__} on Python {doc['python']} ({doc['platform']}), "
            f"cryptography {doc['cryptography']}, zstandard {doc['zstandard']}"
        )
    return 0
