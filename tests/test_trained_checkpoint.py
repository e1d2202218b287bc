"""The trained demo checkpoint (assets/sdar-stdlib-10m): format, loading, tokenizer, quality, training code."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
CKPT = REPO / "assets" / "sdar-stdlib-10m"
sys.path.insert(0, str(REPO))

from tools import blockdiff_data as data  # noqa: E402
from tools import train_blockdiff as train  # noqa: E402
from vllm_s2d2.configs import load_family_info  # noqa: E402
from vllm_s2d2.core import masks  # noqa: E402
from vllm_s2d2.core.params import SamplingSpec  # noqa: E402
from vllm_s2d2.reference import generate  # noqa: E402
from vllm_s2d2.reference.models import ReferenceModel, load_safetensors_dir, qwen_hf_config  # noqa: E402
from vllm_s2d2.s2d2_config import S2D2Config  # noqa: E402
from vllm_s2d2.testing.checkpoints import expected_tensor_shapes  # noqa: E402

# Mean AR-mode NLL (nats / token) of held-out source under the model.  A uniform guess costs ln(8192) = 9.01
# and the untrained (N(0, 0.02)) model 9.02 on the text below; the checkpoint measures 2.93 on the training
# run's held-out windows and 3.13 on the 12 prompt continuations used below (fp32, deterministic).
HELDOUT_NLL_BOUND = 3.5


def _read(name: str):
    with open(CKPT / name, encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def model():
    return ReferenceModel.load(str(CKPT))


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from vllm_s2d2 import register

    register()
    return AutoTokenizer.from_pretrained(str(CKPT))


@pytest.fixture(scope="module")
def prompts():
    return data.read_jsonl(CKPT / "heldout_prompts.jsonl")


# -- format ---------------------------------------------------------------------------------------------------
def test_checkpoint_files_and_config():
    cfg = _read("config.json")
    assert cfg["architectures"] == ["SDARForCausalLM"] and cfg["model_type"] == "sdar"
    assert cfg["block_size"] == 4 and cfg["mask_token_id"] == 8191 and cfg["eos_token_id"] == 8190
    assert cfg["tie_word_embeddings"] is False and cfg["torch_dtype"] == "bfloat16"
    index = _read("model.safetensors.index.json")
    shards = sorted(set(index["weight_map"].values()))
    assert shards == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    sizes = [os.path.getsize(CKPT / s) for s in shards]
    assert max(sizes) <= 16 * 2**20
    total = sum(p.stat().st_size for p in CKPT.iterdir() if p.is_file())
    assert total <= 24e6, f"assets/sdar-stdlib-10m is {total / 1e6:.1f} MB (limit 24 MB)"
    # real SDAR weight names and shapes, bf16, untied head
    sd = load_safetensors_dir(str(CKPT))
    want = expected_tensor_shapes(cfg)
    assert {k: tuple(v.shape) for k, v in sd.items()} == want
    assert "lm_head.weight" in sd and all(v.dtype == torch.bfloat16 for v in sd.values())
    assert 8e6 <= sum(v.numel() for v in sd.values()) <= 12e6
    assert _read("generation_config.json")["eos_token_id"] == [8190]


def test_loads_with_family_info_and_hf_config():
    from transformers import AutoConfig

    from vllm_s2d2 import register
    from vllm_s2d2.configs import SDARConfig

    info = load_family_info(CKPT)
    assert (info.family, info.block_size, info.mask_token_id, info.stop_token_ids, info.vocab_size) == (
        "sdar", 4, 8191, (8190,), 8192)
    assert not info.shifted
    register()
    hf = AutoConfig.from_pretrained(str(CKPT))
    assert isinstance(hf, SDARConfig) and hf.block_size == 4 and hf.mask_token_id == 8191


def test_reference_model_loads(model):
    assert model.family == "sdar" and model.vocab_size == 8192


# -- tokenizer ------------------------------------------------------------------------------------------------
def test_tokenizer_special_tokens_and_roundtrip(tok, prompts):
    assert (tok.eos_token, tok.pad_token, tok.mask_token) == ("<|endoftext|>", "<|endoftext|>", "<|MASK|>")
    assert (tok.eos_token_id, tok.mask_token_id, len(tok)) == (8190, 8191, 8192)
    assert tok("x = 1<|MASK|>", add_special_tokens=False)["input_ids"][-1] == 8191
    texts = [p["prompt"] + p["target"] for p in prompts[:20]]
    texts += ["\tdef f(x):\r\n    return 'Grüße, 東京 🐍' + x  # tabs, CRLF, unicode\n", "", "   "]
    for t in texts:
        ids = tok(t, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == t
        assert 8191 not in ids
    # the tokenizer compresses code (byte-level would be ~1 char / token)
    code = "".join(texts[:20])
    assert len(code) / len(tok(code, add_special_tokens=False)["input_ids"]) > 2.5


# -- quality --------------------------------------------------------------------------------------------------
def _ar_nll(model, prompt_ids, cont_ids, mask_id):
    """AR-mode NLL of ``cont_ids`` after ``prompt_ids``: the 2L verifier layout over the whole text."""
    ids = torch.tensor(prompt_ids + cont_ids)
    n, p = len(ids), len(prompt_ids)
    logits = model.logits(torch.cat([ids, torch.full((n,), mask_id)]), torch.arange(n).repeat(2),
                          masks.verifier_2l(0, n), rows=torch.arange(n + p, 2 * n))
    return -torch.log_softmax(logits, -1)[torch.arange(n - p), ids[p:]]


def test_chat_template_is_the_plain_concatenation(tok):
    msgs = [{"role": "system", "content": "import os\n"}, {"role": "user", "content": "def f(path):\n"}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == "import os\ndef f(path):\n"


def test_heldout_ar_nll_far_below_random(model, tok, prompts):
    nll = []
    for p in prompts[:12]:
        pi = tok(p["prompt"], add_special_tokens=False)["input_ids"]
        ci = tok(p["target"], add_special_tokens=False)["input_ids"]
        nll.append(_ar_nll(model, pi, ci, 8191))
    mean = float(torch.cat(nll).mean())
    assert mean < HELDOUT_NLL_BOUND, f"held-out AR NLL {mean:.3f} nats/token (random: ln V = {math.log(8192):.2f})"


def test_training_run_record():
    log = _read("train_log.json")
    assert log["heldout"]["ar"] < HELDOUT_NLL_BOUND and log["best_valid"]["ar"] < HELDOUT_NLL_BOUND
    assert log["device_name"].startswith("NVIDIA") and log["train_seconds"] < 9 * 60
    # the held-out list is exactly what the split rule says
    mods = (CKPT / "heldout_modules.txt").read_text().split()
    assert mods and all(data.split_of(m) == "heldout" for m in mods)
    assert all(data.split_of(m) == "valid" for m in (CKPT / "valid_modules.txt").read_text().split())
    assert {p["module"] for p in data.read_jsonl(CKPT / "heldout_prompts.jsonl")} <= set(mods)
    assert len(data.read_jsonl(CKPT / "heldout_prompts.jsonl")) >= 200


def test_reference_decode_looks_like_python(model, tok, prompts):
    info = load_family_info(CKPT)
    ps = [tok(p["prompt"], add_special_tokens=False)["input_ids"] for p in prompts[:2]]
    outs = generate(model, info, ps, S2D2Config(block_size=1, denoising_steps=1, verify=False),
                    SamplingSpec(temperature=0.0, seed=0), max_tokens=24)
    keywords = ("return", "if ", "self", "def ", "for ", "raise", "import", "=", "(", "#")
    for o in outs:
        text = tok.decode(o.token_ids, skip_special_tokens=True)
        lines = [ln for ln in text.splitlines() if ln.strip()]
        assert lines and lines[0].startswith("    "), repr(text)  # the function body is indented
        assert any(k in text for k in keywords), repr(text)
        assert text.isascii() and 8191 not in o.token_ids
        assert o.stats.generated_tokens == len(o.token_ids) >= 8


# -- training code --------------------------------------------------------------------------------------------
def test_split_rule_is_fixed():
    # pinned: every machine / Python version must agree on the split
    assert data.split_of("json/encoder.py") == "heldout"
    assert data.split_of("rlcompleter.py") == "heldout"
    assert data.split_of("os.py") == "valid"
    assert data.split_of("typing.py") == "train"


def test_training_config_translation_matches_reference():
    cfg = _read("config.json")
    assert train.qwen3_config(cfg).to_dict() == qwen_hf_config(cfg).to_dict()


def test_training_layout_matches_reference_decoder(model):
    """The SDAR training input ([x_t | x_0], block-diff mask) computes exactly what the reference decoder's
    draft forward (AR-like committed KV) and 2L verifier compute: the objective trains what is decoded."""
    m = train.build_model(_read("config.json"), dropout=0.0)
    m.load_state_dict({k: v.float() for k, v in load_safetensors_dir(str(CKPT)).items()})
    m.eval()
    L, B, mask_id = 16, 4, 8191
    x0 = torch.randint(0, 8190, (1, L), generator=torch.Generator().manual_seed(0))
    xt = x0.clone()
    xt[0, [13, 15]] = mask_id
    with torch.no_grad():
        for blk, noisy in ((B, xt), (1, torch.full_like(x0, mask_id))):
            h = m.model(input_ids=torch.cat([noisy, x0], 1), position_ids=torch.arange(L).repeat(2)[None],
                        attention_mask=train.block_diff_mask(torch.tensor([blk]), torch.tensor([True]), L))
            got = m.lm_head(h.last_hidden_state[0, :L])
            if blk == B:  # last block: 12 committed tokens (token-causal KV) + the block's draft rows
                vis = torch.zeros(L, L, dtype=torch.bool)
                vis[:12, :12] = masks.committed_kv(12, B, True, 0)
                vis[12:] = masks.draft_rows(12, B)
                ref = model.logits(torch.cat([x0[0, :12], xt[0, 12:]]), torch.arange(L), vis,
                                   rows=torch.arange(12, L))
                got = got[12:]
            else:  # AR mode = the verifier's mask half
                ref = model.logits(torch.cat([x0[0], noisy[0]]), torch.arange(L).repeat(2),
                                   masks.verifier_2l(0, L), rows=torch.arange(L, 2 * L))
            torch.testing.assert_close(got, ref, atol=2e-4, rtol=1e-4)


def test_smoke_training_on_cpu(tmp_path):
    out = tmp_path / "smoke"
    assert train.main(["--smoke", "--device", "cpu", "--out", str(out), "--no-progress"]) == 0
    for name in ("config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
                 "tokenizer_config.json", "train_log.json", "heldout_prompts.jsonl", "heldout_modules.txt"):
        assert (out / name).is_file(), name
    log = json.loads((out / "train_log.json").read_text())
    assert log["steps"] == 10 and log["best_step"] is not None
    assert log["evals"][-1]["valid"]["mean"] < log["evals"][0]["valid"]["mean"]  # it learns something
    info = load_family_info(out)
    tok_json = json.loads((out / "tokenizer.json").read_text())
    mask_id = {t["content"]: t["id"] for t in tok_json["added_tokens"]}["<|MASK|>"]
    assert info.family == "sdar" and info.mask_token_id == mask_id
    m = ReferenceModel.load(str(out))
    o = generate(m, info, [[1, 2, 3]], S2D2Config(block_size=4, verify=False), SamplingSpec(temperature=0.0),
                 max_tokens=4)[0]
    assert len(o.token_ids) == 4


# -- the console script ---------------------------------------------------------------------------------------
def test_demo_cli_on_cpu(capsys):
    from vllm_s2d2.cli import main

    assert main(["demo", "--num-prompts", "1", "--max-tokens", "8", "--width", "120", "--backend", "reference"]) == 0
    out = capsys.readouterr().out
    for header in ("AR mode (block 1)", "threshold: B=4, dynamic 0.85", "S2D2: sdar-a (B=4)"):
        assert out.count(header) >= 2, header
    assert "reference decoder on CPU" in out and "tokens/forward" in out and "acceptance" in out
    assert main(["frobnicate"]) == 2


def test_demo_engine_columns_use_the_reference_accounting(capsys, monkeypatch):
    """The vLLM-engine columns (GPU only) are built by ``_engine_result`` from a request's S2D2 counters.  Here
    the engine is stood in for by the reference decoder's own counters, renamed as the engine names them: the
    engine columns must then print the reference's forwards, tokens/forward, verify rate and acceptance, and the
    footer must describe the engine's timing, not the CPU decoder's."""
    from vllm_s2d2 import cli
    from vllm_s2d2.engine.stats import derived

    runs = {}

    def fake_engine(model_path, prompts, cfg, max_tokens, temperature, seed):
        ref = cli._reference_decode(ReferenceModel.load(str(model_path)), load_family_info(str(model_path)),
                                    prompts, cfg, max_tokens, temperature, seed)
        runs[json.dumps(cfg, sort_keys=True)] = ref
        counters = [derived({"draft_steps": r["draft_forwards"], "verify_steps": r["verify_steps"],
                             "proposed_tokens": r["proposed_tokens"], "accepted_tokens": r["accepted_tokens"],
                             "committed_blocks": r["commit_forwards"]}) for r in ref]
        return [cli._engine_result(r["token_ids"], r["seconds"], c) for r, c in zip(ref, counters)]

    monkeypatch.setattr(cli, "_engine_available", lambda: (True, ""))
    monkeypatch.setattr(cli, "_vllm_decode", fake_engine)
    assert cli.main(["demo", "--num-prompts", "1", "--max-tokens", "8", "--width", "120"]) == 0
    out = capsys.readouterr().out
    assert out.count("vLLM engine (GPU)") == 3 and "vLLM engine tok/s" in out
    assert "Reference decoder tok/s" not in out
    for ref in runs.values():
        r = ref[0]
        assert f"forwards {r['forwards']}" in out and f"tok/fwd {r['tokens_per_forward']:.2f}" in out
    s2d2 = runs[json.dumps(cli.DEMO_CONFIGS["s2d2"][1], sort_keys=True)][0]
    assert s2d2["verify_steps"] > 0 and f"verify rate {s2d2['verify_rate']:.2f}" in out


def test_reference_cli_prints_text_ids_on_request_and_dash_rates(capsys):
    """``python -m vllm_s2d2.reference`` on a checkpoint with a tokenizer prints text, also for ``--prompt-ids``;
    ``--print-ids`` adds the ids; a rate with no denominator (acceptance when nothing was proposed) prints "-"."""
    from vllm_s2d2.reference.__main__ import main

    ar = json.dumps({"block_size": 1, "denoising_steps": 1, "verify": False})
    assert main(["--model", str(CKPT), "--prompt-ids", "1,2,3", "--max-tokens", "6", "--s2d2-config", ar]) == 0
    out = capsys.readouterr().out
    assert "acceptance -" in out and "acceptance 0.00" not in out and "ids: [" not in out
    body = out.splitlines()[1]  # the decoded text, not a list of ids
    assert not body.startswith("[") and not body.startswith("---")
    assert main(["--model", str(CKPT), "--prompt", "def f(x):", "--max-tokens", "6", "--print-ids"]) == 0
    out = capsys.readouterr().out
    assert "ids: [" in out and "acceptance " in out


def test_reference_cli_json_output_is_clean():
    """``--json``: stdout holds JSON lines only (vLLM's log lines, if anything imports vLLM, go to stderr), so it
    pipes into a JSON reader; rates without a denominator are null."""
    import subprocess

    ar = json.dumps({"block_size": 1, "denoising_steps": 1, "verify": False})
    proc = subprocess.run([sys.executable, "-m", "vllm_s2d2.reference", "--model", str(CKPT), "--prompt", "def f(x):",
                           "--prompt", "import os", "--max-tokens", "4", "--s2d2-config", ar, "--json"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(ln) for ln in proc.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == [0, 1]
    for r in rows:
        assert isinstance(r["text"], str) and len(r["token_ids"]) == 4
        assert r["stats"]["proposed_tokens"] == 0 and r["stats"]["acceptance_rate"] is None
