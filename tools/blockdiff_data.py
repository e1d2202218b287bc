"""The Python-stdlib corpus of the trained demo checkpoint: file list, the train / valid / held-out split,
the byte-level BPE tokenizer and the held-out code prompts.

The split is a fixed function of a module's path relative to the stdlib root (``json/decoder.py``), so every
machine and every Python version puts a module in the same split::

    bucket = int(sha256("vllm-s2d2-stdlib-split-v1:" + relpath).hexdigest()[:8], 16) % 100
    heldout: bucket < 10      valid: 10 <= bucket < 14      train: otherwise

``heldout`` modules are never trained on (prompts, tests, benchmark); ``valid`` modules are never trained on
either and only pick the checkpoint (early stopping on their loss).

Usage (stand-alone)::

    python tools/blockdiff_data.py stats                      # corpus and split sizes of this interpreter
    python tools/blockdiff_data.py prompts --out P.jsonl      # held-out prompts of this interpreter's stdlib
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import io
import json
import random
import sys
import sysconfig
import tokenize
from pathlib import Path

SPLIT_SALT = "vllm-s2d2-stdlib-split-v1:"
HELDOUT_PCT = 10
VALID_PCT = 4
EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
# Generated data, not code: pydoc's topic dump (~0.7 MB of prose in one dict).
EXCLUDED_FILES = {"pydoc_data/topics.py"}

EOS_TOKEN = "<|endoftext|>"
MASK_TOKEN = "<|MASK|>"
SPECIAL_TOKENS = (EOS_TOKEN, MASK_TOKEN)
# Qwen's pre-tokenization regex (the one transformers' Qwen2Tokenizer uses): digits one by one, runs of
# newlines (with the whitespace before them) kept together, indentation split off the following word.
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


# -- corpus -------------------------------------------------------------------------------------------------
def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def split_of(relpath: str) -> str:
    """``"heldout"``, ``"valid"`` or ``"train"`` for a module path relative to the stdlib root (posix)."""
    bucket = int(hashlib.sha256((SPLIT_SALT + relpath).encode("utf-8")).hexdigest()[:8], 16) % 100
    if bucket < HELDOUT_PCT:
        return "heldout"
    if bucket < HELDOUT_PCT + VALID_PCT:
        return "valid"
    return "train"


def is_generated(text: str) -> bool:
    """Character-map codec tables written by ``gencodec.py`` (encodings/cp*.py & co.): data, not code."""
    return "gencodec.py" in text[:2000]


def read_source(path: Path) -> str | None:
    """The file's text (PEP 263 encoding cookie honoured), or None if it cannot be decoded."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
        enc, _ = tokenize.detect_encoding(io.BytesIO(raw).readline)
        return raw.decode(enc)
    except (SyntaxError, UnicodeDecodeError, LookupError, OSError):
        return None


def list_modules(root: Path | None = None) -> list[str]:
    """Sorted posix paths (relative to ``root``) of the stdlib's ``*.py`` files, without test packages,
    site-packages and :data:`EXCLUDED_FILES`."""
    root = Path(root or stdlib_root())
    out = []
    for p in root.rglob("*.py"):
        rel = p.relative_to(root)
        if any(part in EXCLUDED_DIRS for part in rel.parts[:-1]):
            continue
        relpath = rel.as_posix()
        if relpath in EXCLUDED_FILES:
            continue
        out.append(relpath)
    return sorted(out)


def load_corpus(root: Path | None = None, limit_per_split: int | None = None) -> dict[str, list[tuple[str, str]]]:
    """``{split: [(relpath, text), ...]}`` (generated tables and undecodable files dropped)."""
    root = Path(root or stdlib_root())
    out: dict[str, list[tuple[str, str]]] = {"train": [], "valid": [], "heldout": []}
    for rel in list_modules(root):
        split = split_of(rel)
        if limit_per_split is not None and len(out[split]) >= limit_per_split:
            continue
        text = read_source(root / rel)
        if text is None or not text.strip() or is_generated(text):
            continue
        out[split].append((rel, text))
    return out


