"""Merge a D2F LoRA adapter into its Dream / LLaDA base checkpoint (``vllm-s2d2 merge-d2f-lora``).

The adapter is PEFT's format: ``adapter_config.json`` (``r``, ``lora_alpha``, ``use_rslora``) and
``adapter_model.safetensors`` with ``base_model.model.<module>.lora_A.weight`` ``[r, in]`` and ``lora_B.weight``
``[out, r]``.  Each target weight becomes ``W + scale * B @ A`` (``scale = lora_alpha / r``, or
``lora_alpha / sqrt(r)`` with rsLoRA), summed in fp32 and cast back to W's dtype.  Every other file of the base
is copied; ``config.json`` gets the D2F marker ``"d2f": {"block_size": N}`` that :func:`vllm_s2d2.configs.family_info`
requires (plain Dream / LLaDA are full-attention models).  Standard library + torch + safetensors only.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any

__all__ = ["D2F_ARCHITECTURES", "MARKER_KEY", "lora_scale", "read_lora_adapter", "merge_d2f_lora"]

D2F_ARCHITECTURES = ("DreamModel", "LLaDAModelLM")
MARKER_KEY = "d2f"
_ADAPTER_KEY = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])(?:\.default)?\.weight$")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} not found")
    with open(path, encoding="utf-8") as f:
        obj = json.load(f)
    if not isinstance(obj, dict):
        raise ValueError(f"{str(path)!r} must hold a JSON object")
    return obj


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def _check_dir(path: Path, what: str) -> None:
    if not path.exists():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    if not path.is_dir():
        raise NotADirectoryError(f"{what} {str(path)!r} is not a directory")


def _check_base_config(cfg: dict, path: Path) -> None:
    archs = cfg.get("architectures") or []
    if not any(a in D2F_ARCHITECTURES for a in archs):
        raise ValueError(f"{str(path)!r}: `architectures` {archs} is not a D2F base ({', '.join(D2F_ARCHITECTURES)})")
    if MARKER_KEY in cfg:
        raise ValueError(f"{str(path)!r} already has the `{MARKER_KEY}` marker: the LoRA is merged already")


def lora_scale(adapter_config: dict) -> float:
    """``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA); per-module rank or alpha patterns are refused."""
    r, alpha = adapter_config.get("r"), adapter_config.get("lora_alpha")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"adapter_config.json: `r` must be an integer >= 1, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise ValueError(f"adapter_config.json: `lora_alpha` must be a number, got {alpha!r}")
    if adapter_config.get("rank_pattern") or adapter_config.get("alpha_pattern"):
        raise ValueError("adapter_config.json: per-module `rank_pattern` / `alpha_pattern` are not supported")
    if adapter_config.get("fan_in_fan_out"):
        raise ValueError("adapter_config.json: `fan_in_fan_out` adapters are not supported")
    return alpha / (math.sqrt(r) if adapter_config.get("use_rslora") else r)


def read_lora_adapter(adapter_dir: str | os.PathLike) -> tuple[float, dict[str, tuple[Any, Any]]]:
    """``(scale, {module: (A, B)})`` of a PEFT LoRA adapter directory."""
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    _check_dir(adapter_dir, "adapter directory")
    scale = lora_scale(_read_json(adapter_dir / "adapter_config.json"))
    weights_path = adapter_dir / "adapter_model.safetensors"
    if not weights_path.is_file():
        raise FileNotFoundError(f"{str(weights_path)!r} not found (only safetensors adapters are supported)")
    halves: dict[str, dict[str, Any]] = {}
    for key, tensor in load_file(str(weights_path)).items():
        match = _ADAPTER_KEY.match(key)
        if match is None:
            raise ValueError(f"adapter tensor {key!r} is not a LoRA A/B weight (base_model.model.<module>.lora_A.weight)")
        halves.setdefault(match.group(1), {})[match.group(2)] = tensor
    pairs = {}
    for module, ab in sorted(halves.items()):
        if set(ab) != {"A", "B"}:
            raise ValueError(f"adapter module {module!r} has lora_{''.join(sorted(ab))} only (both A and B needed)")
        pairs[module] = (ab["A"], ab["B"])
    if not pairs:
        raise ValueError(f"{str(weights_path)!r} holds no LoRA weights")
    return scale, pairs


def _base_shards(base_dir: Path) -> list[str]:
    index = base_dir / "model.safetensors.index.json"
    if index.is_file():
        return sorted(set(_read_json(index)["weight_map"].values()))
    shards = sorted(p.name for p in base_dir.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"no *.safetensors weights in {str(base_dir)!r}")
    return shards


def _weight_shapes(base_dir: Path, shards: list[str]) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    shapes = {}
    for shard in shards:
        with safe_open(str(base_dir / shard), framework="pt") as f:
            shapes.update({name: tuple(f.get_slice(name).get_shape()) for name in f.keys()})
    return shapes


def _check_pairs_fit(pairs: dict, shapes: dict[str, tuple[int, ...]]) -> None:
    """Every adapter module has a base weight of shape ``[B.rows, A.cols]`` (checked before writing anything)."""
    missing = sorted(m for m in pairs if f"{m}.weight" not in shapes)
    if missing:
        raise ValueError(f"adapter modules without a base weight `<module>.weight`: {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}")
    for module, (a, b) in pairs.items():
        weight_shape = shapes[f"{module}.weight"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] or weight_shape != (b.shape[0], a.shape[1]):
            raise ValueError(f"LoRA of {module!r}: B {tuple(b.shape)} @ A {tuple(a.shape)} does not fit the "
                             f"weight {weight_shape}")


def _merge_shard(src: Path, dst: Path, pairs: dict, scale: float) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as f:
        metadata = f.metadata() or {"format": "pt"}
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    for name, weight in tensors.items():
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module in pairs:
            a, b = pairs[module]
            tensors[name] = (weight.float() + scale * (b.float() @ a.float())).to(weight.dtype).contiguous()
    save_file(tensors, str(dst), metadata=metadata)


def merge_d2f_lora(base_dir: str | os.PathLike, adapter_dir: str | os.PathLike, out_dir: str | os.PathLike,
                   block_size: int = 32) -> Path:
    """Write ``base + LoRA`` with the D2F marker into ``out_dir`` (created; must differ from ``base_dir``)."""
    base, out = Path(base_dir), Path(out_dir)
    _check_dir(base, "base checkpoint directory")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be an integer >= 1, got {block_size!r}")
    config = _read_json(base / "config.json")
    _check_base_config(config, base)
    scale, pairs = read_lora_adapter(adapter_dir)
    if out.resolve() == base.resolve():
        raise ValueError("the output directory must differ from the base checkpoint directory")
    shards = _base_shards(base)
    _check_pairs_fit(pairs, _weight_shapes(base, shards))
    out.mkdir(parents=True, exist_ok=True)
    for shard in shards:
        _merge_shard(base / shard, out / shard, pairs, scale)
    for path in base.iterdir():
        if path.is_file() and path.name not in shards and path.name != "config.json":
            shutil.copyfile(path, out / path.name)
    config[MARKER_KEY] = {"block_size": block_size, "lora_scale": scale, "adapter": Path(adapter_dir).name}
    _write_json(out / "config.json", config)
    return out
