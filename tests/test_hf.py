"""Hugging Face interop: golden logits of every family (GPT-2, Llama, Qwen2/3, Mistral, Phi-3,
Gemma 2/3, Mixtral) and the save round trip.

The fixtures under tests/fixtures/golden/ are tiny random checkpoints written by transformers
(PyTorch) with their reference float32 logits on a left-padded batch
(experiments/make_golden.py regenerates them). Tolerance: 1e-4 (composed float32 ops).
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from rlhf_jax import models
from rlhf_jax.errors import UserError
from rlhf_jax.models import ModelLoadError, hf

GOLDEN = os.path.join(os.path.dirname(__file__), "fixtures", "golden")
ARCHS = (
    "gpt2",
    "llama",
    "qwen2",
    "qwen3",
    "llama_yarn",
    "mistral",
    "phi3",
    "gemma2",
    "gemma3",
    "mixtral",
)
ARCH_OF = {"llama_yarn": "llama"}  # fixture name -> model_type
ATOL = 1e-4


def _ref(arch):
    return dict(np.load(os.path.join(GOLDEN, arch, "reference.npz")))


@pytest.fixture(scope="module", params=ARCHS)
def golden(request):
    arch = request.param
    return arch, models.from_pretrained(os.path.join(GOLDEN, arch)), _ref(arch)


_logits = jax.jit(models.logits, static_argnums=0)
_decode = jax.jit(models.decode, static_argnums=0, static_argnames="last_only")


def test_config_read(golden):
    name, model, _ = golden
    cfg = model.config
    assert cfg.arch == ARCH_OF.get(name, name) and cfg.num_layers == 2 and cfg.vocab_size == 96
    if name != "gpt2":
        assert cfg.num_kv_heads == 2 and cfg.head_dim == 8
    assert cfg.qk_norm == (name in ("qwen3", "gemma3"))
    assert cfg.tie_word_embeddings == (name in ("gpt2", "qwen3", "gemma2", "gemma3"))
    assert cfg.mlp_bias == (name in ("gpt2", "llama_yarn"))
    assert cfg.sliding_window == {
        "mistral": 5,
        "phi3": 7,
        "gemma2": 4,
        "gemma3": 4,
        "mixtral": 6,
    }.get(name)
    assert (cfg.num_experts, cfg.num_experts_per_tok) == ((4, 2) if name == "mixtral" else (0, 2))
    if name.startswith("gemma"):
        assert cfg.layer_types == ("sliding_attention", "full_attention")
        assert (cfg.attn_logit_softcap, cfg.final_logit_softcap) == (
            (5.0, 3.0) if name == "gemma2" else (None, None)
        )
        assert cfg.rope_local_theta == (100.0 if name == "gemma3" else None)
    assert cfg.partial_rotary_factor == (0.75 if name == "phi3" else 1.0)
    if name in ("llama", "llama_yarn"):
        assert dict(cfg.rope_scaling)["rope_type"] == {"llama": "llama3"}.get(name, "yarn")


def test_golden_logits_full_forward(golden):
    _, model, ref = golden
    out = np.asarray(_logits(model.graphdef, model.params, ref["tokens"], ref["attention_mask"]))
    real = ref["attention_mask"] > 0
    np.testing.assert_allclose(out[real], ref["logits"][real], atol=ATOL, rtol=0)


def test_golden_logits_through_dot_product_attention(golden):
    """attention='xla' (jax.nn.dot_product_attention) keeps the numbers: the golden logits, and
    the einsum formula's within 1e-5."""
    name, model, ref = golden
    assert model.config.attention == "auto"
    dpa = models.from_pretrained(os.path.join(GOLDEN, name), attention="xla")
    assert dpa.config.attention == "xla"
    out = np.asarray(_logits(dpa.graphdef, dpa.params, ref["tokens"], ref["attention_mask"]))
    real = ref["attention_mask"] > 0
    np.testing.assert_allclose(out[real], ref["logits"][real], atol=ATOL, rtol=0)
    # on CPU 'auto' is the einsum formula
    want = np.asarray(_logits(model.graphdef, model.params, ref["tokens"], ref["attention_mask"]))
    np.testing.assert_allclose(out[real], want[real], atol=1e-5, rtol=0)


def test_golden_logits_prefill_then_cached_decode(golden):
    _, model, ref = golden
    tokens, mask, pos = ref["tokens"], ref["attention_mask"], ref["position_ids"]
    b, t = tokens.shape
    p = 8
    cache = models.init_cache(model.config, b, t)
    out, cache = _decode(model.graphdef, model.params, tokens[:, :p], pos[:, :p], mask, cache, 0)
    got = [np.asarray(out)]
    for i in range(p, t):
        out, cache = _decode(
            model.graphdef,
            model.params,
            tokens[:, i : i + 1],
            pos[:, i : i + 1],
            mask,
            cache,
            jnp.int32(i),
            last_only=True,
        )
        got.append(np.asarray(out)[:, None])
    got = np.concatenate(got, 1)
    real = mask > 0
    np.testing.assert_allclose(got[real], ref["logits"][real], atol=ATOL, rtol=0)


