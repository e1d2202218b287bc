"""``python -m vllm_s2d2.reference --model PATH --prompt TEXT [--s2d2-config JSON]``: decode on the CPU, print
the text and the decoding statistics.

Output: per prompt the generated text (the checkpoint's tokenizer decodes it; ``--print-ids`` adds the token ids,
which are printed instead when the checkpoint has no tokenizer) and the counters; a rate without a denominator
(acceptance when nothing was proposed) prints as ``-`` (``null`` with ``--json``, one JSON object per prompt on
stdout, nothing else there).

Bad input ends with exit code 2 and one line on stderr naming the argument, the value and what is allowed: the
arguments are checked first, then the checkpoint's config (family, token ids against its vocabulary, block size and
prompt + new tokens against its ``max_position_embeddings``), before the tokenizer and the weights load.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from vllm_s2d2.log import ArgumentParser, UsageError, float_arg, int_arg, int_list_arg, logs_off_stdout, usage_error
from vllm_s2d2.s2d2_config import S2D2Config

PROG = "python -m vllm_s2d2.reference"
# Files any transformers tokenizer of a local checkpoint starts from (fast, sentencepiece, BPE vocab, tiktoken).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "tiktoken.model")


def build_parser() -> ArgumentParser:
    ap = ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="local checkpoint directory (config.json, safetensors weights)")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="prompt text (repeat for a batch); needs a tokenizer")
    src.add_argument("--prompt-ids", action="append", type=int_list_arg(0, what="token ids"), metavar="IDS",
                     help="comma-separated token ids, e.g. 1,2,3 (repeatable; for checkpoints without a tokenizer)")
    ap.add_argument("--chat", action="store_true", help="wrap text prompts in the tokenizer's chat template")
    ap.add_argument("--s2d2-config", default=None, help='JSON object of S2D2 options, e.g. \'{"preset": "sdar-b"}\'')
    ap.add_argument("--max-tokens", type=int_arg(1), default=64, help="new tokens per prompt (>= 1)")
    ap.add_argument("--temperature", type=float_arg(0, note="0 = greedy"), default=0.0, help="0 = greedy")
    ap.add_argument("--top-k", type=int_arg(0, note="0 = off"), default=0, help="0 = off")
    ap.add_argument("--top-p", type=float_arg(0, 1, lo_open=True, note="1 = off"), default=1.0, help="1 = off")
    ap.add_argument("--seed", type=int_arg(-2**63, 2**63 - 1), default=0)
    ap.add_argument("--ignore-eos", action="store_true")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--json", action="store_true", help="print one JSON object per prompt (and nothing else on stdout)")
    ap.add_argument("--print-ids", action="store_true", help="also print the generated token ids")
    return ap


def main(argv: list[str] | None = None) -> int:
    logs_off_stdout()
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except UsageError as e:
        return usage_error(PROG, e)


def _checkpoint(model: str):
    """The checkpoint's :class:`~vllm_s2d2.configs.FamilyInfo` and raw ``config.json``, or a :class:`UsageError`."""
    from vllm_s2d2.configs import load_family_info

    path = Path(model)
    if not path.is_dir():
        raise UsageError(f"argument --model: {model!r} is not a directory (a local checkpoint directory with "
                         f"config.json is expected)")
    try:
        info = load_family_info(path)
        with open(path / "config.json", encoding="utf-8") as f:
            raw = json.load(f)
    except (ValueError, OSError) as e:
        where = "" if model in str(e) else f"{model!r}: "
        raise UsageError(f"argument --model: {where}{e}") from None
    return info, raw


def _tokenizer(model: str, needed_by: str | None):
    """The checkpoint's tokenizer; ``None`` when it has none and nothing needs it (``needed_by`` None)."""
    path = Path(model)
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        if needed_by:
            raise UsageError(f"argument {needed_by}: {model!r} has no tokenizer (none of "
                             f"{', '.join(TOKENIZER_FILES)}); pass token ids with --prompt-ids")
        return None
    from transformers import AutoTokenizer

    from vllm_s2d2.configs import register_hf_configs

    register_hf_configs()  # the checkpoint's config classes for AutoTokenizer's config lookup
    try:
        return AutoTokenizer.from_pretrained(model)
    except Exception as e:  # noqa: BLE001 - any loader failure: the tokenizer files are unusable
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if needed_by:
            raise UsageError(f"argument {needed_by}: the tokenizer of {model!r} does not load ({first}); "
                             f"pass token ids with --prompt-ids") from None
        print(f"{PROG}: note: the tokenizer of {model!r} does not load ({first}); printing token ids",
              file=sys.stderr)
        return None


