"""Tests of jaxlora.interop against Hugging Face PEFT and transformers (float32, CPU).

Oracles: PEFT's own ``PeftModel`` on the ``transformers`` model with the same base weights
(export), a PEFT adapter trained one step in torch (import), and ``from_pretrained`` of
the merged weights (merged export). Logits agree to 1e-4.
"""

from __future__ import annotations

import functools
import json
import re
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _model_fixtures import hf_bert, hf_llama, quiet_transformers, random_batch, torch_forward
from jl_testing import randomize

import jaxlora as jl
from jaxlora.models import bert, llama, loaders
from jaxlora.targets import stacked

TOL = dict(atol=1e-4, rtol=1e-4)

pytestmark = [
    # peft 0.21 reads a property transformers 5 deprecates; nothing to fix on our side
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]

ATTN_MLP = r".*(q_proj|v_proj|o_proj|up_proj|down_proj)/kernel"
METHODS = {
    "lora": lambda: jl.lora(rank=4, alpha=8.0, targets=ATTN_MLP),
    "rslora": lambda: jl.lora(rank=4, alpha=8.0, rslora=True, targets=ATTN_MLP),
    "lora_fa": lambda: jl.lora_fa(rank=4, alpha=8.0, targets=ATTN_MLP),
    "dora": lambda: jl.dora(rank=4, alpha=8.0, targets=ATTN_MLP),
    "vera": lambda: jl.vera(rank=8, targets=ATTN_MLP),
    "lora_mixed_ranks": lambda: jl.compose(
        jl.lora(rank=2, alpha=8.0, targets=r".*(q|v)_proj/kernel"),
        jl.lora(rank=4, alpha=2.0, targets=r".*(up|down)_proj/kernel"),
    ),
}


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory):
    return tmp_path_factory.mktemp("interop")


def load_llama(tmp_root, scan=False):
    """A fresh transformers Llama (PEFT mutates it) and our params of the same weights."""
    directory = tmp_root / "llama"
    if not directory.exists():
        hf_llama(directory)
    model = quiet_transformers().LlamaForCausalLM.from_pretrained(directory).eval()
    config, params = loaders.load_llama_safetensors(directory, scan_layers=scan)
    return model, config, params


def load_bert(tmp_root):
    directory = tmp_root / "bert"
    if not directory.exists():
        hf_bert(directory)
    model = quiet_transformers().BertModel.from_pretrained(directory).eval()
    config, params = loaders.load_bert_safetensors(directory, pooler=True)
    return model, config, params


def llama_logits(params, adapters, config, ids, mask):
    fn = functools.partial(llama.apply, config=config)
    return np.asarray(jax.jit(jl.adapt(fn))(params, adapters, ids, mask))


def assert_close_on_real_tokens(got, expected, mask):
    real = mask.astype(bool)  # padded queries are don't-cares
    assert np.abs(expected).max() > 1.0, "outputs too small for a meaningful comparison"
    np.testing.assert_allclose(got[real], expected[real], **TOL)


def peft_load(model, directory):
    import peft

    return peft.PeftModel.from_pretrained(model, directory).eval()


# ------------------------------------------------------------------------------ export


@pytest.mark.parametrize("name", sorted(METHODS))
def test_export_loads_in_peft_with_the_same_logits(tmp_root, tmp_path, name):
    model, config, params = load_llama(tmp_root)
    adapters = randomize(METHODS[name]().init(jax.random.key(0), params), jax.random.key(1))
    out = jl.export_peft(
        tmp_path / "peft",
        adapters,
        jl.hf_module_names(config),
        task_type="CAUSAL_LM",
        use_rslora=name == "rslora",
    )
    ids, mask = random_batch(0, config.vocab_size)
    expected = torch_forward(peft_load(model, out), ids, mask).logits.numpy()
    assert_close_on_real_tokens(llama_logits(params, adapters, config, ids, mask), expected, mask)
    # export then import is exact, including the static configuration
    back = jl.import_peft(out, params, jl.hf_module_names(config))
    _assert_same_adapters(back, adapters, exact_shared_key=name != "vera")


