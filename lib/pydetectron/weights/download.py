"""Weights named by URL, as Detectron's own configs name them: downloaded once into DOWNLOAD_CACHE, then reused.

The cache is laid out by URL path as Detectron's ``cache_url`` lays it out: a URL under Detectron's bucket
(``https://dl.fbaipublicfiles.com/detectron/ImageNetPretrained/MSRA/R-50.pkl``) goes to
``<DOWNLOAD_CACHE>/ImageNetPretrained/MSRA/R-50.pkl``, so an existing Detectron cache is reused as it is; any
other URL goes to ``<DOWNLOAD_CACHE>/<host>/<path>``. A download is written to a temporary name beside its
destination and renamed only once every promised byte has arrived (and its checksum matched), so an interrupted
download never leaves a file that later loads. torchvision-style names carry the first hex digits of the file's
sha256 (``resnet50-0676ba61.pth``, torch.hub's convention); such a URL's file is checked on download and on
reuse (local paths are not: their names are the user's).

The transfer uses the standard library's ``urllib`` rather than ``torch.hub.download_url_to_file`` because the
latter accepts a connection closed before ``Content-Length`` bytes as a complete file and has no timeout.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import sys
import uuid
from urllib.error import URLError
from urllib.parse import unquote, urlsplit
from urllib.request import Request, urlopen

# Detectron's bucket, before and after it moved; URLs under it are cached by their path below it.
DETECTRON_BASE_URLS = ("https://dl.fbaipublicfiles.com/detectron/", "https://s3-us-west-2.amazonaws.com/detectron/")
# torch.hub's HASH_REGEX, asking for at least 8 digits so that Detectron names (R-50.pkl) are not taken for one.
_HASH_IN_NAME = re.compile(r"-([a-f0-9]{8,})\.")
_URL = re.compile(r"^https?://", re.IGNORECASE)
_CHUNK = 1 << 20


class WeightsDownloadError(OSError):
    """A weights URL could not be fetched; the message names the URL, the cache path and the remedy."""


class WeightsChecksumError(ValueError):
    """A weights file's sha256 does not start with the hash its name publishes."""


def is_url(path: str) -> bool:
    return bool(_URL.match(path))


def cache_path_of(url: str, cache_dir: str) -> str:
    """Where `url` is (or will be) cached under `cache_dir`, laid out by URL path as Detectron does."""
    base = next((b for b in DETECTRON_BASE_URLS if url.lower().startswith(b)), None)
    parts = urlsplit(url)
    relative = url[len(base):].split("?")[0].split("#")[0] if base else parts.netloc + parts.path
    segments = [s for s in relative.split("/") if s]
    if not segments or relative.endswith("/") or any(unquote(s) in (".", "..") for s in segments):
        raise ValueError(f"weights URL {url!r} does not name a file (its path must end in a file name)")
    return os.path.join(os.path.expanduser(cache_dir), *segments)


def published_hash(url: str) -> str | None:
    """The sha256 prefix a torchvision-style file name publishes (``.../resnet50-0676ba61.pth`` -> '0676ba61')."""
    match = _HASH_IN_NAME.search(os.path.basename(urlsplit(url).path))
    return match.group(1) if match else None


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_hash(path: str, expected: str | None, source: str, remedy: str) -> None:
    if expected is None:
        return
    actual = _sha256(path)
    if not actual.startswith(expected):
        raise WeightsChecksumError(f"{source}: the file's name publishes sha256 {expected}... but {path} has "
                                   f"sha256 {actual}; {remedy}")


def _show_progress(received: int, total: int | None, name: str) -> None:
    if total:
        filled = int(40 * received / total)
        sys.stderr.write(f"\r  {name} [{'=' * filled}{'.' * (40 - filled)}] {100 * received / total:5.1f}% "
                         f"of {total / 2**20:.1f} MB")
    else:
        sys.stderr.write(f"\r  {name} {received / 2**20:.1f} MB")
    sys.stderr.flush()


def _fetch(url: str, partial: str, timeout: float) -> None:
    """Write the body of `url` to `partial`; raise if fewer bytes arrive than the server promised."""
    progress = sys.stderr.isatty()
    name = os.path.basename(urlsplit(url).path)
    with urlopen(Request(url, headers={"User-Agent": "pydetectron"}), timeout=timeout) as response, \
            open(partial, "wb") as out:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        received = 0
        while chunk := response.read(_CHUNK):
            out.write(chunk)
            received += len(chunk)
            if progress:
                _show_progress(received, total, name)
    if progress:
        sys.stderr.write("\n")
    if total is not None and received != total:
        raise http.client.IncompleteRead(b"", total - received)


def _download(url: str, destination: str, what: str, timeout: float) -> None:
    remedy = (f"download it by hand to {destination} (or pass a local file as {what}); "
              "an interrupted download leaves nothing behind, so running again retries it")
    os.makedirs(os.path.dirname(destination), exist_ok=True)
    partial = f"{destination}.{uuid.uuid4().hex}.partial"
    print(f"Downloading {what} {url} to {destination}", file=sys.stderr, flush=True)
    try:
        _fetch(url, partial, timeout)
        _check_hash(partial, published_hash(url), f"{what} {url}", "the download is corrupt or the file was "
                    f"replaced at the source; nothing was written to {destination}")
        os.replace(partial, destination)
    except (URLError, http.client.HTTPException, OSError) as err:
        if isinstance(err, http.client.IncompleteRead):
            reason = f"the connection closed {err.expected} bytes short of the promised size"
        else:
            reason = str(err) if isinstance(err, URLError) else f"{type(err).__name__}: {err}"
        raise WeightsDownloadError(f"{what} {url} could not be downloaded ({reason}) to the cache path "
                                   f"{destination}: {remedy}") from err
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def cached_weights_path(path_or_url: str, cache_dir: str, what: str, timeout: float = 60.0) -> str:
    """A local file for a weights path or ``http(s)://`` URL; `what` names its source in errors (e.g.
    'TRAIN.WEIGHTS', '--load_detectron').

    A local path must exist. A URL is downloaded into `cache_dir` (cfg.DOWNLOAD_CACHE) unless already there,
    and its cached path returned. Raises FileNotFoundError, :class:`WeightsDownloadError` (unreachable, HTTP
    error, timeout, truncated) or :class:`WeightsChecksumError` (a torchvision-style hash that does not match).
    """
    if not is_url(path_or_url):
        if not os.path.isfile(path_or_url):
            raise FileNotFoundError(f"{what} {path_or_url!r} does not exist (give a weights file or an "
                                    "http(s):// URL)")
        return path_or_url
    destination = cache_path_of(path_or_url, cache_dir)
    if not os.path.isfile(destination):
        _download(path_or_url, destination, what, timeout)
    else:
        _check_hash(destination, published_hash(path_or_url), f"{what} {path_or_url} (cached)",
                    f"delete {destination} to download it again")
    return destination
