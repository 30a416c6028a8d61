"""Helpers shared by the model, loader and data tests (imported, not a conftest).

Reference models come from ``transformers`` with random weights drawn at a scale where the
logits are far from uniform, so parity at 1e-4 is a real check rather than near-zero
numbers agreeing. Nothing here may touch the network: the hub is switched off before
``transformers`` is imported.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import pytest

from jaxlora import assets


def quiet_transformers():
    """Imports transformers with its progress bars and load reports switched off."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    return transformers


def require_asset(name: str):
    """The asset's path, or skip the test with the reason and the install command."""
    try:
        return assets.path(name)
    except assets.AssetNotFoundError as e:
        pytest.skip(str(e))


def randomize_(model, seed: int, scale: float = 0.2) -> None:
    """Redraws every weight of a torch model: matrices N(0, scale), vectors around 1 or 0."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            if p.ndim >= 2:
                p.copy_(noise * scale)
            elif name.endswith("bias"):
                p.copy_(noise * 0.1)
            else:  # norm scales
                p.copy_(1.0 + noise * 0.1)


def hf_llama(directory, *, seed: int = 0, **config):
    """A random ``LlamaForCausalLM`` saved with ``save_pretrained`` into ``directory``."""
    import torch

    transformers = quiet_transformers()
    defaults = dict(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=56,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=5000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**defaults, **config}))
    randomize_(model, seed)
    model.eval()
    model.save_pretrained(directory)
    return model


def hf_bert(directory, *, seed: int = 0, **config):
    """A random ``BertModel`` (with pooler) saved with ``save_pretrained`` into ``directory``."""
    import torch

    transformers = quiet_transformers()
    defaults = dict(
        vocab_size=101,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=40,
        type_vocab_size=2,
        layer_norm_eps=1e-12,
    )
    torch.manual_seed(seed)
    model = transformers.BertModel(transformers.BertConfig(**{**defaults, **config}))
    randomize_(model, seed)
    model.eval()
    model.save_pretrained(directory)
    return model


def random_batch(seed: int, vocab: int, batch: int = 3, seq: int = 11):
    """Token ids and a right-padded mask (row 0 full, the others shorter)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, size=(batch, seq)).astype(np.int32)
    lengths = [seq, *rng.integers(2, seq, size=batch - 1)]
    mask = (np.arange(seq)[None, :] < np.array(lengths)[:, None]).astype(np.int32)
    return ids, mask


def torch_forward(model, ids: np.ndarray, mask: np.ndarray | None = None):
    """Runs a transformers model on numpy inputs without gradients."""
    import torch

    with torch.no_grad():
        kwargs = {"attention_mask": torch.from_numpy(mask).long()} if mask is not None else {}
        return model(input_ids=torch.from_numpy(ids).long(), **kwargs)


_TUNIX_LLAMA3 = []


def tunix_llama3():
    """Tunix's NNX Llama 3 model module (``tunix/models/llama3/model.py``), a third-party model.

    ``google-tunix`` is installed ``--no-deps`` (requirements-assets.txt): its top-level
    package and its ``tunix.models.llama3`` package import its trainers and checkpoint
    loaders (grain, datasets, metrax, ...), which the model file never uses. So the parent
    packages are registered as bare namespaces just long enough to execute the model file,
    then removed again, so no other code sees a half-imported ``tunix``.
    """
    if _TUNIX_LLAMA3:
        return _TUNIX_LLAMA3[0]
    import importlib
    import sys
    import types

    model_file = require_asset("tunix")
    root = model_file.parents[2]
    stubs = [("tunix", root), ("tunix.models", root / "models")]
    stubs.append(("tunix.models.llama3", root / "models" / "llama3"))
    assert not any(name in sys.modules for name, _ in stubs)
    try:
        for name, where in stubs:
            mod = types.ModuleType(name)
            mod.__path__ = [str(where)]
            sys.modules[name] = mod
        module = importlib.import_module("tunix.models.llama3.model")
    finally:
        for name in [n for n in sys.modules if n == "tunix" or n.startswith("tunix.")]:
            del sys.modules[name]
    _TUNIX_LLAMA3.append(module)
    return module
