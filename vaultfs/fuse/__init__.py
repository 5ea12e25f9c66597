"""Read-only FUSE mount of a vault's snapshots (pyfuse3 + trio).

``mount.mount(repo, mountpoint, MountOptions(...))`` blocks until the folder is unmounted. The pieces:
layout.py (the snapshots/, hosts/, tags/, ids/ folders), catalog.py (the live snapshot list), inodes.py,
fs.py (the pyfuse3 Operations), reader.py (blob fetching, caching and read-ahead).
"""
