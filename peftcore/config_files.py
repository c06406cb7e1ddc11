"""A config's own ``adapter_config.json`` on disk, without an adapter: what HF PEFT's
``PeftConfig.save_pretrained``, ``from_pretrained`` and ``from_json_file`` do.

Reading is bounded and strict (a regular file of at most :data:`MAX_CONFIG_BYTES`,
standard JSON only); writing goes to a temporary name first, so a reader never sees half
a file. peftcore never downloads: a name that is not a local directory is an error.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

from peftcore import strict_json
from peftcore.errors import ConfigError
from peftcore.safe_files import read_bounded

CONFIG_FILE = "adapter_config.json"
MAX_CONFIG_BYTES = 16 * 1024 * 1024

#: Keywords of HF's ``from_pretrained`` that choose where a hub download goes; a local
#: directory has no use for them.
HUB_KEYWORDS = frozenset({
    "revision", "cache_dir", "token", "use_auth_token", "force_download", "resume_download",
    "proxies", "local_files_only", "trust_remote_code", "_commit_hash",
})


def write_config_dict(directory: str, data: dict[str, Any]) -> str:
    """Write ``data`` as ``<directory>/adapter_config.json`` (created if needed), through
    the one writer (:class:`peftcore.save_dir.SaveDirectory`); its path."""
    from peftcore.save_dir import SaveDirectory

    directory = os.fspath(directory)
    if os.path.isfile(directory):
        raise ConfigError(f"{directory!r} is a file; save_pretrained needs a directory")
    text = json.dumps(data, indent=2, sort_keys=True)
    with SaveDirectory.open(directory) as folder:
        folder.write_files([(None, CONFIG_FILE, text.encode("utf-8"))])
    return os.path.join(directory, CONFIG_FILE)


def read_config_dict(path: str) -> dict[str, Any]:
    """The JSON object in config file ``path``, read bounded and strictly."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    try:
        raw = read_bounded(path, MAX_CONFIG_BYTES, "adapter config")
        data = strict_json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ConfigError(f"{path}: not a readable JSON config: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a JSON object, got {type(data).__name__}")
    return data


def config_dict_in(location: str, subfolder: Optional[str] = None) -> dict[str, Any]:
    """The config saved in local directory ``location`` (``subfolder`` of it if given)."""
    directory = os.path.join(os.fspath(location), subfolder) if subfolder else os.fspath(location)
    if not os.path.isdir(directory):
        raise ConfigError(
            f"{directory!r} is not a local directory; peftcore reads configs from disk only and never "
            "downloads (fetch the adapter first, e.g. with huggingface_hub.snapshot_download)"
        )
    return read_config_dict(os.path.join(directory, CONFIG_FILE))