def _assert_same_adapters(got, want, exact_shared_key=True):
    from jaxlora.checkpoint import describe_adapters

    dg, dw = describe_adapters(got), describe_adapters(want)
    for node in dw["nodes"].values():  # PEFT has no frozen-A flag: LoRA-FA comes back as LoRA
        node["class"] = node["class"].replace("LoraFaAdapter", "LoraAdapter")
    if not exact_shared_key:
        dg["shared"], dw["shared"] = {}, {}
    assert dg == dw
    paths = lambda t: [p for p, _ in jax.tree_util.tree_flatten_with_path(t)[0]]
    lg, lw = jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)
    if not exact_shared_key:  # the imported VeRA key is PEFT's seed, not the JAX init key
        keep = [i for i, p in enumerate(paths(want)) if "key" not in jax.tree_util.keystr(p)]
        lg, lw = [lg[i] for i in keep], [lw[i] for i in keep]
    for a, b in zip(lg, lw, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_export_scanned_llama(tmp_root, tmp_path):
    model, config, params = load_llama(tmp_root, scan=True)
    assert params["layers"]["attn"]["q_proj"]["kernel"].ndim == 3
    ids, mask = random_batch(1, config.vocab_size)
    # the (L, d_in, d_out) kernels' axes are read off the model's use of them
    like = (functools.partial(llama.apply, config=config), ids)
    adapters = METHODS["lora"]().init(jax.random.key(0), params, like=like)
    adapters = randomize(adapters, jax.random.key(1))
    names = jl.hf_module_names(config)
    out = jl.export_peft(tmp_path / "peft", adapters, names)
    expected = torch_forward(peft_load(model, out), ids, mask).logits.numpy()
    assert_close_on_real_tokens(llama_logits(params, adapters, config, ids, mask), expected, mask)
    _assert_same_adapters(jl.import_peft(out, params, names), adapters)


@pytest.mark.parametrize("name", ["lora", "dora"])
def test_export_bert(tmp_root, tmp_path, name):
    model, config, params = load_bert(tmp_root)
    method = {
        "lora": jl.lora(rank=4, alpha=8.0, targets="all-linear"),
        "dora": jl.dora(rank=4, alpha=8.0, targets=r".*attn/(query|value)/kernel"),
    }[name]
    adapters = randomize(method.init(jax.random.key(0), params), jax.random.key(1))
    out = jl.export_peft(tmp_path / "peft", adapters, jl.hf_module_names(config))
    ids, mask = random_batch(2, config.vocab_size)
    expected = torch_forward(peft_load(model, out), ids, mask).last_hidden_state.numpy()
    fn = functools.partial(bert.apply, config=config)
    got = np.asarray(jax.jit(jl.adapt(fn))(params, adapters, ids, mask))
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], expected[real], **TOL)


# ------------------------------------------------------------------------------ import


def _peft_config(name, targets):
    import peft

    if name == "vera":
        return peft.VeraConfig(r=8, target_modules=targets, projection_prng_key=3)
    return peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=targets,
        use_rslora=name == "rslora",
        use_dora=name == "dora",
        lora_dropout=0.0,
    )


@pytest.mark.parametrize("name", ["lora", "rslora", "dora", "vera"])
def test_import_an_adapter_trained_in_torch(tmp_root, tmp_path, name):
    import peft
    import torch

    model, config, params = load_llama(tmp_root)
    targets = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
    torch.manual_seed(0)
    pm = peft.get_peft_model(model, _peft_config(name, targets))
    ids, mask = random_batch(3, config.vocab_size)
    t_ids = torch.from_numpy(ids).long()
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.5)
    loss = pm(input_ids=t_ids, labels=t_ids).loss  # one step, so lora_B / lambda_b move
    loss.backward()
    opt.step()
    pm.eval()
    pm.save_pretrained(tmp_path / "peft")
    expected = torch_forward(pm, ids, mask).logits.numpy()

    adapters = jl.import_peft(tmp_path / "peft", params, jl.hf_module_names(config))
    assert_close_on_real_tokens(llama_logits(params, adapters, config, ids, mask), expected, mask)
    base = np.asarray(llama.apply(params, ids, mask, config=config))
    assert np.abs(base - expected)[mask.astype(bool)].max() > 1e-3  # the step did something


