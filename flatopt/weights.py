"""Released learned-optimizer weights: where they come from, how they are checked and written.

A release is a folder with two files: ``model.safetensors`` (the update rule's tensors) and
``config.json`` (format version, architecture, license, provenance and evaluation). The name a user
passes as ``weights`` resolves by one rule, in this order:

1. A local path: any ``pathlib.Path``, any string starting with ``/``, ``./``, ``../`` or ``~``, and
   any other string naming an existing file or folder. A folder must hold the two files; a file path
   may name either of them.
2. A release bundled with the package (:func:`list_pretrained`), available offline.
3. A Hugging Face Hub repository ``owner/name`` or ``owner/name@revision``, downloaded once with
   ``huggingface_hub`` and cached by it.

Loading is strict: missing, extra or mis-shaped tensors, non-finite values, an unknown format
version or architecture are refused with an error naming the file.
"""

import json
import logging
import pathlib
import re
import warnings

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .update_rules import build_update_rule

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
DEFAULT_WEIGHTS = "dm"

_PRETRAINED_DIR = pathlib.Path(__file__).resolve().parent / "pretrained"
_HUB_ID = re.compile(
    r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w./-]+))?$"
)
# Seconds to wait for the Hub before concluding it is unreachable.
_HUB_TIMEOUT = 5.0


def list_pretrained():
    """Return the names of the releases bundled with this package, sorted.

    Returns:
        A list of names usable as ``weights`` without a network.
    """
    if not _PRETRAINED_DIR.is_dir():
        return []
    return sorted(p.name for p in _PRETRAINED_DIR.iterdir() if (p / CONFIG_FILE).is_file())


def resolve_weights(weights):
    """Find the folder holding a release, by the rule in this module's docstring.

    Args:
        weights: A local path, a bundled release name, or a Hub id ``owner/name[@revision]``.

    Returns:
        The ``pathlib.Path`` of a folder holding ``config.json`` and ``model.safetensors``.

    Raises:
        FileNotFoundError: If a path was given and does not exist or lacks one of the two files.
        ValueError: If ``weights`` is neither a path, a bundled name, nor a Hub id.
        OSError: If the Hub could not be reached or does not have the repository.
    """
    if isinstance(weights, pathlib.PurePath):
        return _release_folder(pathlib.Path(weights))
    if not isinstance(weights, str):
        raise TypeError(f"weights must be a str or pathlib.Path, got {type(weights).__name__}")
    if weights.startswith(("/", "./", "../", "~")) or pathlib.Path(weights).exists():
        if weights in list_pretrained():
            warnings.warn(
                f"weights {weights!r} names both a bundled release and the local path "
                f"{pathlib.Path(weights).resolve()}; by the resolution rule the local path is used. "
                f"Pass './{weights}' to say so, or call from another directory for the bundled one.",
                UserWarning,
                stacklevel=3,
            )
        return _release_folder(pathlib.Path(weights))
    if weights in list_pretrained():
        return _PRETRAINED_DIR / weights
    match = _HUB_ID.match(weights)
    if match:
        return _download_from_hub(match["repo"], match["revision"])
    raise ValueError(
        f"unknown weights {weights!r}: not a local path, not a bundled release "
        f"({', '.join(list_pretrained()) or 'none bundled'}), and not a Hugging Face Hub id "
        f"of the form 'owner/name[@revision]'."
    )


def bundled_release(name):
    """Return the folder of the bundled release ``name``, whatever the working directory holds.

    Raises:
        ValueError: If no bundled release has that name.
    """
    if name not in list_pretrained():
        raise ValueError(
            f"no bundled release {name!r}; bundled: {', '.join(list_pretrained()) or 'none'}"
        )
    return _PRETRAINED_DIR / name


def load_release(weights):
    """Load a release into a ready update rule.

    Args:
        weights: Anything :func:`resolve_weights` accepts.

    Returns:
        ``(update_rule, config)``: the update rule in eval mode with its parameters frozen, and the
        release's config dictionary.

    Raises:
        ValueError: If a file is corrupt, of an unknown format version or architecture, or its
            tensors do not match the architecture exactly.
    """
    folder = resolve_weights(weights)
    config = read_config(folder / CONFIG_FILE)
    try:
        update_rule = build_update_rule(config["update_rule"])
    except ValueError as exc:
        raise ValueError(f"{folder / CONFIG_FILE}: {exc}") from exc
    tensors = _read_tensors(folder / WEIGHTS_FILE)
    _check_tensors(tensors, update_rule.state_dict(), folder / WEIGHTS_FILE)
    update_rule.load_state_dict(tensors, strict=True)
    update_rule.eval().requires_grad_(False)
    return update_rule, config


