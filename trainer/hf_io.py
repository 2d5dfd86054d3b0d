"""Hugging Face Qwen2 checkpoints (config.json + safetensors, single file or sharded) -> our params.

`model_path` is a local folder or a hub id; a hub id goes through `huggingface_hub.snapshot_download`
(which serves from the local cache when offline, and fails fast with HF_HUB_OFFLINE=1 when not cached).
Tensors are read one at a time from memory-mapped files and, given shardings, placed straight onto the
mesh, so the host never holds more than one stacked tensor beyond what the devices hold.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from safetensors import safe_open

from trainer.model import Params, Qwen2Config, init_params
from trainer.sharding import partition_spec

# Our stacked layer leaf -> (HF name inside `model.layers.{i}.`, transpose). HF linears are [out, in].
_LAYER_TENSORS: dict[tuple[str, str], tuple[str, bool]] = {
    ("attn_norm", "scale"): ("input_layernorm.weight", False),
    ("q", "kernel"): ("self_attn.q_proj.weight", True),
    ("q", "bias"): ("self_attn.q_proj.bias", False),
    ("k", "kernel"): ("self_attn.k_proj.weight", True),
    ("k", "bias"): ("self_attn.k_proj.bias", False),
    ("v", "kernel"): ("self_attn.v_proj.weight", True),
    ("v", "bias"): ("self_attn.v_proj.bias", False),
    ("o", "kernel"): ("self_attn.o_proj.weight", True),
    ("mlp_norm", "scale"): ("post_attention_layernorm.weight", False),
    ("gate", "kernel"): ("mlp.gate_proj.weight", True),
    ("up", "kernel"): ("mlp.up_proj.weight", True),
    ("down", "kernel"): ("mlp.down_proj.weight", True),
}
_CHECKPOINT_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]


class CheckpointError(Exception):
    """A checkpoint cannot be found, fetched or read; `str(err)` is one line."""


OnBytes = Callable[[int, int], None]


def resolve_checkpoint(model_path: str, on_bytes: OnBytes | None = None) -> Path:
    """A local folder as is; otherwise a hub id fetched (or found in the cache) by huggingface_hub.

    `on_bytes(done, total)` hears the download's progress about once a second (trainer/progress.py)."""
    local = Path(model_path).expanduser()
    if local.is_dir():
        return local
    if local.is_absolute() or model_path.startswith((".", "~")) or model_path.count("/") != 1:
        raise CheckpointError(f"model_path {model_path!r}: no such folder (and not a hub id 'org/name')")
    from huggingface_hub import constants, snapshot_download

    try:
        with _download_progress(model_path, on_bytes):
            return Path(snapshot_download(model_path, allow_patterns=_CHECKPOINT_FILES))
    except Exception as err:  # the hub raises many types; all mean the same thing to the user
        if constants.HF_HUB_OFFLINE:
            reason = "not in the local Hugging Face cache and HF_HUB_OFFLINE=1"
        else:
            reason = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:160]}"
        raise CheckpointError(
            f"model_path {model_path!r}: cannot fetch it from the Hugging Face hub ({reason});"
            " pass a local folder when offline"
        ) from None


@contextmanager
def _download_progress(repo_id: str, on_bytes: OnBytes | None, every_s: float = 1.0) -> Iterator[None]:
    """Reports bytes in the hub cache's blob folder of `repo_id` (partial files included) against the
    size of the files `snapshot_download` fetches, from a side thread while the download runs. Silent
    when offline or when the hub does not say the sizes: the download itself decides success."""
    total = _download_size(repo_id) if on_bytes is not None else None
    if on_bytes is None or not total:
        yield
        return
    from huggingface_hub import constants

    blobs = Path(constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--")) / "blobs"
    stop = threading.Event()

    def done_bytes() -> int:
        return sum(f.stat().st_size for f in blobs.glob("*") if f.is_file()) if blobs.is_dir() else 0

    def watch() -> None:
        while not stop.wait(every_s):
            on_bytes(min(done_bytes(), total), total)

    thread = threading.Thread(target=watch, daemon=True, name="grpoctl-download")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
    on_bytes(min(done_bytes(), total), total)


def _download_size(repo_id: str) -> int | None:
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        return None
    try:
        info = HfApi().model_info(repo_id, files_metadata=True)
    except Exception:  # any hub trouble: no byte counts, and snapshot_download reports the real error
        return None
    wanted = [s for s in info.siblings or [] if any(fnmatch(s.rfilename, p) for p in _CHECKPOINT_FILES)]
    return sum(s.size or 0 for s in wanted) or None


def load_config(folder: str | Path) -> Qwen2Config:
    path = Path(folder) / "config.json"
    try:
        return Qwen2Config.from_hf(json.loads(path.read_text()))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing config.json") from None
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"{path}: unusable Qwen2 config: {err}") from None