def _check_positions(args, raw: dict, cfg: S2D2Config, prompts: list[list[int]]) -> None:
    """Block size and prompt + new tokens against the checkpoint's ``max_position_embeddings`` (when it has one)."""
    limit = raw.get("max_position_embeddings")
    if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
        return
    if cfg.block_size > limit:
        raise UsageError(f"argument --s2d2-config: block_size={cfg.block_size} exceeds the checkpoint's "
                         f"max_position_embeddings={limit}; use a block size <= {limit}")
    arg = "--prompt" if args.prompt else "--prompt-ids"
    for i, p in enumerate(prompts):
        if len(p) >= limit:
            raise UsageError(f"argument {arg}: prompt {i} has {len(p)} tokens; the checkpoint has "
                             f"max_position_embeddings={limit} positions for prompt + new tokens")
        if len(p) + args.max_tokens > limit:
            raise UsageError(f"argument --max-tokens: {args.max_tokens} new tokens after prompt {i} ({len(p)} tokens) "
                             f"exceed the checkpoint's max_position_embeddings={limit}; use --max-tokens <= "
                             f"{limit - len(p)}")


def _run(args) -> int:
    if args.chat and args.prompt_ids:
        raise UsageError("argument --chat: applies to --prompt text, not to --prompt-ids")
    try:
        cfg = S2D2Config.from_json(args.s2d2_config)
    except ValueError as e:
        raise UsageError(f"argument --s2d2-config: {e}") from None

    info, raw = _checkpoint(args.model)  # imports transformers' config classes (and torch)
    try:
        resolved = cfg.resolve(info.family, info.block_size)
    except ValueError as e:
        raise UsageError(f"argument --s2d2-config: {e} (checkpoint: {info.family}, block size "
                         f"{info.block_size})") from None
    V = info.vocab_size
    if args.prompt_ids:
        for ids in args.prompt_ids:
            bad = [t for t in ids if t >= V]
            if bad:
                raise UsageError(f"argument --prompt-ids: token id {bad[0]} is outside the vocabulary of "
                                 f"{args.model!r}: ids must lie in [0, {V})")
    tok = _tokenizer(args.model, "--prompt" if args.prompt else None)
    if args.prompt:
        texts = args.prompt
        if args.chat:
            try:
                texts = [tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                                 add_generation_prompt=True) for t in texts]
            except Exception as e:  # noqa: BLE001 - e.g. no chat template
                raise UsageError(f"argument --chat: the tokenizer of {args.model!r} cannot apply a chat template "
                                 f"({(str(e).strip().splitlines() or [type(e).__name__])[0]})") from None
        prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        arg = "--prompt"
    else:
        prompts = args.prompt_ids
        arg = "--prompt-ids"
    for i, p in enumerate(prompts):
        if not p:
            raise UsageError(f"argument {arg}: prompt {i} ({texts[i]!r}) has no tokens; at least one is needed")
        if info.mask_token_id in p:
            raise UsageError(f"argument {arg}: prompt {i} contains the mask token id {info.mask_token_id} "
                             f"(mask_token_id of the checkpoint); a prompt must not contain it")
    _check_positions(args, raw, resolved, prompts)

    import torch

    from vllm_s2d2.core.params import SamplingSpec
    from vllm_s2d2.reference.decoder import generate
    from vllm_s2d2.reference.models import ReferenceModel

    model = ReferenceModel.load(args.model, dtype=getattr(torch, args.dtype))
    sampling = SamplingSpec(args.temperature, args.top_k, args.top_p, args.seed)
    t0 = time.perf_counter()
    try:
        outs = generate(model, info, prompts, cfg, sampling, max_tokens=args.max_tokens, ignore_eos=args.ignore_eos)
    except ValueError as e:
        raise UsageError(str(e)) from None
    secs = time.perf_counter() - t0
    for i, o in enumerate(outs):
        text = tok.decode(o.token_ids, skip_special_tokens=True) if tok is not None else None
        stats = o.stats.as_dict()
        # rates without a denominator: no value (the decoder's as_dict divides by max(1, ...))
        if not stats["proposed_tokens"]:
            stats["acceptance_rate"] = None
        if not stats["steps"]:
            stats["verify_rate"] = None
        if args.json:
            print(json.dumps({"prompt": i, "text": text, "token_ids": o.token_ids,
                              "finish_reason": o.finish_reason, "stats": stats}))
            continue
        print(f"=== prompt {i} ({len(o.prompt_token_ids)} tokens) finish={o.finish_reason}")
        if text is not None:
            print(text)
        if text is None or args.print_ids:
            print(f"ids: {o.token_ids}")
        print(f"--- tokens {stats['generated_tokens']}  forwards {stats['forwards']} "
              f"(prefill {stats['prefill_forwards']}, draft {stats['draft_forwards']}, "
              f"verify {stats['verify_forwards']}, commit {stats['commit_forwards']})  "
              f"tokens/forward {stats['tokens_per_forward']:.2f}")
        print(f"--- steps {stats['steps']}  verify steps {stats['verify_steps']}  "
              f"proposed {stats['proposed_tokens']}  accepted {stats['accepted_tokens']}  "
              f"acceptance {_rate(stats['acceptance_rate'])}")
    if not args.json:
        print(f"--- {sum(len(o.token_ids) for o in outs)} tokens in {secs:.2f}s on CPU (reference decoder)")
    return 0


def _rate(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


if __name__ == "__main__":
    sys.exit(main())