def read_config(path):
    """Read and validate a release's ``config.json``.

    Raises:
        ValueError: If the file is not valid JSON, has an unknown format version, or lacks the
            update-rule description.
    """
    path = pathlib.Path(path)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(
            f"{path}: not a valid JSON config ({exc}); re-download the release."
        ) from exc
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(config).__name__}")
    version = config.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:
        raise ValueError(
            f"{path}: format_version {version!r} is not supported by this flatopt, which reads "
            f"version {FORMAT_VERSION}. Upgrade flatopt, or use weights exported for version "
            f"{FORMAT_VERSION}."
        )
    if not isinstance(config.get("update_rule"), dict):
        raise ValueError(f"{path}: missing the 'update_rule' section describing the architecture")
    return config


def save_release(update_rule, folder, **metadata):
    """Write an update rule as a release folder that :func:`load_release` reads back.

    Args:
        update_rule: The trained update rule.
        folder: Destination folder, created if needed; existing release files are replaced.
        **metadata: Extra top-level config entries (``name``, ``license``, ``provenance``,
            ``evaluation``, ...), which must be JSON-serialisable.

    Returns:
        The folder as a ``pathlib.Path``.
    """
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {
        k: v.detach().to("cpu", torch.float32).contiguous()
        for k, v in update_rule.state_dict().items()
    }
    config = {"format_version": FORMAT_VERSION, "update_rule": update_rule.config(), **metadata}
    # Write both files beside their final names first so that a crash never leaves a half release.
    save_file(
        tensors, folder / (WEIGHTS_FILE + ".tmp"), metadata={"format_version": str(FORMAT_VERSION)}
    )
    (folder / (CONFIG_FILE + ".tmp")).write_text(
        json.dumps(config, indent=2) + "\n", encoding="utf-8"
    )
    (folder / (WEIGHTS_FILE + ".tmp")).chmod(
        0o644
    )  # safetensors creates it readable by the owner only
    (folder / (WEIGHTS_FILE + ".tmp")).replace(folder / WEIGHTS_FILE)
    (folder / (CONFIG_FILE + ".tmp")).replace(folder / CONFIG_FILE)
    return folder


def _release_folder(path):
    path = path.expanduser()
    if not path.exists():
        raise FileNotFoundError(f"weights path {str(path)!r} does not exist")
    folder = path if path.is_dir() else path.parent
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(
                f"{folder} is not a flatopt release: it has no {name} (a release folder holds "
                f"{CONFIG_FILE} and {WEIGHTS_FILE})"
            )
    return folder


def _read_tensors(path):
    try:
        with safe_open(path, framework="pt") as weights_file:
            version = (weights_file.metadata() or {}).get("format_version")
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ValueError(
            f"{path}: cannot read the weights ({exc}); the file is corrupt or truncated, "
            "re-download the release."
        ) from exc
    # save_release records the version in the file too; files written by other tools may not.
    if version is not None and version != str(FORMAT_VERSION):
        raise ValueError(
            f"{path}: weights written in format version {version!r}, this flatopt reads version "
            f"{FORMAT_VERSION}; upgrade flatopt or use weights exported for version {FORMAT_VERSION}."
        )
    return tensors


def _check_tensors(tensors, expected, path):
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ValueError(
            f"{path}: tensors do not match the architecture in its config.json "
            f"(missing: {missing or 'none'}; unexpected: {extra or 'none'})"
        )
    for name, reference in expected.items():
        tensor = tensors[name]
        if tensor.shape != reference.shape:
            raise ValueError(
                f"{path}: tensor {name!r} has shape {tuple(tensor.shape)}, the architecture in "
                f"config.json needs {tuple(reference.shape)}"
            )
        if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
            raise ValueError(
                f"{path}: tensor {name!r} is not finite floating point; refusing to load it. "
                "Weights exported from a diverged meta-training run look like this: export an "
                "earlier checkpoint, or use a bundled release (flatopt.list_pretrained())."
            )


def _download_from_hub(repo_id, revision):
    # Imported here so that bundled and local weights never pay for the Hub client's import.
    import huggingface_hub
    from huggingface_hub.utils import HfHubHTTPError, LocalEntryNotFoundError

    try:
        folder = huggingface_hub.snapshot_download(
            repo_id=repo_id,
            revision=revision,
            allow_patterns=[CONFIG_FILE, WEIGHTS_FILE, "README.md"],
            etag_timeout=_HUB_TIMEOUT,
        )
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as exc:
        where = f"{repo_id}@{revision}" if revision else repo_id
        raise OSError(
            f"could not get learned-optimizer weights {where!r} from the Hugging Face Hub: {str(exc).rstrip('.')}. "
            f"If this machine is offline, download the repository elsewhere (`hf download {repo_id}`, "
            "or `huggingface-cli download` with older huggingface_hub) and pass its local folder as "
            "weights, or use a bundled release: "
            f"{', '.join(list_pretrained()) or 'none bundled'}."
        ) from exc
    logger.info("loaded weights %s from the Hugging Face Hub cache at %s", repo_id, folder)
    return _release_folder(pathlib.Path(folder))
