"""``python -m vllm_s2d2.reference --model PATH --prompt TEXT [--s2d2-config JSON]``: decode and print stats."""

from __future__ import annotations

import argparse
import json
import sys
import time

from vllm_s2d2.core.params import SamplingSpec
from vllm_s2d2.s2d2_config import S2D2Config


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vllm_s2d2.reference", description=__doc__)
    ap.add_argument("--model", required=True, help="local checkpoint directory")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
    src.add_argument("--prompt-ids", action="append", help="comma-separated token ids (repeatable)")
    ap.add_argument("--chat", action="store_true", help="wrap text prompts in the tokenizer's chat template")
    ap.add_argument("--s2d2-config", default=None, help='JSON object of S2D2 options, e.g. \'{"preset": "sdar-b"}\'')
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ignore-eos", action="store_true")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    args = ap.parse_args(argv)

    import torch

    from vllm_s2d2.configs import load_family_info, register_hf_configs
    from vllm_s2d2.reference.decoder import generate
    from vllm_s2d2.reference.models import ReferenceModel

    register_hf_configs()  # the checkpoint's config classes for AutoTokenizer; the reference needs nothing else
    try:
        cfg = S2D2Config.from_json(args.s2d2_config)
        info = load_family_info(args.model)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tok = None
    if args.prompt:
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(args.model)
        except Exception as e:  # noqa: BLE001 - any loader failure means: no usable tokenizer
            print(f"error: no tokenizer in {args.model} ({e}); use --prompt-ids", file=sys.stderr)
            return 2
        texts = args.prompt
        if args.chat:
            texts = [tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                             add_generation_prompt=True) for t in texts]
        prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    else:
        prompts = [[int(x) for x in s.split(",") if x.strip()] for s in args.prompt_ids]
    model = ReferenceModel.load(args.model, dtype=getattr(torch, args.dtype))
    sampling = SamplingSpec(args.temperature, args.top_k, args.top_p, args.seed)
    t0 = time.perf_counter()
    try:
        outs = generate(model, info, prompts, cfg, sampling, max_tokens=args.max_tokens,
                        ignore_eos=args.ignore_eos)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    secs = time.perf_counter() - t0
    for i, o in enumerate(outs):
        text = tok.decode(o.token_ids, skip_special_tokens=True) if tok is not None else None
        stats = o.stats.as_dict()
        if args.json:
            print(json.dumps({"prompt": i, "text": text, "token_ids": o.token_ids,
                              "finish_reason": o.finish_reason, "stats": stats}))
            continue
        print(f"=== prompt {i} ({len(o.prompt_token_ids)} tokens) finish={o.finish_reason}")
        print(text if text is not None else o.token_ids)
        print(f"--- tokens {stats['generated_tokens']}  forwards {stats['forwards']} "
              f"(prefill {stats['prefill_forwards']}, draft {stats['draft_forwards']}, "
              f"verify {stats['verify_forwards']}, commit {stats['commit_forwards']})  "
              f"tokens/forward {stats['tokens_per_forward']:.2f}")
        print(f"--- steps {stats['steps']}  verify steps {stats['verify_steps']}  "
              f"proposed {stats['proposed_tokens']}  accepted {stats['accepted_tokens']}  "
              f"acceptance {stats['acceptance_rate']:.2f}")
    if not args.json:
        print(f"--- {sum(len(o.token_ids) for o in outs)} tokens in {secs:.2f}s on CPU (reference decoder)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
