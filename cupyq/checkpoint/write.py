"""Writing a checkpoint directory as one transaction: :func:`write_directory`.

The safetensors files (one, or shards and their index) and the config files are written into a staging folder
on the target's filesystem and moved into place once all are written. An overwrite moves the old checkpoint's
files aside first and deletes them only when every new file is in place; on any failure the old files are put
back. The savers of :mod:`cupyq.checkpoint.save` check every argument and tensor before they call it.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

from cupyq.checkpoint.config import QUANT_CONFIG_FILES
from cupyq.checkpoint.safetensors_io import INDEX_FILE, _shards, _write_safetensors
from cupyq.formats.common import is_int, require_bool

__all__ = ["write_directory"]


def _json_texts(configs):
    """``{file name: JSON text}`` of the config files; raises naming ``config`` when one cannot be encoded
    (NaN and infinities included: they are not JSON)."""
    texts = {}
    for fname, content in configs.items():
        try:
            texts[fname] = json.dumps(content, indent=2, allow_nan=False) + "\n"
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"config: cannot be written as JSON to {fname} ({exc})") from exc
    return texts


def _reader_files(directory):
    """The files of ``directory`` :func:`open_checkpoint` reads: ``*.safetensors``, the shard index and
    the quantization config files, weights first."""
    weights = sorted(directory.glob("*.safetensors"))
    others = [directory / n for n in (INDEX_FILE, *QUANT_CONFIG_FILES) if os.path.lexists(directory / n)]
    return weights + [p for p in others if p not in weights]


def _write_files(folder, tensors, texts, shard_bytes):
    """Write the safetensors files (one, or shards of at most ``shard_bytes`` plus the index) and the
    config texts into ``folder``; returns the names written."""
    if shard_bytes is None:
        _write_safetensors(folder / "model.safetensors", tensors)
        names = ["model.safetensors"]
    else:
        shards = _shards(tensors, int(shard_bytes))
        weight_map, names = {}, []
        for i, shard in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            _write_safetensors(folder / fname, {n: tensors[n] for n in shard})
            weight_map.update({n: fname for n in shard})
            names.append(fname)
        index = {"metadata": {"total_size": int(sum(a.nbytes for a in tensors.values()))}, "weight_map": weight_map}
        texts = {INDEX_FILE: json.dumps(index, indent=2) + "\n", **texts}
    for fname, text in texts.items():
        (folder / fname).write_text(text, encoding="utf-8")
    return names + list(texts)


def _swap_in(directory, staging, names, old):
    """Move the staged files ``names`` into ``directory``, replacing the files ``old``.

    The old files are moved aside (into a folder beside them, so every move is a rename on one
    filesystem), the new ones moved in, and only then are the old ones deleted. On any failure the new
    files are taken out again, the old ones put back and the exception re-raised.
    """
    aside = directory / f".{uuid.uuid4().hex[:12]}.old"
    aside.mkdir()
    moved_aside, moved_in = [], []
    try:
        for p in old:
            os.replace(p, aside / p.name)
            moved_aside.append(p.name)
        for name in names:
            os.replace(staging / name, directory / name)
            moved_in.append(name)
    except BaseException as exc:
        try:
            for name in moved_in:
                os.unlink(directory / name)
            for name in reversed(moved_aside):
                os.replace(aside / name, directory / name)
        except OSError as restore_exc:
            exc.add_note(f"{directory}: the previous files could not all be put back ({restore_exc}); they are in {aside}")
        else:
            shutil.rmtree(aside, ignore_errors=True)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def write_directory(directory, tensors, configs, shard_bytes, overwrite):
    """Write the safetensors files and ``configs`` (``{file name: JSON object}``) as checkpoint ``directory``.

    Everything is checked before anything is created. A new directory is written as a staging folder
    beside it and renamed into place; an existing one gets its staging folder inside it (the same
    filesystem as the final files, even when ``directory`` is a link to another disk or a mount point)
    and the files are swapped in by :func:`_swap_in`. An overwrite removes every file of the old
    checkpoint that the reader would read and the new one does not replace (other weights, the shard
    index, ``quantize_config.json`` / ``quant_config.json``), so none of them can shadow the new files.
    """
    directory = Path(directory)
    if shard_bytes is not None and (not is_int(shard_bytes) or shard_bytes <= 0):
        raise ValueError(f"shard_bytes: expected a positive integer, got {shard_bytes!r}")
    overwrite = require_bool("overwrite", overwrite)
    texts = _json_texts(configs)
    if os.path.lexists(directory) and not directory.is_dir():
        raise NotADirectoryError(f"{directory}: exists and is not a directory")
    old = _reader_files(directory) if directory.is_dir() else []
    # Without overwrite only a config.json may be there (a model config copied in first); it is replaced.
    blocking = [p for p in old if p.name != "config.json"]
    if blocking and not overwrite:
        raise FileExistsError(f"{directory}: already holds {blocking[0].name}; pass overwrite=True to replace")
    token = uuid.uuid4().hex[:12]  # short: the staging name must fit wherever the directory's name does
    if directory.is_dir():
        staging = directory / f".{token}.partial"
        staging.mkdir()
        try:
            names = _write_files(staging, tensors, texts, shard_bytes)
            _swap_in(directory, staging, names, old)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return directory
    created = [p for p in directory.parents if not p.exists()]
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = directory.parent / f".{token}.partial"
    try:
        staging.mkdir()  # default permissions, as the directory itself gets when it is new
        _write_files(staging, tensors, texts, shard_bytes)
        staging.rename(directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for p in created:  # deepest first; only the folders this call made, and only while empty
            try:
                p.rmdir()
            except OSError:
                break
        raise
    return directory
