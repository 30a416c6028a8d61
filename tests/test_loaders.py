"""Tests for jaxlora.models.loaders: safetensors and GGUF weights, tokenizers.

Oracles: transformers models on the same files (logits, loss, generation), a GGUF written
here with llama.cpp's q/k permutation applied by the test, and transformers' own GGUF
tokenizer conversion. The real SmolLM2 and MiniLM checks skip without their asset packages.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from _model_fixtures import hf_llama, quiet_transformers, random_batch, require_asset, torch_forward

from jaxlora.models import bert, llama, loaders


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama")
    return directory, hf_llama(directory)


def _rewrite(directory: Path, edit) -> Path:
    """A copy of a checkpoint whose tensor dict went through ``edit``."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(directory / "model.safetensors")
    edit(tensors)
    out = directory.parent / f"{directory.name}_edited"
    out.mkdir(exist_ok=True)
    save_file(tensors, out / "model.safetensors")
    (out / "config.json").write_text((directory / "config.json").read_text())
    return out


def test_checkpoint_mismatches_are_named(tiny_llama):
    directory, _ = tiny_llama

    def edit(t):
        del t["model.layers.1.mlp.up_proj.weight"]
        t["model.layers.0.extra.weight"] = np.zeros(3, np.float32)
        t["model.layers.2.self_attn.k_proj.weight"] = np.zeros((4, 4), np.float32)

    edited = _rewrite(directory, edit)
    with pytest.raises(ValueError) as info:
        loaders.load_llama_safetensors(edited)
    message = str(info.value)
    assert "missing tensors ['model.layers.1.mlp.up_proj.weight']" in message
    assert "unexpected tensors ['model.layers.0.extra.weight']" in message
    assert "model.layers.2.self_attn.k_proj.weight: file has (4, 4), expected (16, 32)" in message


def test_non_strict_ignores_unexpected_tensors(tiny_llama):
    directory, model = tiny_llama
    edited = _rewrite(directory, lambda t: t.update({"score.weight": np.zeros(2, np.float32)}))
    with pytest.raises(ValueError, match=r"score\.weight"):
        loaders.load_llama_safetensors(edited)
    config, params = loaders.load_llama_safetensors(edited, strict=False)
    ids, _ = random_batch(0, config.vocab_size, batch=1)
    np.testing.assert_allclose(
        llama.apply(params, ids, config=config), torch_forward(model, ids).logits, atol=1e-4
    )


def test_state_dict_round_trip(tiny_llama):
    from safetensors.numpy import load_file

    directory, _ = tiny_llama
    on_disk = load_file(directory / "model.safetensors")
    for scan in (False, True):
        config, params = loaders.load_llama_safetensors(directory, scan_layers=scan)
        exported = loaders.to_hf_state_dict(params, config)
        assert exported.keys() == on_disk.keys()
        for name, value in on_disk.items():
            np.testing.assert_array_equal(exported[name], value, err_msg=name)


