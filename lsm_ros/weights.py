"""The official weight files: download (``lsm-ros weights fetch``), verification (``weights check``) and conversion
to safetensors (``weights convert``).

Where each file is published (read in the projects' READMEs: NVlabs/LSM README.md at commit 35ecb77dfaaf,
naver/dust3r README.md at 05ecbb0d80b2, isl-org/lang-seg README.MD at bb00b21; see :data:`OFFICIAL_WEIGHTS`):

- ``DUSt3R_ViTLarge_BaseDecoder_512_dpt.pth``: naver/dust3r README ("Checkpoints" table and "Download pre-trained
  model") and NVlabs/LSM README (Installation step 9) give
  https://download.europe.naverlabs.com/ComputerVision/DUSt3R/DUSt3R_ViTLarge_BaseDecoder_512_dpt.pth.
  Neither publishes its size or a hash. (naver's Hugging Face repository ``naver/DUSt3R_ViTLarge_BaseDecoder_512_dpt``
  holds a ``model.safetensors`` of another layout, not this file.)
- ``demo_e200.ckpt`` (LSeg): isl-org/lang-seg README and NVlabs/LSM README (``gdown
  1FTuHY1xPUkM-5gaDtMfgCl3D0gR89WV7``) publish it on Google Drive only, file id 1FTuHY1xPUkM-5gaDtMfgCl3D0gR89WV7;
  no size or hash published, no mirror published by either project. Google Drive answers large files with an
  interactive "cannot scan for viruses" page, so it is not downloaded automatically: ``fetch`` says how to get it
  by hand (or from a mirror with ``--base-url``) and ``check`` verifies it.
- ``checkpoint-final.pth`` (LSM): NVlabs/LSM README (update of 2025-10-28 and Installation step 9) gives
  https://huggingface.co/Journey9ni/large_spatial_model/resolve/main/checkpoint-final.pth. No size or hash is
  written in the README; Hugging Face announces the file's SHA-256 (its LFS object id) and size in the
  ``X-Linked-Etag``/``X-Linked-Size`` headers of that address, which ``fetch`` verifies when present.

No SHA-256 or size of these three files was found published anywhere authoritative, so :data:`OFFICIAL_WEIGHTS`
records ``None`` for them rather than a guess: ``fetch`` and ``check`` then say plainly that a file could not be
verified against a published hash and print the SHA-256 of the local copy so that users can compare it with a
trusted copy. Fill in ``sha256``/``size`` here once the projects publish them.
"""
from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import os
import re
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from tqdm import tqdm

from lsm_ros import __version__

_log = logging.getLogger(__name__)

WEIGHTS_ENV = 'LSM_ROS_WEIGHTS'
PART_SUFFIX = '.part'
DEFAULT_TIMEOUT_S = 60.0
CHUNK_BYTES = 1 << 20
USER_AGENT = f'lsm_ros/{__version__} (weights fetch; python urllib)'
_SHA256_PATTERN = re.compile(r'[0-9a-f]{64}')
_CONTENT_RANGE = re.compile(r'bytes\s+(\d+)-(\d+)/(\d+|\*)')
_CONTENT_RANGE_UNSATISFIED = re.compile(r'bytes\s+\*/(\d+)')


class WeightsError(RuntimeError):
    """A weight file could not be downloaded, verified or converted (the message says why and what to do)."""


@dataclass(frozen=True)
class WeightsFile:
    """One official weight file: its name, kind of checkpoint, where it is published and what is known of it.

    ``url``: a direct download address, None when there is none (``manual`` then says how to get the file);
    ``size``/``sha256``: the published byte size and SHA-256 (lower-case hex), None when none is published;
    ``source``: where the address (and size/hash) come from.
    """

    key: str
    filename: str
    label: str
    url: str | None
    source: str
    size: int | None = None
    sha256: str | None = None
    manual: str | None = None

    def __post_init__(self) -> None:
        if self.sha256 is not None and not _SHA256_PATTERN.fullmatch(self.sha256):
            raise ValueError(f'{self.filename}: sha256 must be 64 lower-case hex digits, got {self.sha256!r}')
        if self.size is not None and self.size < 0:
            raise ValueError(f'{self.filename}: negative size {self.size}')


