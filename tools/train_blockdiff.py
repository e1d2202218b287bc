#!/usr/bin/env python3
"""Train a small SDAR-format block-diffusion model on the Python standard library, from scratch.

What it does (all seeded; ``--smoke`` shrinks everything to a CPU check of a few seconds):

1. **Corpus**: the ``*.py`` files of this interpreter's stdlib (``sysconfig.get_paths()["stdlib"]``) without
   test packages and site-packages, split by module with the fixed hash rule of
   :mod:`tools.blockdiff_data` into train / valid (early stopping only) / held-out (never seen).
2. **Tokenizer**: a byte-level BPE (``tokenizers``, Qwen pre-tokenization regex) trained on the train split,
   8190 learned tokens + ``<|endoftext|>`` (eos / pad / stop) + ``<|MASK|>`` (the mask token), saved in HF
   format (``tokenizer.json`` + ``tokenizer_config.json``).
3. **Model**: Qwen3 architecture with SDAR's config fields and weight names (``SDARForCausalLM``,
   ``model_type: sdar``, ``block_size``, ``mask_token_id``, untied ``lm_head``), built as transformers'
   ``Qwen3ForCausalLM`` with the SDPA attention and an explicit 4-D bool mask.
4. **Objective** (SDAR's training objective): the input is ``[x_t noisy | x_0 clean]`` (2L tokens) with the
   same position ids in both halves.  Noisy rows see their own block bidirectionally and the *clean* tokens
   of earlier blocks; clean rows are block-causal over the clean half.  One mask ratio t ~ U(0, 1] per
   sample; the loss is the cross entropy at masked noisy positions against the token at the same position
   (position-aligned logits), averaged over all masked tokens of the batch.  Per sample, the block size is
   drawn from {1, 4, 8, 16} (block 1 = AR mode; its samples mask every position) and, with probability
   ``--causal-clean-prob``, the clean half is token-causal instead of block-causal, so the model also fits
   the AR-like KV (``cache_ver``) that S2D2's paper configurations decode with.  Residual dropout on the
   attention / MLP outputs (not part of SDAR; the corpus is small).
5. **Schedule**: AdamW, linear warm-up then cosine decay to ``--min-lr-ratio``.  Without ``--steps`` the
   number of steps is calibrated after ~60 steps from the measured step time so that training ends within
   ``--max-minutes``; the log records it (rerun with ``--steps N`` to reproduce the same schedule).  bf16
   autocast on CUDA.  The checkpoint with the lowest validation loss (mean of AR / block-4 / block-16 losses)
   is saved; the held-out losses of that checkpoint are measured at the end.

Outputs in ``--out``: ``config.json``, ``generation_config.json``, ``model-0000k-of-0000n.safetensors`` (bf16,
each <= ``--max-shard-mib``) + ``model.safetensors.index.json``, ``tokenizer.json``, ``tokenizer_config.json``,
``train_log.json``, ``loss_curve.png``, ``heldout_modules.txt``, ``valid_modules.txt``,
``heldout_prompts.jsonl``.

    python tools/train_blockdiff.py --device cuda --out /tmp/ckpt            # ~8 minutes on one H100
    python tools/train_blockdiff.py --smoke --device cpu --out /tmp/smoke    # seconds, for tests
    python tools/train_blockdiff.py --plot-only /tmp/ckpt/train_log.json     # redraw the loss curve
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

_T0 = time.time()
_REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(_REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from tools import blockdiff_data as data  # noqa: E402

BLOCK_CHOICES = (1, 4, 8, 16)

FULL = dict(vocab_size=8192, hidden_size=256, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
            head_dim=64, intermediate_size=768, seq_len=512, batch_size=64, max_position_embeddings=2048,
            eval_every=250, eval_windows=64, files_per_split=None, warmup_steps=200)
SMOKE = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
             head_dim=32, intermediate_size=128, seq_len=64, batch_size=4, max_position_embeddings=512,
             eval_every=4, eval_windows=4, files_per_split=10, warmup_steps=2)


# -- config / checkpoint ------------------------------------------------------------------------------------
def sdar_config(arch: dict, vocab_size: int, eos_id: int, mask_id: int, block_size: int = 4) -> dict:
    """config.json of an SDAR dense checkpoint (the released SDAR fields, docs/families.md)."""
    import transformers

    return {
        "architectures": ["SDARForCausalLM"],
        "model_type": "sdar",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "pad_token_id": eos_id,
        "block_size": block_size,
        "mask_token_id": mask_id,
        "head_dim": arch["head_dim"],
        "hidden_act": "silu",
        "hidden_size": arch["hidden_size"],
        "initializer_range": 0.02,
        "intermediate_size": arch["intermediate_size"],
        "max_position_embeddings": arch["max_position_embeddings"],
        "max_window_layers": arch["num_hidden_layers"],
        "num_attention_heads": arch["num_attention_heads"],
        "num_hidden_layers": arch["num_hidden_layers"],
        "num_key_value_heads": arch["num_key_value_heads"],
        "rms_norm_eps": 1e-6,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": transformers.__version__,
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": vocab_size,
    }


def qwen3_config(cfg: dict):
    """transformers ``Qwen3Config`` of an SDAR dense config dict -- the translation of
    ``vllm_s2d2.reference.models.qwen_hf_config`` (a test checks they agree), repeated here so that training
    depends on transformers alone."""
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg["num_key_value_heads"], hidden_act=cfg["hidden_act"],
        max_position_embeddings=cfg["max_position_embeddings"], rms_norm_eps=cfg["rms_norm_eps"],
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg["rope_theta"])},
        tie_word_embeddings=False, use_sliding_window=False, attention_dropout=0.0, use_cache=False,
        head_dim=cfg["head_dim"], attention_bias=False, initializer_range=cfg.get("initializer_range", 0.02),
    )


def build_model(cfg: dict, dropout: float):
    """transformers Qwen3ForCausalLM (SDPA) for an SDAR config dict, freshly initialised (N(0, 0.02))."""
    from transformers import Qwen3ForCausalLM

    hf_cfg = qwen3_config(cfg)
    model = Qwen3ForCausalLM._from_config(hf_cfg, attn_implementation="sdpa", dtype=torch.float32)
    if dropout > 0:
        def drop(module, inputs, output):
            return F.dropout(output, dropout, module.training)

        for layer in model.model.layers:
            layer.self_attn.o_proj.register_forward_hook(drop)
            layer.mlp.down_proj.register_forward_hook(drop)
    return model


def save_checkpoint(state: dict[str, torch.Tensor], out: Path, max_shard_bytes: int) -> list[str]:
    """bf16 safetensors shards (HF names ``model-0000k-of-0000n.safetensors``) + ``model.safetensors.index.json``."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu", torch.bfloat16).contiguous() for k, v in sorted(state.items())}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    n_shards = max(1, math.ceil(total / max_shard_bytes))
    target = math.ceil(total / n_shards)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > target and len(shards) < n_shards:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    n = len(shards)
    weight_map, files = {}, []
    for i, shard in enumerate(shards):
        fn = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file(shard, str(out / fn), metadata={"format": "pt"})
        if os.path.getsize(out / fn) > max_shard_bytes:
            raise RuntimeError(f"{fn} is larger than {max_shard_bytes} bytes")
        files.append(fn)
        weight_map.update({k: fn for k in shard})
    with open(out / "model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        f.write("\n")
    return files


# -- batches ------------------------------------------------------------------------------------------------
def block_diff_mask(block: torch.Tensor, causal_clean: torch.Tensor, L: int) -> torch.Tensor:
    """``[n, 1, 2L, 2L]`` bool (True = attend) over ``[noisy x_t | clean x_0]``, blocks aligned to position 0.

    noisy q -> noisy k: same block; noisy q -> clean k: earlier blocks; clean q -> clean k: block-causal
    (token-causal where ``causal_clean``); clean q -> noisy k: never."""
    dev = block.device
    pos = torch.arange(L, device=dev)
    blk = pos[None, :] // block[:, None]  # [n, L]
    q, k = blk[:, :, None], blk[:, None, :]
    nn_ = q == k
    nc = k < q
    tok_causal = (pos[:, None] >= pos[None, :])[None]
    cc = torch.where(causal_clean[:, None, None], tok_causal, k <= q)
    top = torch.cat([nn_, nc], dim=2)
    bottom = torch.cat([torch.zeros_like(nn_), cc], dim=2)
    return torch.cat([top, bottom], dim=1)[:, None]


class Batcher:
    """Random windows of a token stream with SDAR noising; every random draw comes from a CPU generator."""

    def __init__(self, stream: torch.Tensor, L: int, mask_id: int, seed: int, block_probs: list[float],
                 causal_clean_prob: float):
        self.stream, self.L, self.mask_id = stream, L, mask_id
        self.gen = torch.Generator().manual_seed(seed)
        self.block_choices = torch.tensor(BLOCK_CHOICES)
        self.block_probs = torch.tensor(block_probs, dtype=torch.float)
        self.causal_clean_prob = causal_clean_prob

    def windows(self, n: int) -> torch.Tensor:
        starts = torch.randint(0, len(self.stream) - self.L, (n,), generator=self.gen)
        return self.stream[starts[:, None] + torch.arange(self.L)]

    def noise(self, x0: torch.Tensor, block: torch.Tensor, t: torch.Tensor, causal: torch.Tensor):
        n, L = x0.shape
        u = torch.rand(n, L, generator=self.gen)
        t = torch.where(block == 1, torch.ones_like(t), t)  # AR samples: every position is a query
        masked = u < t[:, None]
        masked[torch.arange(n), u.argmin(1)] = True  # at least one target per sample
        xt = torch.where(masked, torch.full_like(x0, self.mask_id), x0)
        return dict(x0=x0, xt=xt, masked=masked, block=block, causal=causal)

    def sample(self, n: int) -> dict:
        x0 = self.windows(n)
        block = self.block_choices[torch.multinomial(self.block_probs, n, replacement=True, generator=self.gen)]
        t = torch.rand(n, generator=self.gen).clamp_min(1e-3)
        causal = torch.rand(n, generator=self.gen) < self.causal_clean_prob
        return self.noise(x0, block, t, causal)


def eval_batches(stream: torch.Tensor, L: int, mask_id: int, windows: int, seed: int) -> dict[str, dict]:
    """Fixed evaluation sets: non-overlapping windows; AR (block 1), block 4 and block 16 at t = 0.5, with the
    token-causal clean half (the AR-like KV of S2D2's paper configs)."""
    n = min(windows, (len(stream) - 1) // L)
    if n < 1:
        raise ValueError(f"evaluation stream too short ({len(stream)} tokens) for windows of {L}")
    x0 = stream[: n * L].view(n, L)
    b = Batcher(stream, L, mask_id, seed, [1.0, 0, 0, 0], 1.0)
    out = {}
    for name, blk, t in (("ar", 1, 1.0), ("b4", 4, 0.5), ("b16", 16, 0.5)):
        out[name] = b.noise(x0, torch.full((n,), blk), torch.full((n,), t), torch.ones(n, dtype=torch.bool))
    return out


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def forward_loss(model, batch: dict, amp: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean CE over masked positions, per-target CE [M]) for a device batch."""
    x0, xt, masked = batch["x0"], batch["xt"], batch["masked"]
    n, L = x0.shape
    ids = torch.cat([xt, x0], dim=1)
    pos = torch.arange(L, device=x0.device).repeat(2)[None].expand(n, -1)
    mask = block_diff_mask(batch["block"], batch["causal"], L)
    with torch.autocast(x0.device.type, dtype=torch.bfloat16, enabled=amp):
        h = model.model(input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=False).last_hidden_state
        logits = model.lm_head(h[:, :L][masked])
    ce = F.cross_entropy(logits.float(), x0[masked], reduction="none")
    return ce.mean(), ce


@torch.no_grad()
def evaluate(model, sets: dict[str, dict], device, amp: bool, chunk: int) -> dict[str, float]:
    was = model.training
    model.eval()
    out = {}
    for name, full in sets.items():
        tot, cnt = 0.0, 0
        n = full["x0"].shape[0]
        for i in range(0, n, chunk):
            part = to_device({k: v[i:i + chunk] for k, v in full.items()}, device)
            _, ce = forward_loss(model, part, amp)
            tot += float(ce.sum())
            cnt += ce.numel()
        out[name] = tot / max(1, cnt)
    out["mean"] = sum(out[k] for k in ("ar", "b4", "b16")) / 3
    model.train(was)
    return out


# -- plotting -------------------------------------------------------------------------------------------------
def plot_log(log: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no loss curve (redraw later with --plot-only train_log.json)", flush=True)
        return False
    tr = log["train_curve"]
    ev = log["evals"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    ax = axes[0]
    if tr:
        steps = [r["step"] for r in tr]
        ax.plot(steps, [r["ar"] for r in tr], lw=1, alpha=0.8, label="train AR (block 1)")
        ax.plot(steps, [r["diff"] for r in tr], lw=1, alpha=0.8, label="train diffusion (blocks 4/8/16)")
    for key, style in (("ar", "o-"), ("b4", "s-"), ("b16", "^-")):
        ax.plot([e["step"] for e in ev], [e["valid"][key] for e in ev], style, ms=3, lw=1,
                label=f"valid {key}")
    if log.get("best_step") is not None:
        ax.axvline(log["best_step"], color="gray", ls=":", lw=1, label=f"saved (step {log['best_step']})")
    ax.set_xlabel("step")
    ax.set_ylabel("cross entropy (nats / masked token)")
    ax.set_title(f"SDAR block diffusion on the stdlib: {log.get('params', 0) / 1e6:.1f} M params")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax = axes[1]
    if tr:
        ax.plot([r["step"] for r in tr], [r["lr"] for r in tr])
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# -- main ---------------------------------------------------------------------------------------------------
def tokenize_split(tok, files: list[tuple[str, str]], eos_id: int) -> torch.Tensor:
    ids: list[int] = []
    for enc in tok.encode_batch([t for _, t in files]):
        ids.extend(enc.ids)
        ids.append(eos_id)
    return torch.tensor(ids, dtype=torch.long)


def lr_at(step: int, total: int, warmup: int, base: float, min_ratio: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="output checkpoint directory")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--smoke", action="store_true", help="tiny model, few files and steps (CPU test)")
    ap.add_argument("--max-minutes", type=float, default=8.0, help="wall-clock budget of the training loop")
    ap.add_argument("--deadline-minutes", type=float, default=None,
                    help="hard cap on the whole script's wall time (training stops early to save in time)")
    ap.add_argument("--steps", type=int, default=None, help="fixed number of steps (default: fit the budget)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--min-lr-ratio", type=float, default=0.1)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--block-probs", default="0.3,0.3,0.2,0.2", help="probabilities of blocks 1,4,8,16")
    ap.add_argument("--causal-clean-prob", type=float, default=0.5)
    ap.add_argument("--max-shard-mib", type=float, default=16.0)
    ap.add_argument("--stdlib", default=None, help="stdlib root (default: this interpreter's)")
    ap.add_argument("--plot-only", metavar="TRAIN_LOG", help="redraw loss_curve.png next to a train_log.json")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if not args.plot_only and not args.out:
        ap.error("--out is required")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.plot_only:
        p = Path(args.plot_only)
        ok = plot_log(json.loads(p.read_text()), p.parent / "loss_curve.png")
        return 0 if ok else 1
    hp = dict(SMOKE if args.smoke else FULL)
    if args.batch_size:
        hp["batch_size"] = args.batch_size
    if args.seq_len:
        hp["seq_len"] = args.seq_len
    block_probs = [float(x) for x in args.block_probs.split(",")]
    if len(block_probs) != len(BLOCK_CHOICES) or min(block_probs) < 0 or sum(block_probs) <= 0:
        raise SystemExit(f"--block-probs needs {len(BLOCK_CHOICES)} non-negative numbers")
    device = torch.device(args.device)
    amp = device.type == "cuda"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    log = {"args": vars(args), "hparams": hp, "python": sys.version.split()[0], "torch": torch.__version__,
           "platform": platform.platform(), "device_name": torch.cuda.get_device_name(device)
           if device.type == "cuda" else platform.processor() or "cpu", "train_curve": [], "evals": []}
    deadline = _T0 + args.deadline_minutes * 60 if args.deadline_minutes else float("inf")
    try:  # import (and build matplotlib's font cache) now, not after the training budget
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot  # noqa: F401
    except ImportError:
        pass

    # 1. corpus + split
    root = Path(args.stdlib) if args.stdlib else data.stdlib_root()
    corpus = data.load_corpus(root, limit_per_split=hp["files_per_split"])
    for split in ("heldout", "valid"):
        (out / f"{split}_modules.txt").write_text("".join(f"{r}\n" for r, _ in corpus[split]))
    log["corpus"] = {"stdlib": str(root), "split_rule": f"sha256('{data.SPLIT_SALT}' + relpath) % 100: "
                     f"< {data.HELDOUT_PCT} heldout, < {data.HELDOUT_PCT + data.VALID_PCT} valid, else train"}
    for split, files in corpus.items():
        log["corpus"][split] = {"modules": len(files), "chars": sum(len(t) for _, t in files)}
    print(f"[corpus] {root}: " + ", ".join(f"{s} {len(f)} modules" for s, f in corpus.items()), flush=True)

    # 2. tokenizer
    t = time.time()
    tok = data.train_tokenizer((text for _, text in corpus["train"]), vocab_size=hp["vocab_size"])
    special = data.save_hf_tokenizer(tok, out, model_max_length=hp["max_position_embeddings"])
    eos_id, mask_id = special[data.EOS_TOKEN], special[data.MASK_TOKEN]
    vocab_size = max(hp["vocab_size"], -(-tok.get_vocab_size() // 64) * 64)
    streams = {s: tokenize_split(tok, f, eos_id) for s, f in corpus.items() if f}
    for s, st in streams.items():
        log["corpus"][s]["tokens"] = len(st)
    print(f"[tokenizer] {tok.get_vocab_size()} tokens (eos {eos_id}, mask {mask_id}) in {time.time() - t:.1f}s; "
          + ", ".join(f"{s} {len(st) / 1e6:.2f} M tokens" for s, st in streams.items()), flush=True)

    # 3. held-out prompts (from the very files this run holds out)
    prompts = data.heldout_prompts(corpus["heldout"])
    data.write_jsonl(out / "heldout_prompts.jsonl", prompts)

    # 4. model
    cfg = sdar_config(hp, vocab_size, eos_id, mask_id)
    with open(out / "config.json", "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
    with open(out / "generation_config.json", "w") as f:
        json.dump({"bos_token_id": eos_id, "eos_token_id": [eos_id], "pad_token_id": eos_id,
                   "transformers_version": cfg["transformers_version"]}, f, indent=2)
        f.write("\n")
    model = build_model(cfg, args.dropout).to(device)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    log["params"] = n_params
    print(f"[model] {n_params / 1e6:.2f} M params ({n_params * 2 / 2**20:.1f} MiB bf16) on {device}", flush=True)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")

    # 5. train
    L, bs = hp["seq_len"], hp["batch_size"]
    batcher = Batcher(streams["train"], L, mask_id, args.seed, block_probs, args.causal_clean_prob)
    valid_sets = eval_batches(streams["valid"], L, mask_id, hp["eval_windows"], args.seed + 1)
    eval_chunk = max(1, bs // 2)
    total = args.steps or (10 if args.smoke else None)
    budget = args.max_minutes * 60
    loop_t0 = time.time()
    stop_at = min(loop_t0 + budget, deadline - 45)
    best = {"score": float("inf"), "state": None, "step": None, "valid": None}
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    pbar = None
    if tqdm is not None and not args.no_progress:
        pbar = tqdm(total=total, desc="train", mininterval=1.0 if sys.stderr.isatty() else 15.0, file=sys.stderr)
    acc = torch.zeros(4, device=device)  # ar sum, ar count, diff sum, diff count
    eval_time = 0.0
    calib = None
    step = 0
    stopped = "steps"

    def do_eval(step: int) -> None:
        nonlocal eval_time
        te = time.time()
        v = evaluate(model, valid_sets, device, amp, eval_chunk)
        eval_time = time.time() - te
        rec = {"step": step, "time_s": round(time.time() - loop_t0, 1), "valid": v}
        log["evals"].append(rec)
        if v["mean"] < best["score"]:
            best.update(score=v["mean"], step=step, valid=v,
                        state={k: p.detach().clone() for k, p in model.state_dict().items()})
        print(f"[eval] step {step}: valid ar {v['ar']:.3f} b4 {v['b4']:.3f} b16 {v['b16']:.3f} "
              f"(best step {best['step']}) {rec['time_s']:.0f}s", flush=True)

    do_eval(0)
    while True:
        if total is not None and step >= total:
            break
        if time.time() > stop_at:
            stopped = "time budget"
            break
        lr = lr_at(step, total or 10**9, hp["warmup_steps"], args.lr, args.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = lr
        batch = to_device(batcher.sample(bs), device)
        loss, ce = forward_loss(model, batch, amp)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            is_ar = (batch["block"] == 1)[:, None].expand_as(batch["masked"])[batch["masked"]]
            acc += torch.stack([ce[is_ar].sum(), is_ar.sum(), ce[~is_ar].sum(), (~is_ar).sum()]).float()
        step += 1
        if pbar is not None:
            pbar.update(1)
        if step % (5 if args.smoke else 25) == 0:
            a = acc.tolist()
            acc.zero_()
            rec = {"step": step, "lr": lr, "ar": a[0] / max(1, a[1]), "diff": a[2] / max(1, a[3])}
            log["train_curve"].append(rec)
            if pbar is not None:
                pbar.set_postfix(ar=f"{rec['ar']:.3f}", diff=f"{rec['diff']:.3f}", lr=f"{lr:.2e}", refresh=False)
        if total is None and step == 60:
            if device.type == "cuda":
                torch.cuda.synchronize()
            calib = time.time()
        if total is None and step == 110:
            if device.type == "cuda":
                torch.cuda.synchronize()
            per_step = (time.time() - calib) / 50
            per_step_all = per_step + eval_time / hp["eval_every"]
            total = step + int((stop_at - time.time()) / per_step_all)
            log["calibration"] = {"sec_per_step": per_step, "eval_sec": eval_time, "total_steps": total}
            print(f"[calibrate] {per_step * 1e3:.1f} ms/step, eval {eval_time:.1f}s -> {total} steps", flush=True)
            if pbar is not None:
                pbar.total = total
                pbar.refresh()
        if step % hp["eval_every"] == 0:
            do_eval(step)
    if pbar is not None:
        pbar.close()
    if not log["evals"] or log["evals"][-1]["step"] != step:
        do_eval(step)
    train_s = time.time() - loop_t0
    log.update(steps=step, planned_steps=total, stopped_by=stopped, train_seconds=round(train_s, 1),
               best_step=best["step"], best_valid=best["valid"], final_valid=log["evals"][-1]["valid"],
               tokens_seen=step * bs * L)
    print(f"[train] {step} steps in {train_s:.0f}s ({stopped}); saving step {best['step']}", flush=True)

    # 6. held-out losses of the saved state, then save
    model.load_state_dict(best["state"])
    if "heldout" in streams and len(streams["heldout"]) > L + 1:
        ho = eval_batches(streams["heldout"], L, mask_id, hp["eval_windows"], args.seed + 2)
        log["heldout"] = evaluate(model, ho, device, amp, eval_chunk)
        print(f"[heldout] ar {log['heldout']['ar']:.3f} b4 {log['heldout']['b4']:.3f} "
              f"b16 {log['heldout']['b16']:.3f} (nats/token)", flush=True)
    files = save_checkpoint(model.state_dict(), out, int(args.max_shard_mib * 2**20))
    log["shards"] = {fn: os.path.getsize(out / fn) for fn in files}
    log["total_seconds"] = round(time.time() - _T0, 1)
    with open(out / "train_log.json", "w") as f:
        json.dump(log, f, indent=1)
        f.write("\n")
    plot_log(log, out / "loss_curve.png")
    print(f"[done] {out} in {log['total_seconds']:.0f}s total", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
