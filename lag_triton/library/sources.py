"""Where adapters come from: local PEFT folders, or Hugging Face Hub paths.

A source that is a ``str``, no existing local path, not rooted at ``.``, ``/`` or ``~``, and reads
``user/repo[/subfolder...]`` with a valid repo id and no ``.``/``..`` parts is a Hub path, as PEFT's
``create_arrow_model`` takes it. Each repo is fetched once, whatever number of its subfolders are
asked for: one ``snapshot_download`` of just the adapter files of those subfolders, into the Hub
cache (``HF_HUB_OFFLINE``, ``HF_TOKEN`` and the cache settings apply as for PEFT); several repos
are fetched on a few threads, since each mostly waits on the network. A ``pathlib.Path`` is
always local.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from .peft_reader import ADAPTER_FILES, AdapterError

FETCH_THREADS = 8


def hub_path(source: str | os.PathLike) -> tuple[str, str] | None:
    """(repo id, subfolder or "") when ``source`` is a Hub path (module docstring), else None."""
    if not isinstance(source, str) or source.startswith((".", "/", "~")) or Path(source).exists():
        return None
    parts = source.strip("/").split("/")
    if len(parts) < 2 or any(part in ("", ".", "..") for part in parts):
        return None  # a local path that is missing: PeftAdapter.open says so
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    repo_id = "/".join(parts[:2])
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return None
    return repo_id, "/".join(parts[2:])


def _fetch(repo_id: str, subfolders: list[str]) -> Path:
    from huggingface_hub import snapshot_download

    patterns = [f"{sub}/{name}" if sub else name for sub in sorted(set(subfolders)) for name in ADAPTER_FILES]
    return Path(snapshot_download(repo_id, allow_patterns=patterns))


def adapter_folders(sources: list[str | os.PathLike]) -> list[Path]:
    """The local folder of every source, in order; Hub paths fetched (one snapshot per repo).
    Raises :class:`AdapterError` naming the first source, in order, that could not be fetched."""
    hub = [hub_path(source) for source in sources]
    subfolders: dict[str, list[str]] = {}
    for where in filter(None, hub):
        subfolders.setdefault(where[0], []).append(where[1])
    snapshots: dict[str, Future] = {}
    if subfolders:
        with ThreadPoolExecutor(min(FETCH_THREADS, len(subfolders))) as pool:
            snapshots = {repo: pool.submit(_fetch, repo, subs) for repo, subs in subfolders.items()}
    folders = []
    for source, where in zip(sources, hub):
        if where is None:
            folders.append(Path(source))
            continue
        repo_id, subfolder = where
        try:
            snapshot = snapshots[repo_id].result()
        except Exception as e:  # not found, offline and not cached, no access, network: the same to the user
            place = f"repo {repo_id!r}" + (f", subfolder {subfolder!r}" if subfolder else "")
            raise AdapterError(
                f"adapter {source!r}: no such local folder, and fetching it from the Hugging Face Hub ({place}) "
                f"failed: {type(e).__name__}: {e}"
            ) from None
        folder = snapshot / subfolder if subfolder else snapshot
        if not (folder / ADAPTER_FILES[0]).is_file():
            inside = f"{subfolder}/" if subfolder else ""
            raise AdapterError(
                f"adapter {source!r}: the Hugging Face Hub repo {repo_id!r} has no {inside}{ADAPTER_FILES[0]}"
            )
        folders.append(folder)
    return folders


def default_adapter_name(source: str | os.PathLike, folder: Path) -> str:
    """An adapter's name unless one is given: the folder's name, or the Hub path as written (a
    snapshot's folder is named by its commit)."""
    if hub_path(source) is not None:  # fetched into a snapshot folder, or not fetched yet
        return source.strip("/")
    if folder.name in ("", ".."):  # "." or ".." name no folder: the one they lead to does
        return folder.resolve().name or str(folder.resolve())
    return folder.name


def input_overwritten(output: str | os.PathLike, sources) -> str | None:
    """The local adapter file (config or weights) among ``sources`` (adapter folders, or Hub paths:
    not local, never compared) that ``output`` is, else None; None too while ``output`` is missing."""
    if not os.path.isfile(output):
        return None
    for source in [sources] if isinstance(sources, (str, os.PathLike)) else sources:
        if not isinstance(source, (str, os.PathLike)) or not os.path.isdir(source):
            continue
        for name in ADAPTER_FILES:
            file = Path(source) / name
            try:
                if os.path.samefile(file, output):
                    return str(file)
            except OSError:  # the folder has no such file
                continue
    return None


def refuse_overwriting_inputs(output: str | os.PathLike, sources, what: str = "adapter") -> None:
    """Raise ValueError when writing ``output`` would replace a file of one of the adapters ``sources``."""
    hit = input_overwritten(output, sources)
    if hit is not None:
        raise ValueError(f"output {str(output)!r} is {what} file {hit!r}: writing it would overwrite an input")
