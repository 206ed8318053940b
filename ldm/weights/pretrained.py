"""Where pretrained weights come from: an explicit local path, else the owning library's cache, else its download.

One policy for every pretrained family (FID Inception, LPIPS trunks, OpenCLIP): the library that owns
the weights decides where they are cached and how they are fetched; ``resolve_weights`` only orders the
three and turns "nowhere" into a one-line ``WeightsUnavailable`` naming the option that takes a local
file. ``LDM_OFFLINE=1`` forbids downloads (OpenCLIP also honours ``HF_HUB_OFFLINE=1``); a download whose
host name does not resolve (and no proxy is set) is not started, so an offline machine gets that line at
once rather than after the library's retries (huggingface_hub backs off for about 45 s a file).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Sequence
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import getproxies

import torch

from ldm.weights.io import WeightsUnavailable, error_line

OFFLINE = "LDM_OFFLINE"
_TRUE = {"1", "ON", "YES", "TRUE"}


def downloads_off(variables: Sequence[str] = (OFFLINE,)) -> str | None:
    """The first of ``variables`` set to a true value (1, on, yes, true), or None when downloads are allowed."""
    return next((v for v in variables if os.environ.get(v, "").strip().upper() in _TRUE), None)


def resolve_weights(
    path: str | os.PathLike[str] | None,  # an explicit local file: always wins, never replaced
    *,
    what: str,  # the weights, for messages: "FID Inception-v3 weights"
    option: str,  # the setting that takes a local file, named in every message
    url: str,  # the address the download contacts, named as the one a user can fetch by hand
    where: str,  # the library's cache, for messages
    cached: Callable[[], str | None],  # the library's cache lookup
    download: Callable[[], str],  # the library's own download; returns the local file
    offline_vars: Sequence[str] = (OFFLINE,),  # any of them true forbids the download
) -> str:
    """A local weights file: ``path``, else the library's cached copy, else its download (unless offline)."""
    if path is not None:
        if not os.path.isfile(path):
            raise WeightsUnavailable(f"{what}: no file at {os.fspath(path)}; set {option} to an existing weights file")
        return os.fspath(path)
    found = cached()
    if found is not None:
        return found
    missing = f"{what} not found (looked in {where})"
    off = downloads_off(offline_vars)
    if off is not None:
        raise WeightsUnavailable(f"{missing} and downloads are off ({off}=1); set {option} to a local copy of {url}")
    why = unreachable(url)
    if why is not None:
        raise WeightsUnavailable(f"{missing} and {why}; set {option} to a local copy of {url}")
    try:
        return download()
    except Exception as error:  # no network, a proxy, a checksum, a full disk: the caller can only be told
        raise WeightsUnavailable(f"{missing} and downloading {url} failed ({error_line(error)}); "
                                 f"set {option} to a local copy") from error


def unreachable(url: str) -> str | None:
    """Why ``url`` cannot be fetched at all (its host name does not resolve and no proxy is set), else None."""
    parts = urlparse(url)
    proxies = getproxies()
    if parts.hostname is None or parts.scheme in proxies or "all" in proxies:  # a proxy resolves names itself
        return None
    try:
        socket.getaddrinfo(parts.hostname, parts.port or parts.scheme)
    except OSError as error:
        return f"{parts.hostname} does not resolve ({error.strerror or error}): no network?"
    return None


def hub_checkpoint(url: str) -> Path:
    """Where torch hub's ``load_state_dict_from_url`` keeps ``url``: ``<hub dir>/checkpoints/<file name>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def hub_weights(path: str | os.PathLike[str] | None, url: str, *, what: str, option: str, check_hash: bool) -> str:
    """``resolve_weights`` for a file that its library fetches with torch hub (torch-fidelity, torchvision).

    ``check_hash`` verifies the hash prefix in the file name as torchvision does (torch-fidelity does not).
    """
    target = hub_checkpoint(url)

    def download() -> str:
        target.parent.mkdir(parents=True, exist_ok=True)
        prefix = torch.hub.HASH_REGEX.search(target.name).group(1) if check_hash else None
        torch.hub.download_url_to_file(url, str(target), prefix)  # a temporary file, then renamed
        return str(target)

    return resolve_weights(path, what=what, option=option, url=url, where=f"torch hub's cache {target}",
                           cached=lambda: str(target) if target.is_file() else None, download=download)
