"""``vllm-s2d2`` console script.

``vllm-s2d2 demo`` decodes a few held-out code prompts with the trained demo checkpoint
(``assets/sdar-stdlib-10m``: a 10.5 M-parameter SDAR-format block-diffusion model trained on the Python
standard library) and prints the text and the decoding statistics of AR mode, the confidence-threshold
block-diffusion baseline and S2D2 side by side.

Backend: the vLLM engine when ``vllm`` is importable *and* a CUDA GPU is present; otherwise (or if the engine
fails to start, with the reason) the eager reference decoder on the CPU.  The output says which backend produced
each column.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from vllm_s2d2.log import ArgumentParser, UsageError, float_arg, int_arg, logs_off_stdout, usage_error

DEMO_MODEL_ENV = "VLLM_S2D2_DEMO_MODEL"
DEMO_MODEL_NAME = "sdar-stdlib-10m"

# (label, S2D2Config dict) of the three columns
DEMO_CONFIGS: dict[str, tuple[str, dict]] = {
    "ar": ("AR mode (block 1)", {"block_size": 1, "denoising_steps": 1, "verify": False}),
    "threshold": ("threshold: B=4, dynamic 0.85", {"block_size": 4, "denoising_steps": 4, "verify": False,
                                                     "remasking": "low_confidence_dynamic",
                                                     "confidence_threshold": 0.85}),
    "s2d2": ("S2D2: sdar-a (B=4)", {"preset": "sdar-a"}),
    "threshold16": ("threshold: B=16, dynamic 0.85", {"block_size": 16, "denoising_steps": 16, "verify": False,
                                                       "remasking": "low_confidence_dynamic",
                                                       "confidence_threshold": 0.85}),
    "s2d2-16": ("S2D2: sdar-b (B=16)", {"preset": "sdar-b"}),
}
DEFAULT_COLUMNS = "ar,threshold,s2d2"


def default_model_path() -> Path | None:
    """``$VLLM_S2D2_DEMO_MODEL``, else ``assets/sdar-stdlib-10m`` of the source checkout this package lives in."""
    env = os.environ.get(DEMO_MODEL_ENV)
    if env:
        return Path(env)
    p = Path(__file__).resolve().parent.parent / "assets" / DEMO_MODEL_NAME
    return p if (p / "config.json").is_file() else None


# -- backends -----------------------------------------------------------------------------------------------
def _engine_available() -> tuple[bool, str]:
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return False, "vLLM is not installed"
    import torch

    if not torch.cuda.is_available():
        return False, "no CUDA GPU"
    return True, ""


def _reference_decode(model, info, prompts: list[list[int]], cfg_dict: dict, max_tokens: int, temperature: float,
                      seed: int) -> list[dict]:
    from vllm_s2d2.core.params import SamplingSpec
    from vllm_s2d2.reference import generate
    from vllm_s2d2.s2d2_config import S2D2Config

    cfg = S2D2Config.from_dict(cfg_dict)
    out = []
    for i, ids in enumerate(prompts):
        t0 = time.perf_counter()
        o = generate(model, info, [ids], cfg, SamplingSpec(temperature=temperature, seed=seed + i),
                     max_tokens=max_tokens)[0]
        out.append({"token_ids": o.token_ids, "seconds": time.perf_counter() - t0, **o.stats.as_dict()})
    return out


def _engine_result(token_ids, seconds: float, stats: dict) -> dict:
    """One engine request as a demo column entry, with its forwards in the reference decoder's accounting
    (:func:`~vllm_s2d2.reference.accounting.reference_forwards`) so that the engine and reference columns compare."""
    from vllm_s2d2.reference.accounting import reference_forwards

    fw = reference_forwards(stats)
    n, forwards = len(token_ids), sum(fw.values())
    return {"token_ids": list(token_ids), "seconds": seconds, "generated_tokens": n, "forwards": forwards,
            "commit_forwards": fw["commit"], "tokens_per_forward": n / max(1, forwards),
            "steps": stats["draft_steps"], "verify_steps": stats["verify_steps"],
            "proposed_tokens": stats["proposed_tokens"], "accepted_tokens": stats["accepted_tokens"],
            "verify_rate": stats["verify_rate"], "acceptance_rate": stats["acceptance_rate"]}


def _vllm_worker(model_path: str, cfg: dict, prompts: list, max_tokens: int, temperature: float, seed: int) -> list:
    """Runs in a subprocess: one engine for ``cfg`` (fp32 like the reference decoder, Triton in IEEE fp32);
    each request alone after one warm-up request, its counters from :func:`vllm_s2d2.request_stats`."""
    os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")
    from vllm import LLM, SamplingParams

    from vllm_s2d2 import request_stats

    llm = LLM(model=model_path, speculative_config={"method": "s2d2", **cfg}, dtype="float32", seed=seed,
              max_model_len=2048, gpu_memory_utilization=0.4)
    llm.generate([{"prompt_token_ids": list(prompts[0])}], SamplingParams(max_tokens=8), use_tqdm=False)
    request_stats(llm)  # drop the warm-up request's counters
    out = []
    for i, ids in enumerate(prompts):
        sp = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed + i)
        t0 = time.perf_counter()
        o = llm.generate([{"prompt_token_ids": list(ids)}], sp, use_tqdm=False)[0]
        seconds = time.perf_counter() - t0
        out.append(_engine_result(o.outputs[0].token_ids, seconds, request_stats(llm, [o.request_id])[o.request_id]))
    return out


def _vllm_decode(model_path: Path, prompts, cfg_dict: dict, max_tokens: int, temperature: float, seed: int):
    payload = json.dumps([str(model_path), cfg_dict, prompts, max_tokens, temperature, seed])
    code = ("import json,sys; from vllm_s2d2.cli import _vllm_worker; a = json.loads(sys.stdin.read()); "
            "print('DEMO_JSON=' + json.dumps(_vllm_worker(*a)))")
    proc = subprocess.run([sys.executable, "-c", code], input=payload, capture_output=True, text=True)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("DEMO_JSON=")]
    if not line:
        # the exception's last line (vLLM's log lines share stderr: logs_off_stdout)
        err = proc.stderr.strip().splitlines()
        exc = [ln for ln in err if re.match(r"^[\w.]+(Error|Exception)\b", ln)]
        raise RuntimeError((exc or err or ["engine failed"])[-1])
    return json.loads(line[-1][len("DEMO_JSON="):])


# -- printing -----------------------------------------------------------------------------------------------
def _wrap_lines(text: str, width: int, max_lines: int) -> list[str]:
    out: list[str] = []
    for ln in text.expandtabs(4).splitlines() or [""]:
        out.extend(textwrap.wrap(ln, width, drop_whitespace=False, replace_whitespace=False) or [""])
    if len(out) > max_lines:
        out = out[:max_lines - 1] + ["..."]
    return out


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _stats_lines(r: dict) -> list[str]:
    verify = r.get("verify_rate")
    acc = r.get("acceptance_rate") if r.get("proposed_tokens") else None
    fwd = r.get("forwards")
    fused = (r["generated_tokens"] / max(1, fwd - r["commit_forwards"])) if "commit_forwards" in r else None
    return [f"tokens {r['generated_tokens']}  forwards {_fmt(fwd, 'd')}",
            f"tok/fwd {_fmt(r.get('tokens_per_forward'), '.2f')} (fused {_fmt(fused, '.2f')})",
            f"verify rate {_fmt(verify, '.2f')}",
            f"accept {_fmt(acc, '.2f')}  tok/s {r['generated_tokens'] / max(1e-9, r['seconds']):.0f}"]


def _print_columns(headers: list[str], bodies: list[list[str]], width: int) -> None:
    sep = "+" + "+".join("-" * (width + 2) for _ in headers) + "+"
    print(sep)
    print("| " + " | ".join(h[:width].ljust(width) for h in headers) + " |")
    print(sep)
    rows = max(len(b) for b in bodies)
    for i in range(rows):
        print("| " + " | ".join((b[i] if i < len(b) else "").ljust(width) for b in bodies) + " |")
    print(sep)


def build_demo_parser() -> ArgumentParser:
    ap = ArgumentParser(prog="vllm-s2d2 demo", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help=f"checkpoint dir (default: ${DEMO_MODEL_ENV} or assets/"
                                                 f"{DEMO_MODEL_NAME} of the source checkout)")
    ap.add_argument("--num-prompts", type=int_arg(1), default=3, help="how many held-out prompts (>= 1)")
    ap.add_argument("--first-prompt", type=int_arg(0), default=0, help="index of the first held-out prompt (>= 0)")
    ap.add_argument("--max-tokens", type=int_arg(1), default=40, help="new tokens per prompt (>= 1)")
    ap.add_argument("--columns", default=DEFAULT_COLUMNS, help=f"comma-separated, from {list(DEMO_CONFIGS)}")
    ap.add_argument("--backend", choices=["auto", "reference", "vllm"], default="auto")
    ap.add_argument("--temperature", type=float_arg(0, note="0 = greedy"), default=0.0, help="0 = greedy")
    ap.add_argument("--seed", type=int_arg(-2**63, 2**63 - 1), default=0)
    ap.add_argument("--width", type=int_arg(1), default=None, help="terminal width (default: detected)")
    ap.add_argument("--threads", type=int_arg(0, note="0 = torch's default"), default=None,
                    help="torch CPU threads for the reference decoder (default 1; 0 = torch's default)")
    return ap


def _demo_columns(text: str) -> list[str]:
    cols = [c.strip() for c in text.split(",") if c.strip()]
    bad = [c for c in cols if c not in DEMO_CONFIGS]
    if bad or not cols:
        raise UsageError(f"argument --columns: unknown column(s) {bad or [text]}; choose from {list(DEMO_CONFIGS)}")
    twice = sorted({c for c in cols if cols.count(c) > 1})
    if twice:
        raise UsageError(f"argument --columns: {twice} listed twice; each column once, from {list(DEMO_CONFIGS)}")
    return cols


def _demo_checkpoint(args, cols: list[str]):
    """Family info, tokenizer and the chosen held-out prompts of the demo checkpoint; every defect a
    :class:`UsageError` naming the argument."""
    model_path = Path(args.model) if args.model else default_model_path()
    if model_path is None or not (model_path / "config.json").is_file():
        raise UsageError(f"argument --model: no demo checkpoint found (looked at "
                         f"{str(model_path or 'assets/' + DEMO_MODEL_NAME)!r}: no config.json); pass --model DIR or "
                         f"set ${DEMO_MODEL_ENV} (the checkpoint ships in the source repository under "
                         f"assets/{DEMO_MODEL_NAME})")
    prompt_file = model_path / "heldout_prompts.jsonl"
    if not prompt_file.is_file():
        raise UsageError(f"argument --model: {str(prompt_file)!r} is missing (the demo decodes the checkpoint's "
                         f"held-out prompts)")
    rows, n = [], 0
    try:
        with open(prompt_file, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                row = json.loads(line)
                if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in _PROMPT_KEYS):
                    raise ValueError(f"expected a JSON object with string fields {list(_PROMPT_KEYS)}")
                rows.append(row)
    except UnicodeDecodeError:
        raise UsageError(f"argument --model: {str(prompt_file)!r} is not a UTF-8 text file") from None
    except ValueError as e:  # JSON errors included
        raise UsageError(f"argument --model: {str(prompt_file)!r} line {n}: {e}") from None
    if not rows:
        raise UsageError(f"argument --model: {str(prompt_file)!r} holds no prompts")
    if args.first_prompt >= len(rows):
        raise UsageError(f"argument --first-prompt: {args.first_prompt} is past the last of the "
                         f"{len(rows)} held-out prompts; use 0..{len(rows) - 1}")
    if args.first_prompt + args.num_prompts > len(rows):
        raise UsageError(f"argument --num-prompts: {args.num_prompts} prompts from --first-prompt "
                         f"{args.first_prompt} run past the {len(rows)} held-out prompts; use --num-prompts <= "
                         f"{len(rows) - args.first_prompt}")
    from vllm_s2d2.configs import load_family_info, register_hf_configs  # transformers' config classes (+ torch)
    from vllm_s2d2.s2d2_config import S2D2Config

    try:
        info = load_family_info(model_path)
        with open(model_path / "config.json", encoding="utf-8") as f:
            limit = json.load(f).get("max_position_embeddings")
    except (ValueError, OSError) as e:
        where = "" if str(model_path) in str(e) else f"{str(model_path)!r}: "
        raise UsageError(f"argument --model: {where}{e}") from None
    for c in cols:
        try:
            S2D2Config.from_dict(DEMO_CONFIGS[c][1]).resolve(info.family, info.block_size)
        except ValueError as e:
            raise UsageError(f"argument --columns: column {c!r} does not apply to {str(model_path)!r} "
                             f"({info.family}): {e}") from None
    rows = rows[args.first_prompt:args.first_prompt + args.num_prompts]
    if not any((model_path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise UsageError(f"argument --model: {str(model_path)!r} has no tokenizer (tokenizer.json); the demo "
                         f"decodes text prompts")
    from transformers import AutoTokenizer

    register_hf_configs()  # the checkpoint's config class for AutoTokenizer's config lookup
    try:
        tok = AutoTokenizer.from_pretrained(str(model_path))
    except Exception as e:  # noqa: BLE001 - any loader failure: the tokenizer files are unusable
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UsageError(f"argument --model: the tokenizer of {str(model_path)!r} does not load ({first})") from None
    prompts = [tok(r["prompt"], add_special_tokens=False)["input_ids"] for r in rows]
    for i, p in enumerate(prompts):
        if not p or info.mask_token_id in p:
            raise UsageError(f"argument --first-prompt: held-out prompt {args.first_prompt + i} "
                             f"{'has no tokens' if not p else 'contains the mask token id %d' % info.mask_token_id}")
    if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
        longest = max(len(p) for p in prompts)
        if longest + args.max_tokens > limit:
            raise UsageError(f"argument --max-tokens: {args.max_tokens} new tokens after a {longest}-token prompt "
                             f"exceed the checkpoint's max_position_embeddings={limit}; use --max-tokens <= "
                             f"{max(1, limit - longest)}")
    return model_path, info, tok, rows, prompts


_PROMPT_KEYS = ("prompt", "target", "module", "function")


def demo(argv: list[str] | None = None) -> int:
    logs_off_stdout()
    args = build_demo_parser().parse_args(argv)
    try:
        cols = _demo_columns(args.columns)
        model_path, info, tok, rows, prompts = _demo_checkpoint(args, cols)
    except UsageError as e:
        return usage_error("vllm-s2d2 demo", e)
    engine_ok, why_not = _engine_available()
    if args.backend == "vllm" and not engine_ok:
        return usage_error("vllm-s2d2 demo", f"argument --backend: vllm: {why_not} (the engine needs vLLM and a "
                                             f"CUDA GPU; --backend reference runs on the CPU)")

    import torch

    from vllm_s2d2.reference.models import ReferenceModel

    use_engine = engine_ok and args.backend != "reference"
    n_params = None
    ref = None

    def reference():
        nonlocal ref, n_params
        if ref is None:
            ref = ReferenceModel.load(str(model_path))
            n_params = sum(p.numel() for p in ref.module.parameters())
        return ref

    # one intra-op thread by default: the 10 M-parameter model gains nothing from more, and on a busy machine torch's
    # extra threads spin (measured on 2 cores beside another job: 177 s with 2 threads, 14 s with 1)
    threads = 1 if args.threads is None else args.threads
    prev_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        results, backends = {}, {}
        for c in cols:
            label, cfg = DEMO_CONFIGS[c]
            if use_engine:
                try:
                    results[c] = _vllm_decode(model_path, prompts, cfg, args.max_tokens, args.temperature, args.seed)
                    backends[c] = "vLLM engine (GPU)"
                    continue
                except Exception as e:  # noqa: BLE001 - fall back, say why
                    backends[c] = f"reference decoder on CPU (engine failed: {str(e)[:80]})"
            else:
                backends[c] = f"reference decoder on CPU ({why_not or 'requested'})"
            results[c] = _reference_decode(reference(), info, prompts, cfg, args.max_tokens, args.temperature,
                                           args.seed)
    finally:
        torch.set_num_threads(prev_threads)  # main() may run inside another program (the tests)

    width = args.width or shutil.get_terminal_size((132, 40)).columns
    colw = max(24, (width - 1) // len(cols) - 3)
    size = f", {n_params / 1e6:.1f} M params" if n_params else ""
    print(f"vllm-s2d2 demo: {model_path} (SDAR, block {info.block_size}{size}); greedy"
          if args.temperature == 0 else f"vllm-s2d2 demo: {model_path}; temperature {args.temperature}")
    for c in cols:
        print(f"  {DEMO_CONFIGS[c][0]}: {backends[c]}")
    for i, r in enumerate(rows):
        print(f"\n=== prompt {args.first_prompt + i + 1}: {r['module']} :: {r['function']}() "
              f"(held out from training; {len(prompts[i])} tokens)")
        plines = r["prompt"].rstrip("\n").splitlines()
        shown = plines if len(plines) <= 8 else plines[:3] + ["    ..."] + plines[-4:]
        print("\n".join("  " + ln for ln in shown))
        bodies = []
        for c in cols:
            res = results[c][i]
            text = tok.decode(res["token_ids"], skip_special_tokens=True)
            bodies.append(_wrap_lines(text, colw, 12) + [""] + _stats_lines(res))
        _print_columns([DEMO_CONFIGS[c][0] for c in cols], bodies, colw)
        truth = [ln for ln in r["target"].splitlines() if ln.strip()][:3]
        print("  source continues: " + " | ".join(t.strip() for t in truth))
    print("\n=== totals over the prompts")
    for c in cols:
        rs = results[c]
        tokens = sum(x["generated_tokens"] for x in rs)
        fwd = sum(x["forwards"] for x in rs) if all("forwards" in x for x in rs) else None
        secs = sum(x["seconds"] for x in rs)
        prop = sum(x.get("proposed_tokens", 0) for x in rs)
        acc = sum(x.get("accepted_tokens", 0) for x in rs) / prop if prop else None
        steps = sum(x.get("steps", 0) for x in rs)
        vr = sum(x.get("verify_steps", 0) for x in rs) / steps if steps else None
        commits = sum(x.get("commit_forwards", 0) for x in rs)
        fused = tokens / (fwd - commits) if fwd and any("commit_forwards" in x for x in rs) else None
        print(f"  {DEMO_CONFIGS[c][0]:32s} tokens {tokens:4d}  forwards {_fmt(fwd, '4d')}  "
              f"tokens/forward {_fmt(tokens / fwd if fwd else None, '.2f')} (fused {_fmt(fused, '.2f')})  "
              f"verify rate {_fmt(vr, '.2f')}  "
              f"acceptance {_fmt(acc, '.2f')}  {tokens / max(1e-9, secs):5.0f} tok/s")
    print("  forwards: every forward counted (prefill, draft, verify, commit); fused: each block's commit forward "
          "merged into the\n  next block's first draft, as the vLLM engine's canvas does.")
    if any(b.startswith("reference") for b in backends.values()):
        print("  Reference decoder tok/s is CPU eager speed (no KV cache), not a benchmark.")
    if any(b.startswith("vLLM") for b in backends.values()):
        print("  vLLM engine tok/s: one request at a time on a 10 M-parameter model (launch-bound), not a benchmark "
              "(see benchmarks/).")
    return 0


# -- merge-d2f-lora ------------------------------------------------------------------------------------------
def build_merge_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="vllm-s2d2 merge-d2f-lora",
        description="Merge a D2F LoRA adapter (PEFT: adapter_config.json + adapter_model.safetensors) into its "
                    "Dream / LLaDA base checkpoint and mark the result as D2F (config.json gets "
                    "\"d2f\": {\"block_size\": N}); the plugin serves only marked checkpoints.")
    p.add_argument("base", help="base checkpoint directory (e.g. Dream-v0-Base-7B, LLaDA-8B-Instruct)")
    p.add_argument("adapter", help="D2F LoRA adapter directory")
    p.add_argument("out", help="output directory (created; must differ from BASE)")
    p.add_argument("--block-size", type=int_arg(1), default=32, help="decoding block size to record (default 32)")
    return p


def merge_d2f(argv: list[str] | None = None) -> int:
    prog = "vllm-s2d2 merge-d2f-lora"
    args = build_merge_parser().parse_args(argv)
    for label, path in (("base checkpoint", args.base), ("adapter", args.adapter)):
        if not Path(path).is_dir():
            return usage_error(prog, f"{label} directory {path!r} does not exist" if not Path(path).exists()
                               else f"{label} {path!r} is not a directory")
    from vllm_s2d2.d2f_merge import merge_d2f_lora

    try:
        out = merge_d2f_lora(args.base, args.adapter, args.out, block_size=args.block_size)
    except (OSError, ValueError) as e:
        return usage_error(prog, e)
    print(f"merged {args.adapter} into {args.base}: {out} (D2F, block size {args.block_size})")
    return 0


USAGE = ("usage: vllm-s2d2 COMMAND [options]   (vllm-s2d2 COMMAND --help)\n\n"
         "  demo   decode held-out code prompts with the trained demo checkpoint: AR mode, threshold baseline and "
         "S2D2 side by side\n"
         "  merge-d2f-lora BASE ADAPTER OUT [--block-size N]   merge a D2F LoRA into its Dream / LLaDA base\n\n"
         "  vllm-s2d2 --version   the plugin's version")


COMMANDS = "demo, merge-d2f-lora"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if argv and argv[0] == "--version":
        from vllm_s2d2 import __version__

        print(f"vllm-s2d2 {__version__}")
        return 0
    if not argv:
        return usage_error("vllm-s2d2", f"no command given; available: {COMMANDS} (see vllm-s2d2 --help)")
    if argv[0] == "demo":
        return demo(argv[1:])
    if argv[0] == "merge-d2f-lora":
        return merge_d2f(argv[1:])
    return usage_error("vllm-s2d2", f"unknown command {argv[0]!r}; available: {COMMANDS} (see vllm-s2d2 --help)")


if __name__ == "__main__":
    sys.exit(main())