# -- tokenizer ----------------------------------------------------------------------------------------------
def train_tokenizer(texts, vocab_size: int = 8192, min_frequency: int = 2):
    """A byte-level BPE (``tokenizers``) with ``vocab_size - 2`` learned tokens followed by the special tokens
    ``<|endoftext|>`` and ``<|MASK|>`` (so they take the two last ids when the corpus is large enough)."""
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers, processors, trainers
    from tokenizers.models import BPE

    tok = Tokenizer(BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        min_frequency=min_frequency,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def save_hf_tokenizer(tok, out_dir: Path, model_max_length: int = 2048) -> dict[str, int]:
    """Write ``tokenizer.json`` + ``tokenizer_config.json`` (AutoTokenizer / vLLM loadable); returns the
    special ids."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": False,
        "add_eos_token": False,
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "mask_token": MASK_TOKEN,
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "added_tokens_decoder": {
            str(ids[t]): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                          "single_word": False, "special": True}
            for t in SPECIAL_TOKENS
        },
    }
    with open(out_dir / "tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
    return ids


# -- held-out prompts ---------------------------------------------------------------------------------------
def _function_prompts(relpath: str, text: str, max_prompt_chars: int, target_lines: int) -> list[dict]:
    """Prompts of one module: every (async) function whose body starts with a docstring and continues.

    prompt = the ``def`` line(s) through the docstring's last line, dedented to column 0, plus ``"\\n"``;
    target = the next ``target_lines`` source lines of the function (same dedent)."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    lines = text.splitlines()
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        body = node.body
        if len(body) < 2 or ast.get_docstring(node, clean=False) is None:
            continue
        doc = body[0]
        start, doc_end, fn_end = node.lineno - 1, doc.end_lineno, node.end_lineno
        if doc_end is None or fn_end is None or doc_end >= fn_end:
            continue
        indent = node.col_offset
        src = lines[start:fn_end]
        if any(ln.strip() and (len(ln) - len(ln.lstrip(" ")) < indent or "\t" in ln[:indent]) for ln in src):
            continue  # lines shallower than the def (odd continuation lines): skip rather than mangle
        ded = [ln[indent:] for ln in src]
        head_n = doc_end - start
        prompt = "\n".join(ded[:head_n]) + "\n"
        target = ded[head_n:head_n + target_lines]
        if len(prompt) > max_prompt_chars or not any(t.strip() for t in target):
            continue
        out.append({"module": relpath, "function": node.name, "lineno": node.lineno,
                    "prompt": prompt, "target": "\n".join(target) + "\n"})
    return out


def heldout_prompts(modules: list[tuple[str, str]], *, max_prompts: int = 400, max_per_module: int = 30,
                    max_prompt_chars: int = 1200, target_lines: int = 8, seed: int = 0) -> list[dict]:
    """Up to ``max_prompts`` prompts from ``modules`` (``[(relpath, text)]``): at most ``max_per_module`` per
    module (a seeded choice), then a seeded shuffle; deterministic for the same inputs."""
    rng = random.Random(seed)
    pool = []
    for rel, text in sorted(modules):
        ps = sorted(_function_prompts(rel, text, max_prompt_chars, target_lines), key=lambda p: p["lineno"])
        if len(ps) > max_per_module:
            ps = sorted(rng.sample(ps, max_per_module), key=lambda p: p["lineno"])
        pool.extend(ps)
    rng.shuffle(pool)
    return pool[:max_prompts]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("stats", help="corpus and split sizes of this interpreter's stdlib")
    pp = sub.add_parser("prompts", help="write the held-out prompts of this interpreter's stdlib")
    pp.add_argument("--out", required=True)
    pp.add_argument("--max-prompts", type=int, default=400)
    args = ap.parse_args(argv)
    corpus = load_corpus()
    if args.cmd == "stats":
        print(f"stdlib {stdlib_root()} (Python {sys.version.split()[0]})")
        for split, files in corpus.items():
            print(f"{split:8s} {len(files):5d} modules {sum(len(t) for _, t in files) / 1e6:7.2f} M chars")
        return 0
    rows = heldout_prompts(corpus["heldout"], max_prompts=args.max_prompts)
    write_jsonl(Path(args.out), rows)
    print(f"{len(rows)} prompts from {len({r['module'] for r in rows})} held-out modules -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