def test_import_refuses_what_it_cannot_represent(tmp_root, tmp_path):
    _, config, params = load_llama(tmp_root)
    names = jl.hf_module_names(config)
    adapters = randomize(METHODS["lora"]().init(jax.random.key(0), params), jax.random.key(1))
    out = jl.export_peft(tmp_path / "peft", adapters, names)
    cfg_file = out / "adapter_config.json"
    good = cfg_file.read_text()

    cfg_file.write_text(json.dumps({**json.loads(good), "peft_type": "IA3"}))
    with pytest.raises(ValueError, match="LORA and VERA"):
        jl.import_peft(out, params, names)
    cfg_file.write_text(json.dumps({**json.loads(good), "fan_in_fan_out": True}))
    with pytest.raises(ValueError, match="fan_in_fan_out"):
        jl.import_peft(out, params, names)
    cfg_file.write_text(good)

    partial = {k: v for k, v in names.items() if "down_proj" not in k}
    with pytest.raises(ValueError, match="do not belong to a module of the map"):
        jl.import_peft(out, params, partial)

    weights = out / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        jl.import_peft(out, params, names)


def test_export_refusals_and_atomicity(tmp_root, tmp_path, monkeypatch):
    _, config, params = load_llama(tmp_root)
    names = jl.hf_module_names(config)
    adapters = randomize(METHODS["lora"]().init(jax.random.key(0), params), jax.random.key(1))
    out = jl.export_peft(tmp_path / "peft", adapters, names)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    with pytest.raises(FileExistsError, match="overwrite=True"):
        jl.export_peft(out, adapters, names)

    from jaxlora.interop import files

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(files, "save_safetensors", fail)
    with pytest.raises(OSError, match="disk full"):
        jl.export_peft(out, jax.tree_util.tree_map(jnp.zeros_like, adapters), names, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["peft"]  # no temporaries left
    monkeypatch.undo()

    with pytest.raises(KeyError, match="no Hugging Face module name"):
        jl.export_peft(tmp_path / "x", adapters, {})
    # a fully trained leaf of a module the map does not name (the final norm)
    full = jl.compose(jl.lora(rank=2, targets=".*q_proj/kernel"), jl.full(targets="final_norm/.*"))
    with pytest.raises(KeyError, match="no torch module name for the fully trained leaf"):
        jl.export_peft(tmp_path / "x", full.init(jax.random.key(0), params), names)
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------ merged


@pytest.mark.parametrize("name", ["lora", "dora", "vera"])
def test_merged_export_loads_in_transformers(tmp_root, tmp_path, name):
    _, config, params = load_llama(tmp_root)
    adapters = randomize(METHODS[name]().init(jax.random.key(0), params), jax.random.key(1))
    out = jl.export_merged(tmp_path / "merged", params, adapters, config)
    model = quiet_transformers().LlamaForCausalLM.from_pretrained(out).eval()
    ids, mask = random_batch(4, config.vocab_size)
    expected = torch_forward(model, ids, mask).logits.numpy()
    assert_close_on_real_tokens(llama_logits(params, adapters, config, ids, mask), expected, mask)


def test_merged_export_bert_and_scanned_llama(tmp_root, tmp_path):
    _, config, params = load_bert(tmp_root)
    adapters = randomize(
        jl.lora(rank=4, targets="all-linear").init(jax.random.key(0), params), jax.random.key(1)
    )
    out = jl.export_merged(tmp_path / "bert", params, adapters, config)
    model = quiet_transformers().BertModel.from_pretrained(out).eval()
    ids, mask = random_batch(5, config.vocab_size)
    expected = torch_forward(model, ids, mask).last_hidden_state.numpy()
    got = np.asarray(bert.apply(jl.merge(params, adapters), ids, mask, config=config))
    np.testing.assert_allclose(got[mask.astype(bool)], expected[mask.astype(bool)], **TOL)

    _, config, params = load_llama(tmp_root, scan=True)
    method = jl.lora(rank=4, alpha=8.0, targets=stacked(ATTN_MLP))  # (L, d_in, d_out) kernels
    adapters = randomize(method.init(jax.random.key(0), params), jax.random.key(1))
    out = jl.export_merged(tmp_path / "llama", params, adapters, config)
    back = loaders.load_llama_safetensors(out)[1]
    merged = jl.merge(params, adapters)
    np.testing.assert_array_equal(
        np.asarray(back["layers"]["0"]["attn"]["q_proj"]["kernel"]),
        np.asarray(merged["layers"]["attn"]["q_proj"]["kernel"][0]),
    )


# ------------------------------------------------------------------- quantized bases


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_adapters_trained_on_a_quantized_base_export_to_the_float_model(tmp_root, tmp_path, kind):
    import optax

    model, config, params = load_llama(tmp_root)
    block = 8 if kind == "nf4" else None  # the tiny model: widths 32 and 56
    qparams = jl.quantize(params, targets="all-linear", kind=kind, block=block)
    float_base = jl.dequantize(qparams)
    ids, mask = random_batch(6, config.vocab_size)

    def loss_fn(p, batch):
        return llama.causal_lm_loss(llama.apply(p, batch, config=config), batch)

    adapters = randomize(METHODS["lora"]().init(jax.random.key(0), qparams), jax.random.key(1))
    tx = jl.optimizer(optax.adam(1e-2))
    step, state = jl.train_step(loss_fn, tx, donate=False), tx.init(adapters)
    for _ in range(2):  # trained on the quantized base
        _, adapters, state, _ = step(qparams, adapters, state, jnp.asarray(ids))

    out = jl.export_peft(
        tmp_path / "peft", adapters, jl.hf_module_names(config), task_type="CAUSAL_LM"
    )
    # the float model of that base: its dequantized weights as a transformers checkpoint
    base_dir = jl.export_merged(tmp_path / "base", qparams, {}, config)
    float_model = quiet_transformers().LlamaForCausalLM.from_pretrained(base_dir).eval()
    expected = torch_forward(peft_load(float_model, out), ids, mask).logits.numpy()
    got = llama_logits(qparams, adapters, config, ids, mask)  # adapt on the quantized base
    assert_close_on_real_tokens(got, expected, mask)
    # and the original float model takes the same adapter files
    peft_load(model, out)

    # merged export of a quantized base: float weights, exactly merge(dequantize(base))
    merged_dir = jl.export_merged(tmp_path / "merged", qparams, adapters, config)
    back = loaders.load_llama_safetensors(merged_dir)[1]
    want = jl.merge(float_base, adapters)
    for (kp, x), (_, y) in zip(
        jax.tree_util.tree_flatten_with_path(back)[0],
        jax.tree_util.tree_flatten_with_path(want)[0],
        strict=True,
    ):
        assert x.dtype == np.float32, kp
        # export's jitted merge fuses dequantize-and-add (one rounding instead of two)
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7, err_msg=str(kp))