def _llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    # What llama.cpp's converter does to q/k rows (interleaved RoPE pairs).
    return w.reshape(heads, 2, w.shape[0] // heads // 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(path: Path, model) -> None:
    import gguf

    c = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    names = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    if not c.tie_word_embeddings:
        # Half precision on one tensor exercises a second ggml type.
        writer.add_tensor("output.weight", state["lm_head.weight"].astype(np.float16))
    for i in range(c.num_hidden_layers):
        for hf, gg in names.items():
            w = state[f"model.layers.{i}.{hf}.weight"]
            if hf == "self_attn.q_proj":
                w = _llama_cpp_permute(w, c.num_attention_heads)
            elif hf == "self_attn.k_proj":
                w = _llama_cpp_permute(w, c.num_key_value_heads)
            writer.add_tensor(f"blk.{i}.{gg}.weight", w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_gguf_matches_transformers(tmp_path, tied):
    model = hf_llama(tmp_path / "hf", tie_word_embeddings=tied, num_key_value_heads=1)
    _write_gguf(tmp_path / "tiny.gguf", model)
    config, params = loaders.load_llama_gguf(tmp_path / "tiny.gguf")
    assert config.tie_embeddings == tied
    assert config.to_hf_config()["rope_theta"] == 5000.0
    assert config.num_kv_heads == 1
    ids, mask = random_batch(3, config.vocab_size)
    expected = torch_forward(model, ids, mask).logits.numpy()
    got = np.asarray(jax.jit(functools.partial(llama.apply, config=config))(params, ids, mask))
    real = mask.astype(bool)
    # float16 output weights (untied case) round at ~5e-4 relative.
    tol = 1e-4 if tied else 2e-3
    np.testing.assert_allclose(got[real], expected[real], atol=tol, rtol=tol)


def test_gguf_wrong_architecture_is_rejected(tmp_path):
    import gguf

    writer = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((2, 2), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="architecture 'llama', got 'gpt2'"):
        loaders.load_llama_gguf(tmp_path / "x.gguf")


# ----------------------------------------------------------------- real SmolLM2 weights

HELD_OUT = textwrap.dedent("""\
    The lighthouse stood on a rocky point at the northern end of the island. Every evening
    the keeper climbed the narrow stairs, trimmed the wick and wound the clockwork that
    turned the great lens. Ships passing in the night could see its beam from twenty miles
    away, and many sailors owed their lives to the steady light. In the winter storms the
    waves broke over the rocks and the spray reached the lantern room, but the light never
    went out.""")


@pytest.fixture(scope="module")
def smollm2():
    path = require_asset("smollm2")
    config, params = loaders.load_llama_gguf(path, scan_layers=True)
    return path, config, params, loaders.load_gguf_tokenizer(path)


def _check_quantized_load(params, qparams):
    from jaxlora.quant import QuantizedKernel
    from jaxlora.targets import is_kernel_leaf

    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    qflat = jax.tree_util.tree_flatten_with_path(qparams, is_leaf=is_kernel_leaf)[0]
    assert [kp for kp, _ in flat] == [kp for kp, _ in qflat]
    kinds = set()
    for (kp, w), (_, q) in zip(flat, qflat):
        if isinstance(q, QuantizedKernel):
            kinds.add(kp[-2].key)
            assert q.kind == "q4_1" and q.data.dtype == np.uint8 and q.nbytes * 6 < w.nbytes
            # the file's own codes and scales: exactly the float route's values
            np.testing.assert_array_equal(np.asarray(jax.jit(q.dequantize)()), np.asarray(w))
        else:
            np.testing.assert_array_equal(np.asarray(q), np.asarray(w))
    # every Q4_1 tensor of SmolLM2 (the embedding is Q8_0 and stays float)
    assert kinds == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_smollm2_q4_1_loads_quantized_and_dequantizes_exactly(smollm2):
    path, _, params, _ = smollm2
    _, qparams = loaders.load_llama_gguf(path, scan_layers=True, quantized=True)
    _check_quantized_load(params, qparams)


@pytest.mark.slow
def test_smollm2_q4_1_loads_quantized_per_layer():
    path = require_asset("smollm2")
    _, params = loaders.load_llama_gguf(path)
    _, qparams = loaders.load_llama_gguf(path, quantized=True)
    _check_quantized_load(params, qparams)


def test_smollm2_tokenizer_matches_transformers(smollm2):
    transformers = quiet_transformers()

    path, _, _, tokenizer = smollm2
    reference = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    texts = [
        HELD_OUT,
        "<|im_start|>user\nWhat is 12345 + 678?<|im_end|>\n",
        "  leading spaces, tabs\tand café naïve 東京 🙂\n\nend",
    ]
    for text in texts:
        ids = tokenizer.encode(text).ids
        assert ids == reference(text)["input_ids"], text
        assert tokenizer.decode(ids, skip_special_tokens=False) == text


def test_smollm2_loss_matches_transformers(smollm2):
    import torch

    transformers = quiet_transformers()

    _, config, params, tokenizer = smollm2
    ids = np.array([tokenizer.encode(HELD_OUT).ids], np.int32)
    loss_fn = jax.jit(lambda p, x: llama.causal_lm_loss(llama.apply(p, x, config=config), x))
    jax_loss = float(loss_fn(params, ids))

    state = {k: torch.from_numpy(v) for k, v in loaders.to_hf_state_dict(params, config).items()}
    reference = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config.to_hf_config()))
    missing, unexpected = reference.load_state_dict(state, strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected  # tied to embed_tokens
    assert reference.lm_head.weight.data_ptr() == reference.model.embed_tokens.weight.data_ptr()
    reference.eval()
    with torch.no_grad():
        torch_loss = float(
            reference(torch.from_numpy(ids).long(), labels=torch.from_numpy(ids).long()).loss
        )
    relative = abs(jax_loss - torch_loss) / torch_loss
    print(
        f"\nSmolLM2 held-out loss, {ids.shape[1]} tokens: jax {jax_loss:.6f} "
        f"torch {torch_loss:.6f} (relative difference {relative:.1e})"
    )
    assert jax_loss == pytest.approx(torch_loss, rel=1e-3)
    assert 1.0 < jax_loss < 4.0  # a language model, not noise (uniform would be 10.8)


def test_smollm2_greedy_generation_is_coherent(smollm2):
    _, config, params, tokenizer = smollm2
    prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    prompt_ids = tokenizer.encode(prompt).ids
    end = tokenizer.token_to_id("<|im_end|>")
    out = llama.generate(params, config, prompt_ids, 12, eos_id=end)
    answer = tokenizer.decode(out[len(prompt_ids) :].tolist())
    print(f"\nSmolLM2 greedy answer: {answer!r}")
    assert "Paris" in answer


_MEASURE = """
import json, resource, sys, time
import jax, jax.numpy as jnp
import gguf
jnp.ones(1).block_until_ready()
from jaxlora.models import loaders

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()

baseline = rss()
start = time.perf_counter()
quant = dict(quantize="nf4", quantize_embedding=True) if sys.argv[3:] == ["nf4"] else {}
config, params = loaders.load_llama_gguf(sys.argv[1], scan_layers=sys.argv[2] == "scan", **quant)
jax.block_until_ready(params)
seconds = time.perf_counter() - start
# getrusage's ru_maxrss survives fork+exec (Linux keeps the parent's high-water mark), so
# under a big pytest process it reports the parent's peak; VmHWM is this address space's own.
with open("/proc/self/status") as f:
    peak = int(next(line for line in f if line.startswith("VmHWM")).split()[1]) * 1024
maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
from jaxlora.targets import is_kernel_leaf
leaves = jax.tree_util.tree_leaves(params, is_leaf=is_kernel_leaf)
weights = sum(x.size * 4 for x in leaves)  # of the float32 model
stored = sum(x.nbytes for x in leaves)
result = dict(seconds=seconds, baseline=baseline, peak=peak, maxrss=maxrss, weights=weights,
              stored=stored)
print(json.dumps(result))
"""


@pytest.mark.parametrize("layout", ["unscanned", "scan"])
def test_smollm2_gguf_load_time_and_memory(layout):
    path = require_asset("smollm2")
    result = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(path), layout],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        cwd=Path(__file__).resolve().parents[1],
        timeout=120,
    )
    m = json.loads(result.stdout.strip().splitlines()[-1])
    growth = (m["peak"] - m["baseline"]) / m["weights"]
    print(
        f"\nSmolLM2 GGUF load ({layout}): {m['seconds']:.1f} s, float32 weights "
        f"{m['weights'] / 2**20:.0f} MiB, peak RSS {m['peak'] / 2**20:.0f} MiB "
        f"(+{(m['peak'] - m['baseline']) / 2**20:.0f} MiB = {growth:.2f}x weights)"
    )
    assert m["weights"] == 134_515_008 * 4
    assert m["seconds"] < 30
    assert growth < 2.5


