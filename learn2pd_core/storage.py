"""Output storage: local paths and s3:// URIs behind one pyarrow filesystem, written atomically.

Datasets are directories of Parquet part files. A part becomes visible only when complete (local: written
under a hidden temporary name, then renamed; S3: an object appears only when its upload finishes), so a
reader never sees half a part and an interrupted job leaves nothing that looks finished.
S3-compatible endpoints come from the standard AWS settings (AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL,
AWS_REGION, credentials): pyarrow does not read the endpoint variables itself (apache/arrow#49643).
Every failure is a StorageError whose one line names the file or directory and the likely fix.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .errors import Learn2PDError


class StorageError(Learn2PDError, OSError):
    """Reading or writing a job's output failed; the message names the location."""


@contextlib.contextmanager
def named(action: str, uri: str):
    """Turn pyarrow's and the OS's errors (multi-line AWS messages included) into one line naming `uri`."""
    try:
        yield
    except StorageError:
        raise
    except (OSError, pa.ArrowException) as e:
        detail = " ".join(str(e).split())[:300]
        if uri.startswith("s3://"):
            fix = ("check that the bucket exists, the endpoint (AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL) is up and "
                   "the credentials may write there")
        elif isinstance(e, PermissionError) or "ermission denied" in detail or "ead-only" in detail:
            fix = "choose a location you may write to"
        else:
            fix = "check the path"
        raise StorageError(f"cannot {action} {uri}: {detail} -- {fix}") from None


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or an s3://bucket/prefix URI."""
    if uri.startswith("s3://"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        return pafs.S3FileSystem(endpoint_override=endpoint, region=region), uri[len("s3://"):].rstrip("/")
    if "://" in uri:
        raise Learn2PDError(f"unsupported storage URI {uri!r}: use a local path or s3://bucket/prefix")
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])


def _is_visible(path: str) -> bool:
    return not os.path.basename(path).startswith((".", "_"))


def write_bytes(uri: str, data: bytes) -> None:
    fs, path = resolve(uri)
    parent = path.rsplit("/", 1)[0]
    tmp = f"{parent}/.{os.path.basename(path)}.{uuid.uuid4().hex}.tmp" if isinstance(fs, pafs.LocalFileSystem) else path
    with named("write", uri):
        fs.create_dir(parent, recursive=True)
        try:
            with fs.open_output_stream(tmp) as out:
                out.write(data)
            if tmp != path:
                fs.move(tmp, path)
        finally:
            if tmp != path and os.path.exists(tmp):   # a failed local write leaves no temporary file behind
                os.remove(tmp)


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    with named("read", uri), fs.open_input_stream(path) as f:
        return f.read()


def check_writable(uri: str) -> None:
    """Write and delete a small probe under `uri`, so that a job finds an unreachable endpoint, a missing bucket
    or a read-only directory before it loads a model or decodes anything."""
    probe = join(uri, f".write-probe-{uuid.uuid4().hex}")
    try:
        write_bytes(probe, b"probe")
        delete_file(probe)
    except StorageError as e:
        raise StorageError(f"cannot write to the output {uri}: {str(e).split(': ', 1)[1]}") from None


def write_json(uri: str, obj) -> None:
    write_bytes(uri, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def read_json(uri: str):
    return json.loads(read_bytes(uri))


def write_table(uri: str, table: pa.Table) -> None:
    """One Parquet part, atomically."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    write_bytes(uri, sink.getvalue().to_pybytes())


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    with named("look up", uri):
        return fs.get_file_info(path).type != pafs.FileType.NotFound


def list_parts(uri: str, suffix: str = ".parquet") -> list[str]:
    """Finished part files directly under a dataset directory, sorted (temporary files excluded)."""
    fs, path = resolve(uri)
    with named("list", uri):
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            return []
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    names = sorted(i.base_name for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(suffix))
    return [join(uri, n) for n in names if _is_visible(n)]


def read_dataset(uri: str, columns: list[str] | None = None) -> pa.Table | None:
    """All finished parts of a dataset directory as one table, or None when there are none."""
    tables = []
    for part in list_parts(uri):
        fs, path = resolve(part)
        with named("read Parquet part", part):
            tables.append(pq.read_table(path, filesystem=fs, columns=columns))
    return pa.concat_tables(tables) if tables else None


def unreadable_parts(uri: str) -> list[str]:
    """Parts of a dataset directory whose Parquet footer cannot be read (truncated or corrupt files)."""
    bad = []
    for part in list_parts(uri):
        fs, path = resolve(part)
        try:
            with fs.open_input_file(path) as f:
                pq.read_metadata(f)
        except (OSError, pa.ArrowException):
            bad.append(part)
    return bad


def drop_unreadable_batches(uri: str, kinds: tuple[str, ...]) -> list[str]:
    """For a job output whose batches write one part per kind under the same name (traces/, references/, ...):
    delete every part of each batch that has an unreadable part, so that a rerun redoes the batch whole.
    Returns the unreadable parts."""
    bad = [p for kind in kinds for p in unreadable_parts(join(uri, kind))]
    for name in sorted({p.rsplit("/", 1)[1] for p in bad}):
        for kind in kinds:
            if exists(join(uri, kind, name)):
                delete_file(join(uri, kind, name))
    return bad


def delete_file(uri: str) -> None:
    fs, path = resolve(uri)
    with named("delete", uri):
        fs.delete_file(path)


def remove(uri: str) -> None:
    """Delete a directory (or prefix) and everything under it; nothing to do if absent."""
    fs, path = resolve(uri)
    with named("delete", uri):
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            fs.delete_dir(path)


def part_name(keys) -> str:
    """A part named by the keys of its rows, so a retried batch overwrites its own part instead of adding a second."""
    return "part-" + hashlib.sha1("\n".join(sorted(keys)).encode()).hexdigest()[:16] + ".parquet"