def test_golden_models_sample_through_the_rollout(golden):
    """Each family samples (prefill + decode steps past the sliding window), and the sampler's
    log-probs are the learner's."""
    from rlhf_jax import rollout

    _, model, ref = golden
    tokens, mask = ref["tokens"], ref["attention_mask"]
    ro = rollout.sample(model.graphdef, model.params, tokens, mask, 0, max_new_tokens=6, n=2)
    assert ro.tokens.shape == (6, 6) and bool(np.all(np.asarray(ro.lengths) == 6))
    full, full_mask = rollout.full_sequences(tokens, mask, ro)
    want = jax.jit(models.token_logprobs, static_argnums=0, static_argnames="start")(
        model.graphdef, model.params, full, full_mask, start=tokens.shape[1]
    )
    np.testing.assert_allclose(ro.learner_logprobs, want, atol=1e-5, rtol=0)


def test_save_pretrained_round_trip(golden, tmp_path):
    """save_pretrained -> our loader gives identical params; -> transformers gives the logits."""
    arch, model, ref = golden
    out = tmp_path / arch
    models.save_pretrained(model, str(out))
    again = models.from_pretrained(str(out))
    assert again.config == model.config
    for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(again.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    torch = pytest.importorskip("torch", reason="the transformers round trip needs PyTorch")
    from transformers import AutoModelForCausalLM

    pt = AutoModelForCausalLM.from_pretrained(str(out), attn_implementation="eager").eval()
    with torch.no_grad():
        logits = pt(
            input_ids=torch.tensor(ref["tokens"], dtype=torch.long),
            attention_mask=torch.tensor(ref["attention_mask"], dtype=torch.long),
            position_ids=torch.tensor(ref["position_ids"], dtype=torch.long),
        ).logits.numpy()
    real = ref["attention_mask"] > 0
    np.testing.assert_allclose(logits[real], ref["logits"][real], atol=ATOL, rtol=0)


def _reward_model(arch, gain, bias, head_bias):
    """The golden trunk with a fresh score head whose every constant is non-zero."""
    from flax import nnx

    rm = models.from_pretrained(
        os.path.join(GOLDEN, arch), lm_head=False, score_head=True, key=jax.random.key(3)
    )
    params = models.set_score_gain_bias(rm.params, gain, bias)
    flat = [
        (p, v.replace(jnp.full((1,), head_bias, jnp.float32)) if p == ("score_head", "bias") else v)
        for p, v in nnx.to_flat_state(params)
    ]
    return models.Model(graphdef=rm.graphdef, params=nnx.from_flat_state(flat), config=rm.config)


def _transformers_scores(path, ref):
    torch = pytest.importorskip("torch", reason="the transformers check needs PyTorch")
    from transformers import AutoModelForSequenceClassification

    pt = AutoModelForSequenceClassification.from_pretrained(
        str(path), attn_implementation="eager"
    ).eval()
    pt.config.pad_token_id = 0  # the golden batch pads with 0; transformers pools on it
    with torch.no_grad():
        return pt(
            input_ids=torch.tensor(ref["tokens"], dtype=torch.long),
            attention_mask=torch.tensor(ref["attention_mask"], dtype=torch.long),
            position_ids=torch.tensor(ref["position_ids"], dtype=torch.long),
        ).logits.numpy()[:, 0]


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen3"])
def test_score_model_sequence_classification_export(arch, tmp_path):
    """The export scores like ours in transformers (GPT-2: exactly; RMSNorm families: up to the
    documented rlhf_jax_score_offset), and loads back with our scores."""
    ref = _ref(arch)
    gain, bias, head_bias = 1.7, -0.3, 0.45
    rm = _reward_model(arch, gain, bias, head_bias)
    ours = np.asarray(models.scores(rm.graphdef, rm.params, ref["tokens"], ref["attention_mask"]))
    models.save_pretrained(rm, str(tmp_path))
    cfg = json.loads((tmp_path / "config.json").read_text())
    cls = {"gpt2": "GPT2", "llama": "Llama", "qwen3": "Qwen3"}[arch]
    assert cfg["architectures"] == [f"{cls}ForSequenceClassification"] and cfg["num_labels"] == 1
    constant = gain * head_bias + bias
    offset = cfg.get("rlhf_jax_score_offset", 0.0)
    if arch == "gpt2":
        assert abs(offset) < 1e-6  # folded into ln_f.bias: only float32 rounding is left
    else:
        assert offset == pytest.approx(constant, abs=1e-7)
    back = models.from_pretrained(str(tmp_path), lm_head=False, score_head=True)
    again = models.scores(back.graphdef, back.params, ref["tokens"], ref["attention_mask"])
    np.testing.assert_allclose(again, ours, atol=ATOL, rtol=0)
    theirs = _transformers_scores(tmp_path, ref)
    np.testing.assert_allclose(theirs + offset, ours, atol=ATOL, rtol=0)
    if arch == "gpt2":  # what a transformers user reads, with no correction, is our score
        np.testing.assert_allclose(theirs, ours, atol=ATOL, rtol=0)
        assert abs(constant) > 100 * ATOL


def test_sharded_checkpoint_and_placement(tmp_path):
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    model = models.from_pretrained(os.path.join(GOLDEN, "gpt2"))
    models.save_pretrained(model, str(tmp_path), max_shard_bytes=20_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (tmp_path / "model.safetensors").exists()
    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))

    def place(path, shape):
        spec = P("data", None) if path == "embed/embedding" else P()
        return NamedSharding(mesh, spec)

    placed = models.from_pretrained(str(tmp_path), shardings=place)
    emb = placed.params["embed"]["embedding"].get_value()
    assert emb.sharding.spec == P("data", None)
    assert emb.addressable_shards[0].data.shape == (96 // jax.device_count(), 32)
    ref = _ref("gpt2")
    out = _logits(placed.graphdef, placed.params, ref["tokens"], ref["attention_mask"])
    real = ref["attention_mask"] > 0
    np.testing.assert_allclose(np.asarray(out)[real], ref["logits"][real], atol=ATOL, rtol=0)


def test_bfloat16_load_smoke():
    ref = _ref("qwen3")
    m = models.from_pretrained(
        os.path.join(GOLDEN, "qwen3"), dtype="bfloat16", param_dtype="bfloat16"
    )
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(m.params))
    out = np.asarray(_logits(m.graphdef, m.params, ref["tokens"], ref["attention_mask"]))
    real = ref["attention_mask"] > 0
    assert out.dtype == np.float32 and np.all(np.isfinite(out))
    # bfloat16 keeps 8 mantissa bits: a few percent of the logit scale after two layers.
    scale = np.abs(ref["logits"][real]).max()
    assert np.abs(out[real] - ref["logits"][real]).max() < 0.05 * scale