OFFICIAL_WEIGHTS: tuple[WeightsFile, ...] = (
    WeightsFile(
        key='dust3r', filename='DUSt3R_ViTLarge_BaseDecoder_512_dpt.pth', label='DUSt3R',
        url='https://download.europe.naverlabs.com/ComputerVision/DUSt3R/DUSt3R_ViTLarge_BaseDecoder_512_dpt.pth',
        source='naver/dust3r README (Checkpoints) and NVlabs/LSM README (step 9); no size or hash published'),
    WeightsFile(
        key='lseg', filename='demo_e200.ckpt', label='LSeg', url=None,
        source='isl-org/lang-seg README and NVlabs/LSM README (step 9): Google Drive file '
               '1FTuHY1xPUkM-5gaDtMfgCl3D0gR89WV7 only; no size or hash published',
        manual='https://drive.google.com/file/d/1FTuHY1xPUkM-5gaDtMfgCl3D0gR89WV7/view'),
    WeightsFile(
        key='lsm', filename='checkpoint-final.pth', label='LSM',
        url='https://huggingface.co/Journey9ni/large_spatial_model/resolve/main/checkpoint-final.pth',
        source='NVlabs/LSM README (2025-10-28 update, step 9); no size or hash in the README (Hugging Face '
               'announces its SHA-256 when downloading)'),
)
WEIGHT_KEYS = tuple(entry.key for entry in OFFICIAL_WEIGHTS)


def default_weights_dir() -> Path:
    """``$LSM_ROS_WEIGHTS`` when set, else ``~/.cache/lsm_ros/weights``."""
    configured = os.environ.get(WEIGHTS_ENV)
    return Path(configured).expanduser() if configured else Path.home() / '.cache' / 'lsm_ros' / 'weights'


def weights_dir(directory: str | os.PathLike[str] | None = None) -> Path:
    """``directory`` (``~`` expanded), or :func:`default_weights_dir` when None."""
    return Path(directory).expanduser() if directory is not None else default_weights_dir()


def installed_checkpoints(directory: str | os.PathLike[str] | None = None) -> dict[str, str]:
    """The official files installed in ``directory`` (default :func:`default_weights_dir`, where ``weights fetch``
    puts them) as PipelineConfig fields: all three (``dust3r_checkpoint``, ``lseg_checkpoint``, ``lsm_checkpoint``:
    the full LSM) when all are there, else ``dust3r_checkpoint`` alone (geometry only) when DUSt3R is, else {}.
    A file's ``weights convert`` conversion (``<stem>.safetensors``, no pickle) is preferred to the original."""
    from lsm_ros.model.checkpoint import SAFETENSORS_SUFFIX
    folder = weights_dir(directory)
    found: dict[str, str] = {}
    for entry in OFFICIAL_WEIGHTS:
        original = folder / entry.filename
        for candidate in (original.with_suffix(SAFETENSORS_SUFFIX), original):
            if candidate.is_file():
                found[entry.key] = str(candidate)
                break
    if set(WEIGHT_KEYS) <= found.keys():
        return {f'{key}_checkpoint': found[key] for key in WEIGHT_KEYS}
    return {'dust3r_checkpoint': found['dust3r']} if 'dust3r' in found else {}


def select_weights(only: Iterable[str] | None = None,
                   files: Sequence[WeightsFile] = OFFICIAL_WEIGHTS) -> tuple[WeightsFile, ...]:
    """The entries of ``files`` whose key is in ``only`` (all when None or empty), in registry order."""
    wanted = set(only or ())
    unknown = wanted - {entry.key for entry in files}
    if unknown:
        raise WeightsError(f'unknown weight file(s) {sorted(unknown)}; expected {[e.key for e in files]}')
    return tuple(entry for entry in files if not wanted or entry.key in wanted)


def _file_digest(path: str | os.PathLike[str]) -> Any:
    """The hashlib SHA-256 object of a file's whole content (read in 1 MiB blocks), to be updated further."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        while block := f.read(CHUNK_BYTES):
            digest.update(block)
    return digest


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Lower-case hex SHA-256 of a file (read in 1 MiB blocks)."""
    return _file_digest(path).hexdigest()


def _human(size: int | None) -> str:
    if size is None:
        return '?'
    value = float(size)
    for unit in ('B', 'KiB', 'MiB', 'GiB'):
        if value < 1024 or unit == 'GiB':
            return f'{value:.0f} {unit}' if unit == 'B' else f'{value:.1f} {unit}'
        value /= 1024
    raise AssertionError('unreachable')