# ------------------------------------------------- heads (modules_to_save), wrapped trees

N_LABELS = 3


def load_classifier(tmp_root):
    """A random ``BertForSequenceClassification`` and our E1-style tree of the same weights:
    ``{"encoder": bert (with pooler), "head": {kernel, bias}}``."""
    import torch
    from _model_fixtures import randomize_
    from safetensors.numpy import load_file

    directory = tmp_root / "bert_cls"
    transformers = quiet_transformers()
    if not directory.exists():
        torch.manual_seed(0)
        hf_config = transformers.BertConfig(
            vocab_size=101,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=48,
            max_position_embeddings=40,
            num_labels=N_LABELS,
        )
        model = transformers.BertForSequenceClassification(hf_config)
        randomize_(model, 7, scale=0.3)
        model.save_pretrained(directory)
    model = transformers.BertForSequenceClassification.from_pretrained(directory).eval()
    # the loader reads the "bert." backbone; the classifier is the task's, read here
    config, encoder = loaders.load_bert_safetensors(directory, pooler=True, strict=False)
    state = load_file(str(directory / "model.safetensors"))
    head = {"kernel": state["classifier.weight"].T.copy(), "bias": state["classifier.bias"]}
    params = jax.tree_util.tree_map(jnp.asarray, {"encoder": encoder, "head": head})
    return model, config, params


