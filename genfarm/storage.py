"""Where files live (a local folder or an object store, through pyarrow's filesystems) and how one appears whole.

Every file genfarm writes for others to read (result parts, manifests, summaries, documents) goes through
`atomic_path`, so a reader never sees half a file, whatever kills the writer.

A path from a job file is a `Location`: the path or URI with its section's `storage_options` (endpoint, region,
credentials). It is a str everywhere, and it pickles with its options, so every process that opens it (the driver,
a read task or an engine actor on any node) opens the same store with the same settings.
"""

from __future__ import annotations

import fnmatch
import os
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

import pyarrow.fs as pafs
from pydantic import AfterValidator, PlainSerializer, ValidationInfo

from genfarm.errors import UserError

# pyarrow's filesystem class of each URI scheme that takes storage_options (their keyword arguments).
FILESYSTEMS = {"s3": "S3FileSystem", "gs": "GcsFileSystem", "gcs": "GcsFileSystem", "hdfs": "HadoopFileSystem",
               "abfs": "AzureFileSystem", "abfss": "AzureFileSystem"}
# Options that are secrets: never written to a manifest or shown (credentials belong in the environment or the job).
SECRET_OPTIONS = frozenset({"access_key", "secret_key", "session_token", "account_key", "access_token", "sas_token",
                            "client_secret"})
# Where the AWS SDK finds credentials besides storage_options (an instance role is the one it cannot tell here).
AWS_CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE",
                      "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI")


class Location(str):
    """A path or URI that carries the storage options to open it (see the module's doc)."""

    options: dict

    def __new__(cls, path: str, options: dict | None = None) -> Location:
        location = super().__new__(cls, path)
        location.options = dict(options or {})
        return location

    def __reduce__(self):
        return Location, (str(self), self.options)


