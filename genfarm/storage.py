"""Where files live (a local folder or an object store, through pyarrow's filesystems) and how one appears whole.

Every file genfarm writes for others to read (result parts, manifests, summaries, documents) goes through
`atomic_path`, so a reader never sees half a file, whatever kills the writer.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pyarrow.fs as pafs


def open_fs(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path within it) of a local path, file:// URI or any URI pyarrow knows (s3://, gs://, ...)."""
    if "://" in uri and not uri.startswith("file://"):
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(uri.removeprefix("file://"))


def is_local(fs: pafs.FileSystem) -> bool:
    return isinstance(fs, pafs.LocalFileSystem)


@contextmanager
def atomic_path(fs: pafs.FileSystem, final: str, tmp_dir: str) -> Iterator[str]:
    """The path to write `final` at: on a local disk a temporary file in `tmp_dir` (a folder readers skip) that is
    renamed into place when the block ends without error; on an object store `final` itself, since a PUT is already
    all-or-nothing. rename(2) also replaces an earlier copy, which is what a retried write of the same file wants."""
    if not is_local(fs):
        yield final
        return
    fs.create_dir(tmp_dir, recursive=True)
    fs.create_dir(os.path.dirname(final), recursive=True)
    tmp = f"{tmp_dir}/{os.path.basename(final)}.{uuid.uuid4().hex}"
    try:
        yield tmp
    except BaseException:
        if fs.get_file_info(tmp).type == pafs.FileType.File:
            fs.delete_file(tmp)
        raise
    fs.move(tmp, final)


def write_text(fs: pafs.FileSystem, final: str, text: str, tmp_dir: str) -> None:
    with atomic_path(fs, final, tmp_dir) as path, fs.open_output_stream(path) as out:
        out.write(text.encode())