def _copy(arch, tmp_path):
    dst = tmp_path / arch
    shutil.copytree(os.path.join(GOLDEN, arch), dst)
    return dst


def _rewrite(dst, drop=None, reshape=None):
    tensors = load_file(str(dst / "model.safetensors"))
    tensors.pop(drop, None)
    if reshape is not None:
        tensors[reshape] = np.ascontiguousarray(tensors[reshape][:-1])
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})


def _one_line_user_error(excinfo, *words):
    """The error is a ModelLoadError (a UserError), on one line, naming each of ``words``."""
    err = excinfo.value
    assert isinstance(err, ModelLoadError) and isinstance(err, UserError)
    assert "\n" not in str(err)
    for w in words:
        assert w in str(err), (w, str(err))


@pytest.mark.parametrize("kind", ["bert", "mamba", None])
def test_error_unsupported_architecture(tmp_path, kind):
    dst = _copy("llama", tmp_path)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["model_type"] = kind
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=f"model_type {kind!r} is not supported") as e:
        models.from_pretrained(str(dst))
    _one_line_user_error(e, str(dst / "config.json"), *models.SUPPORTED_MODEL_TYPES)


def test_error_config_missing_key(tmp_path):
    dst = _copy("qwen2", tmp_path)
    cfg = json.loads((dst / "config.json").read_text())
    del cfg["num_hidden_layers"]
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="'num_hidden_layers' is missing") as e:
        models.from_pretrained(str(dst))
    _one_line_user_error(e, str(dst / "config.json"))


@pytest.mark.parametrize("cut", ["truncated", "header", "garbage", "empty"])
def test_error_truncated_or_corrupt_weights(tmp_path, cut):
    dst = _copy("gpt2", tmp_path)
    file = dst / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(
        {
            "truncated": data[: len(data) - 100],  # a download cut short
            "header": data[:8] + b"#" + data[9:],  # the JSON header damaged
            "garbage": b"<html>404 not found</html>",
            "empty": b"",
        }[cut]
    )
    with pytest.raises(ModelLoadError, match="truncated or corrupt") as e:
        models.from_pretrained(str(dst))
    _one_line_user_error(e, str(file))