# ------------------------------------------------------------------------------------------------ fetch
@dataclass(frozen=True)
class FetchResult:
    """One installed file: ``status`` 'downloaded' or 'present' (already there); ``verification``
    'published-sha256' (matches the registry's hash), 'server-sha256' (matches the hash the server announced),
    'size' (only the size could be checked) or 'unverified'."""

    entry: WeightsFile
    path: Path
    status: str
    size: int
    sha256: str
    verification: str
    received: int = 0

    @property
    def verified(self) -> bool:
        """True when the content was checked against a hash (published or announced by the server)."""
        return self.verification in ('published-sha256', 'server-sha256')

    def describe(self) -> str:
        """One line: what happened and how (or whether) the content was verified."""
        if self.status != 'downloaded':
            what = 'already present'
        elif self.received == self.size:
            what = 'downloaded'
        else:
            what = f'resumed and completed ({_human(self.received)} received now)'
        head = f'{self.entry.filename}: {what}, {_human(self.size)}, in {self.path.parent}'
        if self.verification == 'published-sha256':
            return f'{head}; SHA-256 verified against the published hash'
        if self.verification == 'server-sha256':
            return (f'{head}; SHA-256 verified against the hash the server announced (no hash is published in '
                    f'lsm_ros.weights for it): {self.sha256}')
        checked = 'size matches the published size, but ' if self.verification == 'size' else ''
        return (f'{head}; {checked}NOT verified: no SHA-256 is published for {self.entry.filename}. SHA-256 of '
                f'the local copy: {self.sha256} (compare it with a trusted copy)')


@dataclass(frozen=True)
class FetchOutcome:
    """The result of one file of :func:`fetch_weights`: ``result`` on success, else ``error``."""

    entry: WeightsFile
    result: FetchResult | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.result is not None


@dataclass
class _Download:
    size: int
    sha256: str
    received: int
    announced_sha256: str | None
    announced_size: int | None


def _announced(headers: Any, into: dict[str, Any]) -> None:
    """Record the SHA-256 and size a server announces for a file (Hugging Face: ``X-Linked-Etag`` holds the LFS
    object id, which is the SHA-256 of the content, ``X-Linked-Size`` its size)."""
    etag = (headers.get('X-Linked-Etag') or '').strip()
    etag = etag[2:] if etag.startswith('W/') else etag
    etag = etag.strip('"').lower()
    if 'sha256' not in into and _SHA256_PATTERN.fullmatch(etag):
        into['sha256'] = etag
    size = (headers.get('X-Linked-Size') or '').strip()
    if 'size' not in into and size.isdigit():
        into['size'] = int(size)


class _AnnouncingRedirectHandler(urllib.request.HTTPRedirectHandler):
    """Follows redirects as usual, keeping what each redirect announces about the file (see :func:`_announced`)."""

    def __init__(self, announced: dict[str, Any]) -> None:
        super().__init__()
        self.announced = announced

    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any,
                         newurl: str) -> urllib.request.Request | None:
        _announced(headers, self.announced)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