def is_uri(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def open_fs(uri: str, options: dict | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path within it) of a local path, file:// URI or any URI pyarrow knows (s3://, gs://, ...).
    `options` (by default a Location's own) are the filesystem's keyword arguments, e.g. S3FileSystem's
    endpoint_override, region, access_key; without them pyarrow reads its standard environment (AWS_*)."""
    options = getattr(uri, "options", None) if options is None else options
    if not is_uri(uri):
        return pafs.LocalFileSystem(), os.path.abspath(uri.removeprefix("file://"))
    if not options:
        return pafs.FileSystem.from_uri(uri)
    return make_fs(uri, options), "/".join(part.strip("/") for part in urlsplit(uri)[1:3]).rstrip("/")


def make_fs(uri: str, options: dict) -> pafs.FileSystem:
    """pyarrow's filesystem for a URI's scheme, made with `options`; an unknown option is a ValueError."""
    scheme = urlsplit(uri).scheme
    if scheme not in FILESYSTEMS:
        raise ValueError(f"storage_options are not supported for {scheme}:// URIs (only {', '.join(FILESYSTEMS)})")
    options = dict(options)
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if scheme == "s3" and endpoint and "endpoint_override" not in options:
        options["endpoint_override"] = endpoint  # as FileSystem.from_uri does: the standard variable still counts
    try:
        return getattr(pafs, FILESYSTEMS[scheme])(**options)
    except TypeError as err:
        name = re.search(r"argument '(\w+)'", str(err))
        problem = f"pyarrow.fs.{FILESYSTEMS[scheme]} takes no option {name[1]!r}" if name else str(err)
        raise ValueError(problem) from None


def public_options(options: dict) -> dict:
    """Storage options without their secrets: what a manifest may keep."""
    return {key: value for key, value in options.items() if key not in SECRET_OPTIONS}


def glob(fs: pafs.FileSystem, pattern: str) -> list[str]:
    """Files that match a glob on any filesystem (an object store has no glob of its own): `*`, `?` and `[...]`
    within one path segment, `**` for any number of segments."""
    parts = pattern.split("/")
    fixed = next(i for i, part in enumerate(parts) if any(ch in part for ch in "*?["))
    base = "/".join(parts[:fixed])
    try:
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    except FileNotFoundError:
        return []
    return sorted(info.path for info in infos if info.type == pafs.FileType.File
                  and _matches(parts[fixed:], info.path[len(base):].strip("/").split("/")))


def _matches(pattern: list[str], names: list[str]) -> bool:
    if not pattern:
        return not names
    if pattern[0] == "**":
        return _matches(pattern[1:], names) or (bool(names) and _matches(pattern, names[1:]))
    return bool(names) and fnmatch.fnmatchcase(names[0], pattern[0]) and _matches(pattern[1:], names[1:])


def is_local(fs: pafs.FileSystem) -> bool:
    return isinstance(fs, pafs.LocalFileSystem)


def storage_error(field: str, uri: str, err: OSError, doing: str) -> UserError:
    """One line for a failed first access to an object store: a missing bucket, missing or refused credentials,
    an endpoint that does not answer; `doing` is e.g. 'read' or 'write to'."""
    text = " ".join(str(err).split())
    section, scheme = field.split(".")[0], urlsplit(uri).scheme
    code = (re.search(r"AWS Error (\w+)", text) or [None, "access denied"])[1]
    given = has_credentials(getattr(uri, "options", None) or {})
    credentials = "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" if scheme == "s3" else "the store's credentials"
    if "NO_SUCH_BUCKET" in text or re.search(r"Bucket '[^']*' not found", text):
        problem, fix = f"bucket {urlsplit(uri).netloc!r} does not exist", f"create it, or correct the bucket in {field}"
    elif re.search(r"ACCESS_DENIED|INVALID_ACCESS_KEY_ID|SIGNATURE_DOES_NOT_MATCH|EXPIRED_TOKEN", text) or (
            not given and "AWS Error" in text):  # a store answers unsigned requests with anything from 403 to 500
        problem = f"access denied with the credentials given ({code})" if given else f"no credentials ({code})"
        fix = f"set {credentials} in the environment, or {section}.storage_options: {{access_key, secret_key}}"
    elif re.search(r"NETWORK_CONNECTION|Could not resolve host|onnection refused", text):
        problem = f"the storage endpoint does not answer ({text[:160]})"
        fix = f"check AWS_ENDPOINT_URL or {section}.storage_options.endpoint_override, and the network"
    else:
        problem, fix = text[:240], f"check {field} and {section}.storage_options"
    return UserError(field, f"cannot {doing} {uri}: {problem}", fix)


def has_credentials(options: dict) -> bool:
    """Whether credentials are configured for an S3 client here, in `options` or where the AWS SDK looks."""
    if options.get("access_key") or options.get("role_arn") or options.get("anonymous"):
        return True
    aws = Path(os.environ.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials")).expanduser()
    return any(os.environ.get(name) for name in AWS_CREDENTIAL_ENV) or aws.is_file()


@contextmanager
def atomic_path(fs: pafs.FileSystem, final: str, tmp_dir: str) -> Iterator[str]:
    """The path to write `final` at: on a local disk a temporary file in `tmp_dir` (a folder readers skip) that is
    renamed into place when the block ends without error; on an object store `final` itself, since a PUT is already
    all-or-nothing. rename(2) also replaces an earlier copy, which is what a retried write of the same file wants.
    On an object store a writer that fails half-way still closes its stream, which uploads what it had (a Parquet
    writer even adds a footer): that object is deleted, so a failed write leaves no file rather than half of one."""
    if not is_local(fs):
        try:
            yield final
        except BaseException:
            try:
                fs.delete_file(final)
            except OSError:  # nothing was uploaded, or the store is gone: the error that matters is the writer's
                pass
            raise
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


def check_options(options: dict, info: ValidationInfo) -> dict:
    """Storage options of a job section: pyarrow's filesystem arguments for its URI (ignored for a local path);
    a name the filesystem does not take is a ValueError with its fix."""
    path = info.data.get("path")  # validated before the options: the field comes first
    if options and path and is_uri(path):
        try:
            make_fs(path, options)
        except ValueError as err:
            raise ValueError(f"{err}. Fix: use its arguments, e.g. {{endpoint_override: http://HOST:9000, "
                             "region: us-east-1}") from None
    return options


# A job section's storage_options field: checked against its path's filesystem, written without its secrets.
StorageOptions = Annotated[dict[str, Any], AfterValidator(check_options), PlainSerializer(public_options)]


def glob_base(pattern: str) -> str:
    """The folder above a glob's first wildcard: the files it matches are named (and their rows' ids made) relative
    to it."""
    return pattern.split("*")[0].rsplit("/", 1)[0]