def classifier_logits(params, ids, mask, *, config):
    pooled = bert.pooled_output(params["encoder"], ids, mask, config=config)
    return pooled @ params["head"]["kernel"] + params["head"]["bias"]


def classifier_names(config):
    """The module map of the wrapped tree: the backbone as ``BertForSequenceClassification``
    names it (under ``bert.``), and the head, named by hand."""
    return {**jl.hf_module_names(config, module_prefix="bert"), "head": "classifier"}


def test_head_trained_in_full_exports_as_modules_to_save(tmp_root, tmp_path):
    import optax

    model, config, params = load_classifier(tmp_root)
    fn = functools.partial(classifier_logits, config=config)
    ids, mask = random_batch(7, config.vocab_size)
    labels = jnp.asarray([0, 2, 1])

    def loss_fn(p, batch):
        logp = jax.nn.log_softmax(fn(p, *batch[:2]))
        return -jnp.mean(jnp.take_along_axis(logp, batch[2][:, None], axis=-1))

    method = jl.compose(
        jl.lora(rank=4, alpha=8.0, targets=r"encoder/.*attn/(query|value)/kernel"),
        jl.full(targets="head/.*"),
    )
    adapters = method.init(jax.random.key(0), params)
    tx = jl.optimizer(optax.adam(5e-2))
    step, state = jl.train_step(loss_fn, tx, donate=False), tx.init(adapters)
    for _ in range(3):  # trained in jaxlora: B leaves zero and the head moves
        _, adapters, state, _ = step(params, adapters, state, (ids, mask, labels))
    head = adapters["__full__"]["head"]["kernel"]
    assert np.abs(np.asarray(head - params["head"]["kernel"])).max() > 1e-2

    out = jl.export_peft(
        tmp_path / "peft", adapters, classifier_names(config), prefix="encoder", task_type="SEQ_CLS"
    )
    assert json.loads((out / "adapter_config.json").read_text())["modules_to_save"] == [
        "classifier"
    ]
    base = torch_forward(model, ids, mask).logits.numpy()
    expected = torch_forward(peft_load(model, out), ids, mask).logits.numpy()
    got = np.asarray(jax.jit(jl.adapt(fn))(params, adapters, ids, mask))
    assert np.abs(expected).max() > 0.5, "logits too small for a meaningful comparison"
    assert np.abs(base - expected).max() > 1e-2  # PEFT applied the adapter and the head
    np.testing.assert_allclose(got, expected, **TOL)

    # import gives back the same tree: the head as fully trained leaves again
    back = jl.import_peft(out, params, classifier_names(config), prefix="encoder")
    _assert_same_adapters(back, adapters)
    assert back["__full__"]["head"]["kernel"].dtype == params["head"]["kernel"].dtype


def test_import_a_classifier_trained_in_torch(tmp_root, tmp_path):
    import peft
    import torch

    model, config, params = load_classifier(tmp_root)
    torch.manual_seed(0)
    lora = peft.LoraConfig(
        task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"]
    )
    pm = peft.get_peft_model(model, lora)  # SEQ_CLS adds the classifier to modules_to_save
    ids, mask = random_batch(8, config.vocab_size)
    batch = dict(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask))
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.5)
    pm(**batch, labels=torch.tensor([1, 0, 2])).loss.backward()
    opt.step()
    pm.eval()
    pm.save_pretrained(tmp_path / "peft")
    expected = torch_forward(pm, ids, mask).logits.numpy()

    names = classifier_names(config)
    adapters = jl.import_peft(tmp_path / "peft", params, names, prefix="encoder")
    assert sorted(jl.adapters.full_leaves(adapters)) == ["head/bias", "head/kernel"]
    fn = functools.partial(classifier_logits, config=config)
    got = np.asarray(jax.jit(jl.adapt(fn))(params, adapters, ids, mask))
    np.testing.assert_allclose(got, expected, **TOL)
    before = np.asarray(fn(params, ids, mask))
    assert np.abs(before - expected).max() > 1e-2  # the step moved the head