@contextlib.contextmanager
def _locked(handle: BinaryIO, path: Path) -> Iterator[None]:
    """An exclusive lock on the partial file, so that two fetches never write the same file."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise WeightsError(f'{path} is being written by another lsm-ros weights fetch; wait for it to finish')
    try:
        yield
    finally:
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _resume_hint(part: Path) -> str:
    return (f'the partial download is kept in {part}: run `lsm-ros weights fetch` again to resume it'
            if part.is_file() and part.stat().st_size else 'run `lsm-ros weights fetch` again to retry')


def _download(url: str, part: Path, name: str, timeout: float, progress: bool) -> _Download:
    """Download ``url`` into ``part``, resuming a partial file with an HTTP Range request (from zero when the
    server ignores it). Returns the complete file's size and SHA-256. Raises WeightsError, keeping ``part``, when
    the transfer fails."""
    announced: dict[str, Any] = {}
    opener = urllib.request.build_opener(_AnnouncingRedirectHandler(announced))
    with open(part, 'ab') as out, _locked(out, part):
        offset = out.seek(0, os.SEEK_END)
        digest = _file_digest(part)   # all of it: offset is its size, and the lock keeps other fetches out
        for _ in range(2):  # a second attempt from zero when the server cannot resume
            headers = {'User-Agent': USER_AGENT, 'Accept-Encoding': 'identity'}
            if offset:
                headers['Range'] = f'bytes={offset}-'
                _log.info('%s: resuming at byte %d', name, offset)
            try:
                response = opener.open(urllib.request.Request(url, headers=headers), timeout=timeout)
            except urllib.error.HTTPError as err:
                with err:
                    unsatisfied = _CONTENT_RANGE_UNSATISFIED.fullmatch((err.headers.get('Content-Range') or '').strip())
                if err.code == 416 and offset:
                    if unsatisfied and int(unsatisfied.group(1)) == offset:  # the partial file is already whole
                        return _Download(offset, digest.hexdigest(), 0, announced.get('sha256'),
                                         announced.get('size'))
                    _log.warning('%s: the server cannot resume at byte %d; downloading again from zero', name, offset)
                    out.truncate(0)
                    offset, digest = 0, hashlib.sha256()
                    continue
                raise WeightsError(f'{name}: HTTP {err.code} {err.reason} from {url}; nothing was installed. '
                                   f'{_resume_hint(part)}') from None
            except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
                reason = getattr(err, 'reason', err)
                raise WeightsError(f'{name}: cannot download {url} ({_reason(reason, timeout)}); nothing was '
                                   f'installed. {_resume_hint(part)}') from None
            with response:
                _announced(response.headers, announced)
                total = _response_total(response, offset, name, url)
                if response.status == 200 and offset:
                    _log.warning('%s: the server ignored the range request; downloading again from zero', name)
                    out.truncate(0)
                    offset, digest = 0, hashlib.sha256()
                received = _copy(response, out, digest, offset, total, name, part, timeout, progress)
            size = offset + received
            if total is not None and size < total:
                raise WeightsError(f'{name}: transfer interrupted after {size} of {total} bytes (the server closed '
                                   f'the connection); {_resume_hint(part)}')
            return _Download(size, digest.hexdigest(), received, announced.get('sha256'), announced.get('size'))
    raise WeightsError(f'{name}: the server refused to resume and to restart the download from {url}')


def _reason(reason: Any, timeout: float) -> str:
    if isinstance(reason, TimeoutError) or 'timed out' in str(reason):
        return f'no answer within {timeout:g} s (--timeout)'
    return str(reason)


def _response_total(response: Any, offset: int, name: str, url: str) -> int | None:
    """The complete file size from a 200 (Content-Length) or 206 (Content-Range) answer; None when unknown."""
    if response.status == 206:
        match = _CONTENT_RANGE.fullmatch((response.headers.get('Content-Range') or '').strip())
        if not match or int(match.group(1)) != offset:
            raise WeightsError(f'{name}: {url} answered the range request for byte {offset} with Content-Range '
                               f'{response.headers.get("Content-Range")!r}; delete the .part file and run '
                               '`lsm-ros weights fetch` again')
        return None if match.group(3) == '*' else int(match.group(3))
    if response.status != 200:
        raise WeightsError(f'{name}: unexpected HTTP status {response.status} from {url}')
    length = response.headers.get('Content-Length')
    return int(length) if length and length.isdigit() else None


def _copy(response: Any, out: BinaryIO, digest: Any, offset: int, total: int | None, name: str, part: Path,
          timeout: float, progress: bool) -> int:
    received = 0
    with tqdm(total=total, initial=offset, unit='B', unit_scale=True, unit_divisor=1024, desc=name,
              disable=not progress) as bar:
        try:
            while chunk := response.read1(CHUNK_BYTES):
                out.write(chunk)
                digest.update(chunk)
                received += len(chunk)
                bar.update(len(chunk))
        except (http.client.HTTPException, OSError) as err:
            out.flush()
            raise WeightsError(f'{name}: transfer interrupted after {offset + received} of '
                               f'{total if total is not None else "?"} bytes ({_reason(err, timeout)}); '
                               f'{_resume_hint(part)}') from None
        finally:
            out.flush()
            os.fsync(out.fileno())
    return received


def _rejected(part: Path, message: str) -> WeightsError:
    part.unlink(missing_ok=True)
    return WeightsError(f'{message}; the download was deleted and nothing was installed under the final name. Run '
                        '`lsm-ros weights fetch` again to download it again, or check the address (--base-url)')


def _verify_download(entry: WeightsFile, part: Path, download: _Download, url: str) -> str:
    """Size and hash checks of a complete download; deletes it and raises WeightsError on a mismatch. Returns
    the FetchResult.verification."""
    name = entry.filename
    for expected, origin in ((entry.size, 'the published size'), (download.announced_size, 'the size the server '
                                                                                            'announced')):
        if expected is not None and download.size != expected:
            raise _rejected(part, f'{name}: wrong size: {download.size} bytes from {url}, {origin} is {expected}')
    for expected, origin, verification in ((entry.sha256, 'the published SHA-256', 'published-sha256'),
                                           (download.announced_sha256, 'the SHA-256 the server announced',
                                            'server-sha256')):
        if expected is not None:
            if download.sha256 != expected:
                raise _rejected(part, f'{name}: wrong SHA-256: {download.sha256} from {url}, {origin} is {expected}')
            return verification
    return 'size' if entry.size is not None or download.announced_size is not None else 'unverified'


def _verify_present(entry: WeightsFile, path: Path) -> FetchResult:
    size = path.stat().st_size
    if entry.size is not None and size != entry.size:
        raise WeightsError(f'{path} is already there but has {size} bytes, not the published {entry.size}: delete '
                           'it, or run `lsm-ros weights fetch --force` to download it again')
    _log.info('%s is already present: computing its SHA-256', path)
    digest = sha256_file(path)
    if entry.sha256 is not None:
        if digest != entry.sha256:
            raise WeightsError(f'{path} is already there but its SHA-256 {digest} is not the published '
                               f'{entry.sha256}: delete it, or run `lsm-ros weights fetch --force`')
        return FetchResult(entry, path, 'present', size, digest, 'published-sha256')
    return FetchResult(entry, path, 'present', size, digest, 'size' if entry.size is not None else 'unverified')


def _check_url(url: str) -> str:
    if urllib.parse.urlsplit(url).scheme not in ('http', 'https'):
        raise WeightsError(f'only http:// and https:// addresses can be downloaded, got {url!r}')
    return url


def file_url(entry: WeightsFile, base_url: str | None = None) -> str | None:
    """The address ``entry`` is downloaded from: ``base_url/<file name>`` when a mirror is given, else its
    published address (None when there is no direct one)."""
    if base_url:
        return _check_url(base_url.rstrip('/') + '/' + urllib.parse.quote(entry.filename))
    return entry.url


def manual_download_message(entry: WeightsFile, directory: Path) -> str:
    """What to do for a file without a direct download address (LSeg's Google Drive file)."""
    file_id = entry.manual.rstrip('/').split('/')[-2] if entry.manual and '/d/' in entry.manual else ''
    gdown = f' or `gdown {file_id} -O {directory / entry.filename}`' if file_id else ''
    return (f'{entry.filename} ({entry.label}) has no direct download address: it is published on '
            f'{entry.manual or "a page that needs a browser"} ({entry.source}), which needs an interactive '
            f'confirmation that lsm-ros does not automate. Download it by hand (browser{gdown}) into {directory}, '
            f'then run `lsm-ros weights check --dir {directory}`; or give a mirror that serves it with --base-url')


def fetch_file(entry: WeightsFile, directory: str | os.PathLike[str], *, base_url: str | None = None,
               timeout: float = DEFAULT_TIMEOUT_S, progress: bool = True, force: bool = False) -> FetchResult:
    """Download one file into ``directory`` (created) and install it under its name after verification.

    Resumes ``<name>.part`` with an HTTP Range request (from zero when the server ignores it); checks the size
    and SHA-256 against the published ones (:class:`WeightsFile`) or else those the server announces; renames
    the verified file atomically. A file already installed is only verified (``force``: downloaded again, the
    old file replaced only after the new one is verified). ``timeout``: seconds without data before giving up.
    Raises WeightsError with what went wrong and what to do (a failed transfer keeps the partial file for a
    resume; a wrong size or hash deletes it)."""
    directory = Path(directory).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / entry.filename
    if target.is_file() and not force:
        return _verify_present(entry, target)
    url = file_url(entry, base_url)
    if url is None:
        raise WeightsError(manual_download_message(entry, directory))
    _check_url(url)
    part = target.with_name(target.name + PART_SUFFIX)
    _log.info('downloading %s from %s', entry.filename, url)
    download = _download(url, part, entry.filename, timeout, progress)
    verification = _verify_download(entry, part, download, url)
    os.replace(part, target)
    with contextlib.suppress(OSError):  # make the rename durable
        directory_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(directory_fd)
        finally:
            os.close(directory_fd)
    return FetchResult(entry, target, 'downloaded', download.size, download.sha256, verification, download.received)


def fetch_weights(directory: str | os.PathLike[str] | None = None, *, only: Iterable[str] | None = None,
                  files: Sequence[WeightsFile] = OFFICIAL_WEIGHTS, base_url: str | None = None,
                  timeout: float = DEFAULT_TIMEOUT_S, progress: bool = True, force: bool = False
                  ) -> list[FetchOutcome]:
    """:func:`fetch_file` for each selected file (``only``: keys, default all of ``files``) into ``directory``
    (default :func:`default_weights_dir`); a failure of one file does not stop the others."""
    directory = weights_dir(directory)
    outcomes = []
    for entry in select_weights(only, files):
        try:
            outcomes.append(FetchOutcome(entry, result=fetch_file(entry, directory, base_url=base_url,
                                                                  timeout=timeout, progress=progress, force=force)))
        except WeightsError as err:
            _log.debug('fetching %s failed: %s', entry.filename, err)
            outcomes.append(FetchOutcome(entry, error=str(err)))
    return outcomes


# ------------------------------------------------------------------------------------------------ check
def inspect_checkpoint(path: str | os.PathLike[str], kind: str, config: Any = None) -> str:
    """Load ``path`` with the safe loader, memory-mapped (only what is used is read), as a checkpoint of
    ``kind`` ('dust3r', 'lseg' or 'lsm') and build the network from it, without reading the weights' values
    where possible (the LSM-own part is checked on the meta device). Returns a one-line description; raises
    CheckpointError when the file is unsafe, unreadable, of another kind or does not match the network.
    ``config``: an :class:`~lsm_ros.model.lsm.LsmConfig` for non-released shapes (tests); DUSt3R then uses its
    ``dust3r`` part instead of the file's constructor string."""
    import torch

    from lsm_ros.model.checkpoint import (CheckpointError, checkpoint_kind, load_checkpoint_file,
                                          load_dust3r_checkpoint)
    from lsm_ros.model.lseg import load_lseg_checkpoint
    from lsm_ros.model.lsm import LargeSpatialModel, LsmConfig, lsm_config_from_checkpoint

    path = Path(path)
    checkpoint = load_checkpoint_file(path, mmap=True)
    found = checkpoint_kind(checkpoint)
    if found != kind:
        labels = {entry.key: entry.label for entry in OFFICIAL_WEIGHTS}
        raise CheckpointError(f'{path.name} is {"a " + labels[found] if found else "not a"} checkpoint, expected '
                              f'the {labels[kind]} checkpoint')
    if kind == 'dust3r':
        net = load_dust3r_checkpoint(checkpoint, config=config.dust3r if config is not None else None)
        count = sum(p.numel() for p in net.parameters())
        return (f'DUSt3R {net.config.enc_embed_dim}-d x {net.config.enc_depth} encoder, '
                f'{net.config.dec_embed_dim}-d x {net.config.dec_depth} decoder, {count / 1e6:.1f} M parameters')
    if kind == 'lseg':
        extractor, text_encoder = load_lseg_checkpoint(
            checkpoint, config=config.lseg if config is not None else None,
            text_config=config.clip if config is not None else None)
        count = sum(p.numel() for module in (extractor, text_encoder) for p in module.parameters())
        return (f'LSeg ViT {extractor.config.embed_dim}-d x {extractor.config.depth} and CLIP text encoder, '
                f'{count / 1e6:.1f} M parameters')
    official = lsm_config_from_checkpoint(checkpoint, path)
    lsm_config = config if config is not None else LsmConfig.from_official(official)
    with torch.device('meta'):
        model = LargeSpatialModel(lsm_config)
    with warnings.catch_warnings():  # loading into meta parameters checks names and shapes only
        warnings.simplefilter('ignore')
        model.load_lsm_state_dict(checkpoint.get('model'), source=path.name)
    own = sum(p.numel() for name, p in model.named_parameters()
              if not name.startswith(('dust3r.', 'lseg.', 'text_encoder.')))
    companions = [str((official.get(section) or {}).get('pretrained_model_name_or_path', '?'))
                  for section in ('dust3r_config', 'lseg_config')]
    return (f'LSM (PTv3 and Gaussian head), {own / 1e6:.1f} M own parameters; names DUSt3R '
            f'{Path(companions[0]).name} and LSeg {Path(companions[1]).name}')


@dataclass(frozen=True)
class CheckRow:
    """One line of ``weights check``: ``size``/``sha256`` are 'ok', 'WRONG', 'unpublished' (nothing to compare
    with) or '-' (not checked); ``loads`` 'ok', 'FAIL' or '-'; ``detail`` the checkpoint's description or the
    problems. ``converted``: the row is the ``.safetensors`` conversion of the file."""

    entry: WeightsFile
    path: Path
    present: bool
    size_bytes: int | None
    size: str
    sha256: str
    local_sha256: str | None
    loads: str
    detail: str
    converted: bool = False
    alternative: bool = False  # missing, but its conversion is present

    @property
    def ok(self) -> bool:
        """Whether this row passes: present (or replaced by its conversion) and nothing WRONG or FAIL."""
        if not self.present:
            return self.alternative
        return 'WRONG' not in (self.size, self.sha256) and self.loads != 'FAIL'

    @property
    def status(self) -> str:
        if not self.present:
            return 'converted' if self.alternative else 'MISSING'
        if not self.ok:
            return 'FAIL'
        return 'ok' if self.converted or self.sha256 == 'ok' else 'UNVERIFIED'


def _check_one(entry: WeightsFile, path: Path, config: Any, hashes: bool, converted: bool) -> CheckRow:
    from lsm_ros.model.checkpoint import CheckpointError

    size_bytes = path.stat().st_size
    size = '-' if converted else ('unpublished' if entry.size is None else
                                  'ok' if size_bytes == entry.size else 'WRONG')
    local = None
    digest_status = '-'
    problems = []
    if size == 'WRONG':
        problems.append(f'{size_bytes} bytes, the published size is {entry.size}')
    if hashes and not converted:
        _log.info('computing the SHA-256 of %s', path)
        local = sha256_file(path)
        digest_status = 'unpublished' if entry.sha256 is None else 'ok' if local == entry.sha256 else 'WRONG'
        if digest_status == 'WRONG':
            problems.append(f'SHA-256 {local}, the published one is {entry.sha256}')
    try:
        description = inspect_checkpoint(path, entry.key, config)
        loads = 'ok'
    except CheckpointError as err:
        loads, description = 'FAIL', ''
        problems.append(str(err))
    return CheckRow(entry, path, True, size_bytes, size, digest_status, local, loads,
                    '; '.join(problems) if problems else description, converted)


def check_weights(directory: str | os.PathLike[str] | None = None, *, only: Iterable[str] | None = None,
                  files: Sequence[WeightsFile] = OFFICIAL_WEIGHTS, config: Any = None,
                  hashes: bool = True) -> list[CheckRow]:
    """Check each selected file in ``directory`` (default :func:`default_weights_dir`): present, size and
    SHA-256 against the published ones (when published; ``hashes=False`` skips hashing), and that it loads as
    the right kind of checkpoint (:func:`inspect_checkpoint`). A ``.safetensors`` conversion next to a file
    (``lsm-ros weights convert``) gets a row of its own (load check only). ``config``: see
    :func:`inspect_checkpoint`."""
    from lsm_ros.model.checkpoint import SAFETENSORS_SUFFIX

    directory = weights_dir(directory)
    rows = []
    for entry in select_weights(only, files):
        path = directory / entry.filename
        converted = path.with_suffix(SAFETENSORS_SUFFIX)
        if path.is_file():
            rows.append(_check_one(entry, path, config, hashes, converted=False))
        else:
            part = path.with_name(path.name + PART_SUFFIX)
            detail = (f'partial download {part.name} present: run `lsm-ros weights fetch` to resume'
                      if part.is_file() else 'run `lsm-ros weights fetch`' if entry.url else
                      'download it by hand: `lsm-ros weights fetch --only ' + entry.key + '` says how')
            rows.append(CheckRow(entry, path, False, None, '-', '-', None, '-', detail,
                                 alternative=converted.is_file()))
        if converted.is_file():
            rows.append(_check_one(entry, converted, config, hashes, converted=True))
    return rows


def format_check_table(rows: Sequence[CheckRow]) -> str:
    """The rows as a fixed-width text table, then one note per row (description, problems, local hashes)."""
    header = ('file', 'status', 'size', 'bytes', 'sha256', 'loads')
    lines = [(row.path.name, row.status, row.size, _human(row.size_bytes) if row.present else '-', row.sha256,
              row.loads) for row in rows]
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *lines)]
    text = ['  '.join(str(cell).ljust(width) for cell, width in zip(line, widths)).rstrip()
            for line in (header, *lines)]
    text.insert(1, '  '.join('-' * width for width in widths))
    text.append('')
    for row in rows:
        text.append(f'{row.path.name}: {row.detail}' if row.detail else f'{row.path.name}:')
        if row.sha256 == 'unpublished':
            text.append(f'  NOT verified against a published hash (none is published for {row.entry.filename}); '
                        f'SHA-256 of this copy: {row.local_sha256} (compare it with a trusted copy)')
        elif row.present and not row.converted and row.sha256 == '-':
            text.append('  SHA-256 not computed (--no-hash): the content is NOT verified')
    return '\n'.join(text)