def _tensor_files(folder: Path) -> dict[str, Path]:
    """HF tensor name -> the safetensors file that holds it."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(
            f"{folder}: no *.safetensors files (only safetensors checkpoints are supported)"
        )
    names: dict[str, Path] = {}
    for file in files:
        with safe_open(file, framework="np") as f:
            names.update({name: file for name in f.keys()})  # noqa: SIM118 (safe_open has no __iter__)
    return names


def _our_leaves(cfg: Qwen2Config) -> Iterator[tuple[tuple[str, ...], list[str], bool]]:
    """(our path, HF names to stack, transpose) for every leaf of `init_params(cfg)`."""
    yield ("embed", "embedding"), ["model.embed_tokens.weight"], False
    for (module, leaf), (hf_name, transpose) in _LAYER_TENSORS.items():
        names = [f"model.layers.{i}.{hf_name}" for i in range(cfg.num_layers)]
        yield ("layers", module, leaf), names, transpose
    yield ("final_norm", "scale"), ["model.norm.weight"], False
    if not cfg.tie_word_embeddings:
        yield ("lm_head", "kernel"), ["lm_head.weight"], False


def _leaf(tree: Params, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def load_params(
    folder: str | Path,
    cfg: Qwen2Config,
    *,
    param_dtype: Any = jnp.float32,
    shardings: Callable[[tuple[str, ...], tuple[int, ...]], jax.sharding.Sharding] | None = None,
) -> Params:
    """Reads every tensor our model needs; `shardings(path, shape)` places each leaf (default: device 0)."""
    folder = Path(folder)
    files = _tensor_files(folder)
    expected = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    params: Params = {}
    with ExitStack() as stack:
        handles: dict[Path, Any] = {}

        def read(name: str, transpose: bool) -> np.ndarray:
            if name not in files:
                raise CheckpointError(f"{folder}: tensor {name!r} missing from the checkpoint")
            file = files[name]
            if file not in handles:
                handles[file] = stack.enter_context(safe_open(file, framework="np"))
            array = handles[file].get_tensor(name)
            return array.T if transpose else array

        for path, names, transpose in _our_leaves(cfg):
            parts = [read(name, transpose) for name in names]
            host = (np.stack(parts) if path[0] == "layers" else parts[0]).astype(param_dtype)
            want = _leaf(expected, path).shape
            if host.shape != want:
                raise CheckpointError(
                    f"{folder}: {'/'.join(path)} has shape {host.shape}, config.json implies {want}"
                )
            if shardings is None:
                leaf = jnp.asarray(host)
            else:
                sharding = shardings(path, host.shape)
                leaf = jax.make_array_from_callback(host.shape, sharding, lambda idx, h=host: h[idx])
            node = params
            for key in path[:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = leaf
    return params


def load_model(
    model_path: str,
    *,
    param_dtype: Any = jnp.float32,
    mesh: jax.sharding.Mesh | None = None,
    on_bytes: OnBytes | None = None,
) -> tuple[Qwen2Config, Params]:
    """model_path (folder or hub id) -> (config, params), sharded by trainer.sharding's rules on `mesh`."""
    folder = resolve_checkpoint(model_path, on_bytes)
    cfg = load_config(folder)
    shardings = None
    if mesh is not None:

        def shardings(path: tuple[str, ...], shape: tuple[int, ...]) -> jax.sharding.Sharding:
            return NamedSharding(mesh, partition_spec(path, shape, mesh))

    return cfg, load_params(folder, cfg, param_dtype=param_dtype, shardings=shardings)