def test_wrapped_tree_prefixes_and_their_errors(tmp_root, tmp_path):
    from safetensors.numpy import load_file

    _, config, params = load_classifier(tmp_root)
    method = jl.compose(jl.lora(rank=2, targets="all-linear"), jl.full(targets="head/.*"))
    adapters = randomize(method.init(jax.random.key(0), params), jax.random.key(1))
    bare = jl.hf_module_names(config)

    # the map keyed in the whole tree, or the bare map under prefix=: the same files
    whole = {**jl.hf_module_names(config, prefix="encoder"), "head": "classifier"}
    assert whole["encoder/layers/1/mlp/output/kernel"] == bare["layers/1/mlp/output/kernel"]
    a = jl.export_peft(tmp_path / "a", adapters, whole)
    b = jl.export_peft(tmp_path / "b", adapters, {**bare, "head": "classifier"}, prefix="encoder")
    assert (a / "adapter_config.json").read_text() == (b / "adapter_config.json").read_text()
    ta, tb = (load_file(str(d / "adapter_model.safetensors")) for d in (a, b))
    assert sorted(ta) == sorted(tb) and any(k.endswith("classifier.bias") for k in ta)
    for k in ta:
        np.testing.assert_array_equal(ta[k], tb[k], err_msg=k)

    with pytest.raises(
        ValueError, match=r"prefix 'backbone' matches nothing.*\['encoder', 'head'\]"
    ):
        jl.export_peft(tmp_path / "x", adapters, bare, prefix="backbone")
    with pytest.raises(ValueError, match="prefix 'backbone' matches nothing"):
        jl.import_peft(a, params, bare, prefix="backbone")
    with pytest.raises(ValueError, match="prefix 'backbone' matches nothing"):
        jl.export_merged(tmp_path / "x", params, adapters, config, prefix="backbone")
    # the bare map without prefix: the error says which prefix fits
    with pytest.raises(KeyError, match="pass prefix='encoder'"):
        jl.export_peft(tmp_path / "x", adapters, {**bare, "head": "classifier"})
    # a head the map does not name: the error names its path and the fix
    with pytest.raises(KeyError) as e:
        jl.export_peft(tmp_path / "x", adapters, bare, prefix="encoder")
    assert re.search(r"leaf 'head/(bias|kernel)'.* nor 'head'", e.value.args[0]), e.value
    # a head leaf with no torch counterpart
    odd = {
        **adapters,
        "__full__": {
            "head": {"kernel": adapters["__full__"]["head"]["kernel"], "gain": jnp.ones(3)}
        },
    }
    with pytest.raises(ValueError, match="'head/gain' has no torch counterpart"):
        jl.export_peft(tmp_path / "x", odd, {**bare, "head": "classifier"}, prefix="encoder")
    # a file naming a modules_to_save module the map does not know
    with pytest.raises(ValueError, match="torch module 'classifier', which the module map"):
        jl.import_peft(a, params, bare, prefix="encoder")
    assert not (tmp_path / "x").exists()

    # merged export of the sub-tree: a BertModel checkpoint of merge(params)["encoder"]
    out = jl.export_merged(tmp_path / "merged", params, adapters, config, prefix="encoder")
    model = quiet_transformers().BertModel.from_pretrained(out).eval()
    ids, mask = random_batch(9, config.vocab_size)
    expected = torch_forward(model, ids, mask).last_hidden_state.numpy()
    merged = jl.merge(params, adapters)["encoder"]
    got = np.asarray(bert.apply(merged, ids, mask, config=config))
    np.testing.assert_allclose(got[mask.astype(bool)], expected[mask.astype(bool)], **TOL)


def test_a_head_partly_trained_takes_its_frozen_leaves_from_params(tmp_root, tmp_path):
    model, config, params = load_classifier(tmp_root)
    method = jl.compose(
        jl.lora(rank=2, targets=r"encoder/.*attn/query/kernel"), jl.full(targets="head/kernel")
    )
    adapters = randomize(method.init(jax.random.key(0), params), jax.random.key(1))
    names = classifier_names(config)
    # PEFT loads a modules_to_save module whole: the frozen bias comes from params
    out = jl.export_peft(tmp_path / "peft", adapters, names, prefix="encoder", params=params)
    ids, mask = random_batch(10, config.vocab_size)
    expected = torch_forward(peft_load(model, out), ids, mask).logits.numpy()
    fn = functools.partial(classifier_logits, config=config)
    got = np.asarray(jax.jit(jl.adapt(fn))(params, adapters, ids, mask))
    np.testing.assert_allclose(got, expected, **TOL)
    # the import holds the whole module in full: the same function of the same numbers
    back = jl.import_peft(out, params, names, prefix="encoder")
    assert sorted(jl.adapters.full_leaves(back)) == ["head/bias", "head/kernel"]
    np.testing.assert_array_equal(back["__full__"]["head"]["bias"], params["head"]["bias"])


