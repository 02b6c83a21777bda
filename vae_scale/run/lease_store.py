"""Compare-and-swap storage for the workdir lease: one small record with a generation number.

Both stores offer the same two calls, the model being Cloud Storage's object generations:

  read()                              -> (generation, bytes), or None when there is no record
  write(data, if_generation_match=g)  -> the new generation; raises Conflict unless the current
                                         generation is still g (0: no record yet)

so that of two writers that read the same generation, exactly one succeeds.

* `gs://` (`GcsStore`): the object WORKDIR/lease.json written with google-cloud-storage's
  `if_generation_match` precondition, which the service checks atomically. Neither
  `tf.io.gfile` nor `etils.epath` (how Orbax and CLU write to gs://) can pass a precondition:
  through them two hosts could both create the lease.
* Local and shared file systems (`LocalStore`): one file per generation, WORKDIR/lease/
  000000000007.json; the record is the highest-numbered file. Writing generation g + 1 is an
  exclusive create of that name (a hard link of a fully written temporary file, so a reader never
  sees half a record), which the kernel, or an NFS, Lustre or GPFS server, grants to exactly one
  writer; older generations are then deleted. It needs no lock manager: fcntl locks would need a
  working NFS lock daemon (a `nolock` mount silently keeps them per host) and Lustre's `flock`
  mount option, and a lock held while a process hangs blocks everyone. A writer that finds a
  higher generation than its own after creating it (it created a name already deleted, having
  read long ago) has lost, as with a precondition failure.
"""

from __future__ import annotations

import errno
import os
import re
import time
import uuid

_GENERATION_FILE = re.compile(r"^(\d{12})\.json$")
_TMP_PREFIX = ".tmp-"
_TMP_MAX_AGE_S = 600.0  # A temporary file older than this was left by a writer that died.
_REQUEST_TIMEOUT_S = 20.0  # gs://: one request,
_RETRY_TIMEOUT_S = 40.0  # and all the retries of one call.


class Conflict(Exception):
  """The record's generation was no longer the one the write was conditioned on."""


class LocalStore:
  """The lease record on a local or shared file system: a directory of generation files."""

  def __init__(self, directory: str | os.PathLike):
    self.directory = os.fspath(directory)
    self.url = self.directory

  def _generations(self) -> list[int]:
    try:
      names = os.listdir(self.directory)
    except FileNotFoundError:
      return []
    return sorted(int(m.group(1)) for m in map(_GENERATION_FILE.match, names) if m)

  def _path(self, generation: int) -> str:
    return os.path.join(self.directory, f"{generation:012d}.json")

  def read(self) -> tuple[int, bytes] | None:
    for _ in range(10):  # The newest file can be replaced between listing and opening it.
      generations = self._generations()
      if not generations:
        return None
      try:
        with open(self._path(generations[-1]), "rb") as f:
          return generations[-1], f.read()
      except FileNotFoundError:
        continue
    raise OSError(f"{self.directory}: the lease keeps changing under this reader")

  def write(self, data: bytes, *, if_generation_match: int) -> int:
    os.makedirs(self.directory, exist_ok=True)
    generation = if_generation_match + 1
    target = self._path(generation)
    tmp = os.path.join(self.directory, f"{_TMP_PREFIX}{uuid.uuid4().hex}")
    try:
      with open(tmp, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
      try:
        os.link(tmp, target)
      except FileExistsError as e:
        raise Conflict(target) from e
      except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
          raise
        self._create_in_place(target, data)  # A file system without hard links (FUSE mounts).
    finally:
      try:
        os.unlink(tmp)
      except FileNotFoundError:
        pass
    generations = self._generations()
    if generations[-1] != generation:
      raise Conflict(target)  # A later generation exists: this name had been deleted.
    self._prune(generation)
    return generation

  def _create_in_place(self, target: str, data: bytes) -> None:
    """Exclusive create, then write: a reader may see the file empty for a moment (and retries)."""
    try:
      fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError as e:
      raise Conflict(target) from e
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())

  def _prune(self, newest: int) -> None:
    """Deletes older generations and temporary files of writers that died."""
    for name in os.listdir(self.directory):
      match = _GENERATION_FILE.match(name)
      path = os.path.join(self.directory, name)
      try:
        if match and int(match.group(1)) < newest:
          os.unlink(path)
        elif name.startswith(_TMP_PREFIX) and time.time() - os.stat(path).st_mtime > _TMP_MAX_AGE_S:
          os.unlink(path)
      except FileNotFoundError:
        pass  # Another writer pruned it first.


class GcsStore:
  """The lease record as one Cloud Storage object, written with generation preconditions."""

  def __init__(self, url: str):
    """Args: url: gs://BUCKET/OBJECT."""
    # Imported here: only gs:// workdirs need the client, and importing it costs about 0.4 s.
    from google.api_core import exceptions  # pylint: disable=g-import-not-at-top
    from google.cloud import storage  # pylint: disable=g-import-not-at-top
    from google.cloud.storage import retry  # pylint: disable=g-import-not-at-top
    self.url = url
    bucket, _, name = url[len("gs://"):].partition("/")
    self._exceptions = exceptions
    # Bounded below the client's defaults (60 s a request, 120 s of retries): a release must not
    # hold up an exit 42 past a spot VM's 30 s notice for long, and a lease not released in time
    # only expires later.
    self._calls = {"timeout": _REQUEST_TIMEOUT_S, "retry": retry.DEFAULT_RETRY.with_timeout(
        _RETRY_TIMEOUT_S)}
    # Credentials from the environment: the VM's service account on Cloud TPU (as Orbax's), or
    # none with STORAGE_EMULATOR_HOST (tests).
    self._blob_name = name
    self._bucket = storage.Client().bucket(bucket)

  def read(self) -> tuple[int, bytes] | None:
    blob = self._bucket.blob(self._blob_name)
    try:
      data = blob.download_as_bytes(**self._calls)  # Sets blob.generation from that response.
    except self._exceptions.NotFound:
      return None
    return int(blob.generation), data

  def write(self, data: bytes, *, if_generation_match: int) -> int:
    blob = self._bucket.blob(self._blob_name)
    try:
      # With a precondition the client retries transient errors itself (the write is idempotent).
      blob.upload_from_string(data, content_type="application/json",
                              if_generation_match=if_generation_match, **self._calls)
    except self._exceptions.PreconditionFailed as e:
      raise Conflict(self.url) from e
    return int(blob.generation)


def for_workdir(workdir: str | os.PathLike) -> LocalStore | GcsStore:
  """The store for a workdir's lease: WORKDIR/lease.json on gs://, WORKDIR/lease/ elsewhere.

  Raises:
    ValueError: a URL scheme other than gs://.
  """
  workdir = os.fspath(workdir)
  if workdir.startswith("gs://"):
    return GcsStore(workdir.rstrip("/") + "/lease.json")
  if "://" in workdir:
    raise ValueError(f"{workdir}: the workdir lease supports local paths and gs:// only")
  return LocalStore(os.path.join(workdir, "lease"))