def test_smollm2_nf4_load_never_holds_the_float_model():
    """Quantizing while reading: the peak grows by far less than the float32 weights."""
    path = require_asset("smollm2")
    result = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(path), "scan", "nf4"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        cwd=Path(__file__).resolve().parents[1],
        timeout=300,
    )
    m = json.loads(result.stdout.strip().splitlines()[-1])
    growth = (m["peak"] - m["baseline"]) / m["weights"]
    print(
        f"\nSmolLM2 GGUF -> NF4 load: {m['seconds']:.1f} s, stored {m['stored'] / 2**20:.0f} "
        f"MiB of {m['weights'] / 2**20:.0f} MiB float32, peak RSS +"
        f"{(m['peak'] - m['baseline']) / 2**20:.0f} MiB = {growth:.2f}x the float32 weights"
    )
    assert m["weights"] == 134_515_008 * 4
    assert m["stored"] < 0.14 * m["weights"]  # 4 bits + about 0.13 bits of scales: 0.13x
    # Holding the float model would take 1.0x by itself (the float route grows by more).
    # Measured 0.72x: gguf's reader (its memory map, 94 MiB, and parsed metadata, ~80 MiB:
    # 0.33x, either route), the codes (0.13x), one tensor's temporaries, heap slack.
    assert growth < 1.0


