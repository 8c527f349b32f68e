"""Regenerate the golden fixtures of tests/test_hf.py with transformers + PyTorch.

For each family (GPT-2, Llama with GQA and llama3 rope_scaling, Qwen2, Qwen3; Llama with YaRN
rope scaling and q/k/v/o and MLP biases; Mistral with a sliding window shorter than the batch;
Phi-3 with fused projections, partial rotary and a sliding window; Gemma 2 and Gemma 3 with
local/global layers; Mixtral with 4 experts, top-2 routing and a sliding window)
this builds a tiny random model with ``transformers`` (seeded), saves it as safetensors under
``tests/fixtures/golden/<name>/`` and stores the reference float32 logits of a left-padded batch
in ``reference.npz`` (tokens, attention_mask, position_ids, logits). Position ids follow the
rlhf-jax convention ``max(cumsum(mask) - 1, 0)``, passed explicitly to the HF forward.

    python experiments/make_golden.py            # writes tests/fixtures/golden/
    python experiments/make_golden.py --out DIR
    python experiments/make_golden.py --only mistral llama_yarn   # just these (same seeds)
"""

from __future__ import annotations

import argparse
import os
import shutil

import numpy as np

HIDDEN, LAYERS, VOCAB, HEADS, KV_HEADS, HEAD_DIM, FFN, MAXPOS = 32, 2, 96, 4, 2, 8, 48, 64

# A left-padded batch: rows with 0, 3 and 6 padding slots (padding token id 0).
LENGTHS = (12, 9, 6)
T = 12


def configs():
    from transformers import (
        Gemma2Config,
        Gemma3TextConfig,
        GPT2Config,
        LlamaConfig,
        MistralConfig,
        MixtralConfig,
        Phi3Config,
        Qwen2Config,
        Qwen3Config,
    )

    llama_like = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        intermediate_size=FFN,
        max_position_embeddings=MAXPOS,
        rms_norm_eps=1e-6,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return {
        "gpt2": GPT2Config(
            vocab_size=VOCAB,
            n_embd=HIDDEN,
            n_layer=LAYERS,
            n_head=HEADS,
            n_positions=MAXPOS,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=1,
            eos_token_id=2,
        ),
        "llama": LlamaConfig(
            **llama_like,
            tie_word_embeddings=False,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        ),
        "qwen2": Qwen2Config(**llama_like, tie_word_embeddings=False),
        "qwen3": Qwen3Config(**llama_like, tie_word_embeddings=True, attention_bias=False),
        "llama_yarn": LlamaConfig(
            **llama_like,
            tie_word_embeddings=False,
            attention_bias=True,
            mlp_bias=True,
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        ),
        # a window of 5 < the 12 tokens of the batch: the mask matters
        "mistral": MistralConfig(**llama_like, tie_word_embeddings=False, sliding_window=5),
        # fused qkv_proj / gate_up_proj, RoPE on 3/4 of each head (Phi-4-mini), sliding window
        "phi3": Phi3Config(
            **{k: v for k, v in llama_like.items() if k != "head_dim"},
            tie_word_embeddings=False,
            sliding_window=7,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.75,
            },
        ),
        # soft-capped scores and logits, sandwich norms, sqrt(D) embeddings, GeGLU, local (window
        # 4) / global layers, query_pre_attn_scalar != head_dim
        "gemma2": Gemma2Config(
            **llama_like,
            tie_word_embeddings=True,
            sliding_window=4,
            query_pre_attn_scalar=12,
            attn_logit_softcapping=5.0,
            final_logit_softcapping=3.0,
            layer_types=["sliding_attention", "full_attention"],
        ),
        # + per-head q/k norms, its own RoPE base on the local layers, linear scaling on global
        "gemma3": Gemma3TextConfig(
            **llama_like,
            tie_word_embeddings=True,
            sliding_window=4,
            query_pre_attn_scalar=8,
            layer_types=["sliding_attention", "full_attention"],
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
            },
        ),
        # mixture of experts: 4 SwiGLU experts, each token routed to 2; a window of 6 < 12
        "mixtral": MixtralConfig(
            **llama_like,
            tie_word_embeddings=False,
            sliding_window=6,
            num_local_experts=4,
            num_experts_per_tok=2,
        ),
    }


def batch(seed: int = 0):
    rng = np.random.default_rng(seed)
    tokens = np.zeros((len(LENGTHS), T), np.int64)
    mask = np.zeros((len(LENGTHS), T), np.int64)
    for b, n in enumerate(LENGTHS):
        tokens[b, T - n :] = rng.integers(3, VOCAB, size=n)
        mask[b, T - n :] = 1
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
    return tokens, mask, positions


def make(name, config, out_dir, seed):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():  # random norms and biases, so that every parameter matters
        for pname, p in model.named_parameters():
            if pname.endswith(("norm.weight", "ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif pname.endswith(".bias"):
                p.copy_(0.05 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    path = os.path.join(out_dir, name)
    shutil.rmtree(path, ignore_errors=True)
    model.save_pretrained(path, safe_serialization=True)
    tokens, mask, positions = batch(seed)
    with torch.no_grad():
        logits = model(
            input_ids=torch.tensor(tokens),
            attention_mask=torch.tensor(mask),
            position_ids=torch.tensor(positions),
        ).logits
    np.savez(
        os.path.join(path, "reference.npz"),
        tokens=tokens.astype(np.int32),
        attention_mask=mask.astype(np.int32),
        position_ids=positions.astype(np.int32),
        logits=logits.float().numpy(),
    )
    size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    print(f"{name}: {path} ({size / 1024:.0f} KiB)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    here = os.path.dirname(os.path.abspath(__file__))
    default = os.path.join(here, os.pardir, "tests", "fixtures", "golden")
    parser.add_argument("--out", default=os.path.normpath(default))
    parser.add_argument("--only", nargs="*", help="fixture names to write (default: all)")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for seed, (name, config) in enumerate(configs().items()):  # the seed is the position
        if not args.only or name in args.only:
            make(name, config, args.out, seed)


if __name__ == "__main__":
    main()
