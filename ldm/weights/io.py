"""The one reader of weight files: safetensors, or torch files loaded with ``weights_only=True``.

Every loader in ldm reads through ``read_state_dict`` and checks the result with ``check_keys``, so
every failure is a ``WeightsError`` whose message names the file and lists the keys that do not fit
(``WeightsUnavailable``, also a ``FileNotFoundError``, when there is no file).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
from collections.abc import Mapping

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

StateDict = dict[str, Tensor]
LISTED = 10  # keys shown per kind in an error message
_REFUSED = re.compile(r"WeightsUnpickler error:\s*(.+?)(?:\. Please use|\n|$)")  # the reason in torch's long message


class WeightsError(ValueError):
    """A weights file that cannot be read or does not fit the model it is loaded into."""


class WeightsUnavailable(WeightsError, FileNotFoundError):
    """Weights that are not on this machine; a metric catches it (as FileNotFoundError) to disable itself."""


def read_state_dict(path: str | os.PathLike[str]) -> StateDict:
    """The tensors of a weights file; a Lightning checkpoint gives its ``state_dict``.

    ``.safetensors`` files are memory-mapped; anything else is unpickled with ``weights_only=True``,
    which refuses code objects, so a file from the internet cannot run anything.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightsUnavailable(f"{path}: no such weights file")
    try:
        if path.endswith(".safetensors"):
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=_is_zip(path))
    except pickle.UnpicklingError as error:  # weights_only refused it; torch's advice to drop weights_only is not ours
        refused = _REFUSED.search(str(error))
        reason = refused[1] if refused else error_line(error)
        raise WeightsError(f"{path}: not a safetensors file nor a torch file of plain tensors ({reason})") from error
    except Exception as error:  # re-raised naming the file: a truncated download, a foreign format, ...
        raise WeightsError(f"{path}: cannot read weights ({error_line(error)})") from error
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]  # a Lightning (or CompVis) checkpoint
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise WeightsError(f"{path}: holds a {type(state).__name__}, not a state dict of tensors")
    return dict(state)


def under(state: Mapping[str, Tensor], prefix: str) -> StateDict:
    """The entries whose keys start with ``prefix``, the prefix removed (one part of a larger file)."""
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}


def error_line(error: BaseException) -> str:
    """``Type: message`` of an exception on one line, to quote inside another message."""
    return " ".join(f"{type(error).__name__}: {error}".split())


def _is_zip(path: str) -> bool:
    """torch's zip format can be memory-mapped; legacy pickles cannot."""
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def _listing(keys: list[str]) -> str:
    more = f" and {len(keys) - LISTED} more" if len(keys) > LISTED else ""
    return ", ".join(keys[:LISTED]) + more


def check_keys(state: Mapping[str, Tensor], expected: Mapping[str, Tensor], path: str | os.PathLike[str],
               what: str) -> None:
    """Raise a WeightsError naming ``path`` unless ``state`` has exactly the keys and shapes of ``expected``."""
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    shapes = [f"{k} {tuple(state[k].shape)} in file vs {tuple(v.shape)} in model"
              for k, v in expected.items() if k in state and state[k].shape != v.shape]
    problems = [f"{name}: {_listing(keys)}" for name, keys in
                (("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped keys", shapes)) if keys]
    if problems:
        raise WeightsError(f"{os.fspath(path)} does not fit {what}; " + "; ".join(problems))


def load_weights(module: nn.Module, state: Mapping[str, Tensor], path: str | os.PathLike[str], what: str) -> None:
    """Load ``state`` into ``module`` strictly, after ``check_keys`` (so a mismatch names the file)."""
    check_keys(state, module.state_dict(), path, what)
    module.load_state_dict(state)


def state_sha256(module: nn.Module, exclude: tuple[str, ...] = ()) -> str:
    """A hash of a module's state dict (names, dtypes, shapes, bytes): its identity for caches and checks."""
    digest = hashlib.sha256(type(module).__qualname__.encode())
    for name, tensor in sorted(module.state_dict().items()):
        if name not in exclude:
            digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
