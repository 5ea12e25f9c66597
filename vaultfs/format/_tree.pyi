"""Type stub for the C half of Node.from_json (see ``_tree.c``); use vaultfs.format.tree.decode_tree."""

from collections.abc import Callable
from typing import Any

def decode_nodes(
    docs: list[Any],
    node_cls: type,
    time_cls: type,
    zero_time: object,
    fallback: Callable[[Any], Any],
    /,
) -> list[Any]: ...