def test_stacked_and_lm_head_leaves_trained_in_full(tmp_root, tmp_path):
    model, config, params = load_llama(tmp_root, scan=True)
    ids, mask = random_batch(11, config.vocab_size)
    like = (functools.partial(llama.apply, config=config), ids)
    method = jl.compose(
        jl.lora(rank=2, alpha=4.0, targets=r".*(q|v)_proj/kernel"),
        jl.full(targets=r"(lm_head|layers/mlp/down_proj)/kernel"),  # (L, d_in, d_out) too
    )
    adapters = randomize(method.init(jax.random.key(0), params, like=like), jax.random.key(1))
    names = jl.hf_module_names(config)
    out = jl.export_peft(tmp_path / "peft", adapters, names, task_type="CAUSAL_LM")
    saved = json.loads((out / "adapter_config.json").read_text())["modules_to_save"]
    assert saved == ["lm_head"] + [f"model.layers.{i}.mlp.down_proj" for i in range(3)]
    expected = torch_forward(peft_load(model, out), ids, mask).logits.numpy()
    assert_close_on_real_tokens(llama_logits(params, adapters, config, ids, mask), expected, mask)
    _assert_same_adapters(jl.import_peft(out, params, names), adapters)


def test_readme_classifier_interop_block_runs(tmp_root, tmp_path):
    import pathlib

    text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    block = re.search(r"- A classifier: heads trained.*?```python\n(.*?)```", text, re.S)
    assert block is not None, "README's interop section has no classifier block"
    _, config, params = load_classifier(tmp_root)
    method = jl.compose(jl.lora(rank=2, targets="all-linear"), jl.full(targets="head/.*"))
    adapters = randomize(method.init(jax.random.key(0), params), jax.random.key(1))
    scope = dict(jl=jl, config=config, params=params, adapters=adapters)
    scope.update(out=tmp_path / "peft", out_merged=tmp_path / "merged")
    exec(compile(textwrap.dedent(block.group(1)), "README.md", "exec"), scope)
    _assert_same_adapters(scope["adapters"], adapters)
    assert (tmp_path / "merged" / "model.safetensors").is_file()


def test_import_heads_checks_them_against_params(tmp_path):
    params = {
        "encoder": {"dense": {"kernel": jnp.ones((4, 3))}},
        "head": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros((2,))},
    }
    method = jl.compose(jl.lora(rank=2, targets="encoder/.*"), jl.full(targets="head/.*"))
    adapters = randomize(method.init(jax.random.key(0), params), jax.random.key(1))
    names = {"dense/kernel": "fc", "head": "classifier"}
    out = jl.export_peft(tmp_path / "a", adapters, names, prefix="encoder")
    _assert_same_adapters(jl.import_peft(out, params, names, prefix="encoder"), adapters)

    wider = {**params, "head": {"kernel": jnp.ones((3, 5)), "bias": jnp.zeros((2,))}}
    with pytest.raises(ValueError, match=r"'head/kernel' are \[3, 2\].*params hold \[3, 5\]"):
        jl.import_peft(out, wider, names, prefix="encoder")
    no_bias = {**params, "head": {"kernel": jnp.ones((3, 2))}}
    with pytest.raises(ValueError, match=r"classifier\.bias' fits no single leaf of 'head'"):
        jl.import_peft(out, no_bias, names, prefix="encoder")
    # the bare map without prefix=: the error says which prefix fits
    with pytest.raises(ValueError, match="under 'encoder': pass prefix='encoder'"):
        jl.import_peft(out, params, names)