def test_error_missing_config_weights_or_directory(tmp_path):
    dst = _copy("llama", tmp_path)
    os.remove(dst / "config.json")
    with pytest.raises(ModelLoadError, match="config.json: not found") as e:
        models.from_pretrained(str(dst))
    _one_line_user_error(e, str(dst))
    dst = _copy("qwen3", tmp_path)
    os.remove(dst / "model.safetensors")
    with pytest.raises(ModelLoadError, match="no model.safetensors") as e:
        models.from_pretrained(str(dst))
    _one_line_user_error(e, str(dst))
    with pytest.raises(ModelLoadError, match="no such model directory") as e:
        models.from_pretrained(str(tmp_path / "nowhere"))
    # a sharded checkpoint with a shard gone
    model = models.from_pretrained(os.path.join(GOLDEN, "gpt2"))
    models.save_pretrained(model, str(tmp_path / "sharded"), max_shard_bytes=20_000)
    shards = sorted((tmp_path / "sharded").glob("model-*-of-*.safetensors"))
    assert len(shards) > 1
    os.remove(shards[1])
    with pytest.raises(ModelLoadError, match="listed in model.safetensors.index.json but missing"):
        models.from_pretrained(str(tmp_path / "sharded"))


def test_error_missing_tensor(tmp_path):
    dst = _copy("llama", tmp_path)
    _rewrite(dst, drop="model.layers.1.self_attn.k_proj.weight")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight is missing"):
        models.from_pretrained(str(dst))


def test_error_misshaped_tensor(tmp_path):
    dst = _copy("qwen2", tmp_path)
    _rewrite(dst, reshape="model.layers.0.mlp.up_proj.weight")
    with pytest.raises(
        ValueError, match=r"up_proj\.weight has shape \(47, 32\), expected \(48, 32\)"
    ):
        models.from_pretrained(str(dst))


def test_error_pickle_only_directory(tmp_path):
    dst = _copy("gpt2", tmp_path)
    os.remove(dst / "model.safetensors")
    (dst / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ModelLoadError, match="pickle checkpoints are never loaded") as e:
        models.from_pretrained(str(dst))
    _one_line_user_error(e, str(dst))


def _word_tokenizer(path, n_words):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(n_words)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    fast.chat_template = "{% for m in messages %}{{ m['content'] }} </s> {% endfor %}"
    fast.save_pretrained(path)


def test_load_tokenizer_keeps_chat_template_and_checks_vocab(tmp_path):
    dst = _copy("llama", tmp_path)
    _word_tokenizer(str(dst), 50)
    tok = models.load_tokenizer(str(dst))
    assert tok.chat_template is not None
    text = tok.apply_chat_template([{"role": "user", "content": "w1 w2"}], tokenize=False)
    assert text.strip() == "w1 w2 </s>"
    assert tok("w1 w2")["input_ids"][-2:] == [4, 5]
    _word_tokenizer(str(dst), 120)  # 123 tokens > vocab_size 96
    with pytest.raises(ModelLoadError, match="123 tokens but the model's vocab_size is 96") as e:
        models.load_tokenizer(str(dst))
    _one_line_user_error(e, str(dst))


def test_gpt2_checkpoint_without_prefix_and_with_buffers(tmp_path):
    """Hub GPT-2 files name tensors 'h.0...' (GPT2Model) and carry attention-mask buffers."""
    dst = _copy("gpt2", tmp_path)
    tensors = load_file(str(dst / "model.safetensors"))
    tensors = {name.removeprefix("transformer."): x for name, x in tensors.items()}
    tensors["h.0.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), bool))
    save_file(tensors, str(dst / "model.safetensors"))
    loaded = models.from_pretrained(str(dst))
    golden = models.from_pretrained(os.path.join(GOLDEN, "gpt2"))
    for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(golden.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_config_from_transformers4_llama31_style():
    cfg = hf.config_from_hf(
        {
            "model_type": "llama",
            "vocab_size": 128256,
            "hidden_size": 4096,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "intermediate_size": 14336,
            "max_position_embeddings": 131072,
            "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0,
            "rope_scaling": {
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
                "rope_type": "llama3",
            },
            "eos_token_id": [128001, 128008, 128009],
            "hidden_act": "silu",
        }
    )
    assert (cfg.head_dim, cfg.num_kv_heads, cfg.rope_theta) == (128, 8, 500000.0)
    assert cfg.eos_token_id == 128001 and not cfg.tie_word_embeddings
    assert dict(cfg.rope_scaling)["original_max_position_embeddings"] == 8192
    back = hf.config_to_hf(cfg)
    assert back["rope_parameters"]["rope_theta"] == 500000.0
    assert hf.config_from_hf(back) == cfg.replace(eos_token_id=128001)