# --------------------------------------------------- quantizing while reading (QLoRA)

QLLAMA = dict(hidden_size=128, intermediate_size=192, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def qllama(tmp_path_factory):
    """One untied model (a float ``lm_head``) as safetensors and as GGUF."""
    directory = tmp_path_factory.mktemp("qllama")
    model = hf_llama(directory / "hf", **QLLAMA)
    _write_gguf(directory / "q.gguf", model)
    return {"safetensors": directory / "hf", "gguf": directory / "q.gguf"}


def _load(fmt):
    return loaders.load_llama_gguf if fmt == "gguf" else loaders.load_llama_safetensors


@pytest.mark.parametrize("kind", ["nf4", "int8"])
@pytest.mark.parametrize("scan", [False, True], ids=["unscanned", "scan"])
@pytest.mark.parametrize("fmt", ["safetensors", "gguf"])
def test_quantize_on_read_equals_quantizing_the_float_load(qllama, fmt, scan, kind, monkeypatch):
    import jaxlora as jl
    from jaxlora.quant import quantize_kernel
    from jaxlora.targets import is_kernel_leaf, stacked

    monkeypatch.setattr(loaders, "QUANTIZE_ROWS", 10)  # the 97-row embedding in 10 slabs
    load = _load(fmt)
    _, params = load(qllama[fmt], scan_layers=scan)
    _, qparams = load(qllama[fmt], scan_layers=scan, quantize=kind, quantize_embedding=True)
    dq = kind == "nf4"
    # the oracle: each float leaf quantized whole, as jl.quantize selects and blocks it
    # (on host arrays, as the loader: numpy's division, see quantize_kernel)
    host = jax.tree_util.tree_map(np.asarray, params)
    expect = jl.quantize(
        host, targets=stacked("all-linear") if scan else "all-linear", kind=kind, double_quant=dq
    )
    expect["embed"]["embedding"] = quantize_kernel(
        host["embed"]["embedding"], kind=kind, axis=-1, double_quant=dq
    )
    got_leaves, got_tree = jax.tree_util.tree_flatten(qparams)
    want_leaves, want_tree = jax.tree_util.tree_flatten(expect)
    assert got_tree == want_tree  # the same QuantizedKernel nodes (format, axis, groups)
    for a, b in zip(got_leaves, want_leaves, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    kinds = {
        jax.tree_util.keystr(kp): getattr(x, "kind", None)
        for kp, x in jax.tree_util.tree_flatten_with_path(qparams, is_leaf=is_kernel_leaf)[0]
    }
    assert kinds["['lm_head']['kernel']"] is None  # an output head stays float, as all-linear
    assert kinds["['embed']['embedding']"] == kind


def test_quantize_on_read_keeps_the_embedding_float_unless_asked(qllama):
    from jaxlora.quant import QuantizedKernel

    _, qparams = loaders.load_llama_gguf(qllama["gguf"], quantize="nf4")
    assert isinstance(qparams["layers"]["0"]["mlp"]["up_proj"]["kernel"], QuantizedKernel)
    assert qparams["layers"]["0"]["mlp"]["up_proj"]["kernel"].group > 0  # double quant
    assert isinstance(qparams["embed"]["embedding"], jax.Array)
    _, plain = loaders.load_llama_gguf(qllama["gguf"], quantize="nf4", double_quant=False)
    assert plain["layers"]["0"]["mlp"]["up_proj"]["kernel"].group == 0


def test_quantize_on_read_argument_errors(qllama, tiny_llama):
    with pytest.raises(ValueError, match="quantized=True keeps the file's Q4_1 codes"):
        loaders.load_llama_gguf(qllama["gguf"], quantized=True, quantize="nf4")
    with pytest.raises(ValueError, match="unknown quantize='nf5'"):
        loaders.load_llama_safetensors(qllama["safetensors"], quantize="nf5")
    with pytest.raises(ValueError, match="need quantize="):
        loaders.load_llama_gguf(qllama["gguf"], quantize_embedding=True)
    # hidden size 32: NF4's blocks of 64 do not fit; the error names the kernel
    with pytest.raises(ValueError, match=r"'layers/0/attn/q_proj/kernel'.*blocks of 64"):
        loaders.load_llama_safetensors(tiny_llama[0], quantize="nf4")


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/self/maps")
@pytest.mark.parametrize(
    "options",
    [{}, {"scan_layers": True}, {"scan_layers": True, "quantize": "nf4"}],
    ids=["float", "scan", "nf4"],
)
def test_gguf_load_releases_the_file_mapping(qllama, tmp_path, options):
    """No loaded array aliases the GGUF file's memory map, so loading unmaps the file.

    gguf dequantizes F32 tensors to views of the map, and on CPU ``jax.device_put`` of an
    aligned host array may alias it rather than copy: one such leaf (a norm scale) would
    keep the whole mapping, and every page the load touched, in the process's RSS for as
    long as the parameters live.
    """
    import gc
    import shutil

    path = tmp_path / "own.gguf"  # a file no other test maps
    shutil.copyfile(qllama["gguf"], path)
    _, params = loaders.load_llama_gguf(path, **options)
    jax.block_until_ready(params)
    gc.collect()
    maps = Path("/proc/self/maps").read_text().splitlines()
    mapped = [line for line in maps if str(path) in line]
    assert mapped == [], f"{len(mapped)} mappings of the GGUF file outlive the load"
    del params
    gc.collect()


# ------------------------------------------------------------------------ MiniLM files


def test_minilm_tokenizer_and_strict_load():
    directory = require_asset("minilm")
    tokenizer = loaders.load_tokenizer(directory)
    assert tokenizer.padding is None
    assert tokenizer.encode("Hello world").ids == [101, 7592, 2088, 102]
    config, params = loaders.load_bert_safetensors(directory)
    assert config == bert.BertConfig(
        vocab_size=30522, hidden_size=384, num_layers=6, num_heads=12, intermediate_size=1536
    )
    assert "pooler" not in params
    _, with_pooler = loaders.load_bert_safetensors(directory / "model.safetensors", pooler=True)
    assert with_pooler["pooler"]["kernel"].shape == (384, 384)