# ------------------------------------------------------------------------------------------------ convert
@dataclass(frozen=True)
class ConvertResult:
    """One converted file: the kind, the official source, the safetensors file written and its tensor count."""

    kind: str
    source: Path
    path: Path
    tensors: int

    def describe(self) -> str:
        return (f'{self.source.name} -> {self.path} ({self.tensors} tensors, {_human(self.path.stat().st_size)}; '
                'loads without pickle)')


def converted_name(source: str | os.PathLike[str]) -> str:
    """The file name ``weights convert`` gives the conversion of ``source``: its stem + ``.safetensors``."""
    from lsm_ros.model.checkpoint import SAFETENSORS_SUFFIX
    return Path(source).with_suffix(SAFETENSORS_SUFFIX).name


def convert_checkpoint(source: str | os.PathLike[str], kind: str, out_dir: str | os.PathLike[str],
                       companions: Mapping[str, str] | None = None) -> ConvertResult:
    """Convert one official checkpoint (read safely, memory-mapped) of ``kind`` into
    ``out_dir/<stem>.safetensors``: the state dict's tensors unchanged, plus the non-tensor part the loaders need
    as JSON metadata (:func:`~lsm_ros.model.checkpoint.checkpoint_to_safetensors`). For the LSM file,
    ``companions`` ({'dust3r_config': name, 'lseg_config': name}) replaces the companion files its config names.
    Raises WeightsError or CheckpointError."""
    from lsm_ros.model.checkpoint import (checkpoint_to_safetensors, is_safetensors_file, load_checkpoint_file,
                                          save_safetensors_file)
    from lsm_ros.model.lsm import LSM_CLASS_NAME, lsm_config_from_checkpoint

    source = Path(source).expanduser()
    if not source.is_file():
        raise WeightsError(f'{source}: no such file')
    if is_safetensors_file(source):
        raise WeightsError(f'{source} is already a safetensors file')
    target = Path(out_dir).expanduser() / converted_name(source)
    checkpoint = load_checkpoint_file(source, mmap=True)
    args_model = None
    if kind == 'lsm' and companions:
        config = lsm_config_from_checkpoint(checkpoint, source)
        for section, name in companions.items():
            config[section] = {**(config.get(section) or {}), 'pretrained_model_name_or_path': name}
        args_model = f'{LSM_CLASS_NAME}(config={config!r})'
    tensors, metadata = checkpoint_to_safetensors(checkpoint, kind, source=source.name, args_model=args_model)
    save_safetensors_file(target, tensors, metadata)
    _log.info('wrote %s (%d tensors) from %s', target, len(tensors), source)
    return ConvertResult(kind, source, target, len(tensors))


def convert_weights(out_dir: str | os.PathLike[str], *, dust3r: str | os.PathLike[str] | None = None,
                    lseg: str | os.PathLike[str] | None = None, lsm: str | os.PathLike[str] | None = None
                    ) -> list[ConvertResult]:
    """Convert any of the three official files into ``out_dir`` (:func:`convert_checkpoint`). When the LSM file is
    converted together with DUSt3R and/or LSeg, its config names their conversions (found next to it)."""
    sources = {'dust3r': dust3r, 'lseg': lseg, 'lsm': lsm}
    if not any(sources.values()):
        raise WeightsError('nothing to convert: give --dust3r, --lseg and/or --lsm')
    companions = {section: converted_name(sources[key]) for key, section in
                  (('dust3r', 'dust3r_config'), ('lseg', 'lseg_config')) if sources[key]}
    return [convert_checkpoint(source, kind, out_dir, companions if kind == 'lsm' else None)
            for kind, source in sources.items() if source]
