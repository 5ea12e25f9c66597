"""Build script: only the C extensions live here; all metadata is in setup.cfg."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "vaultfs.chunker._chunker",
            sources=["vaultfs/chunker/_chunker.c"],
            extra_compile_args=["-O3", "-std=c99"],
        ),
        Extension(
            "vaultfs._scrypt",
            sources=["vaultfs/_scrypt.c"],
            extra_compile_args=["-O3", "-std=c99"],
        ),
        # libcrypto and libzstd are opened at run time (dlopen): no -dev packages needed to build.
        Extension(
            "vaultfs.chunker._blob",
            sources=["vaultfs/chunker/_blob.c"],
            depends=["vaultfs/ops/_newfile.h"],
            extra_compile_args=["-O2", "-std=c99", "-Wall"],
        ),
        Extension(
            "vaultfs.ops._newfile",
            sources=["vaultfs/ops/_newfile.c"],
            depends=["vaultfs/ops/_newfile.h"],
            extra_compile_args=["-O2", "-std=gnu99", "-Wall"],
        ),
        Extension(
            "vaultfs.format._tree",
            sources=["vaultfs/format/_tree.c"],
            depends=["vaultfs/_hexid.h"],
            extra_compile_args=["-O2", "-std=c99", "-Wall"],
        ),
        Extension(
            "vaultfs.ops._files",
            sources=["vaultfs/ops/_files.c"],
            depends=["vaultfs/_hexid.h"],
            extra_compile_args=["-O2", "-std=gnu99", "-Wall"],
        ),
    ],
)
