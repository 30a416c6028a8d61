"""Tokenising text into fixed-length model inputs.

Tokenisation goes through a ``tokenizers.Tokenizer`` (``jaxlora.models.loaders`` builds one
for each shipped model). Classification inputs are truncated by the tokenizer itself, on a
copy, so special tokens such as BERT's final ``[SEP]`` survive truncation. Causal-LM inputs
carry a ``loss_mask`` that marks the tokens to be predicted (all text tokens for plain text,
only the response for dialogues), in the convention of
``jaxlora.models.llama.causal_lm_loss``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxlora.data.core import pad_to_length

CHATML = ("<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n", "{response}<|im_end|>\n")
"""SmolLM2-Instruct's chat format: (prompt part, response part) format strings."""


def _truncating(tokenizer, max_length: int):
    from tokenizers import Tokenizer

    # A copy, so the caller's tokenizer keeps its own truncation and padding settings.
    copy = Tokenizer.from_str(tokenizer.to_str())
    copy.no_padding()
    copy.enable_truncation(max_length)
    return copy


def encode_classification(
    examples: Sequence[tuple[str, int]], tokenizer, *, max_length: int, pad_id: int = 0
) -> dict[str, np.ndarray]:
    """Tokenises ``(text, label)`` pairs for a sequence classifier.

    Args:
      examples: ``(text, label)`` pairs.
      tokenizer: a ``tokenizers.Tokenizer`` (its post-processor adds special tokens).
      max_length: the fixed sequence length; longer texts are truncated.
      pad_id: the padding id.

    Returns:
      ``input_ids`` and ``attention_mask`` int32 ``(n, max_length)``, ``labels`` int32 ``(n,)``.
    """
    encodings = _truncating(tokenizer, max_length).encode_batch([t for t, _ in examples])
    ids, mask = pad_to_length([e.ids for e in encodings], max_length, pad_id=pad_id)
    labels = np.array([label for _, label in examples], np.int32)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def encode_texts(
    texts: Sequence[str],
    tokenizer,
    *,
    max_length: int,
    eos_id: int | None = None,
    pad_id: int = 0,
) -> dict[str, np.ndarray]:
    """Tokenises plain texts for causal language modelling.

    Args:
      texts: the documents.
      tokenizer: a ``tokenizers.Tokenizer``.
      max_length: the fixed sequence length; longer texts are truncated.
      eos_id: appended to every text (before truncation) so the model learns to stop.
      pad_id: the padding id.

    Returns:
      ``input_ids``, ``attention_mask`` and ``loss_mask`` (equal to the attention mask),
      int32 ``(n, max_length)``.
    """
    suffix = [] if eos_id is None else [eos_id]
    sequences = [e.ids + suffix for e in tokenizer.encode_batch(list(texts))]
    ids, mask = pad_to_length(sequences, max_length, pad_id=pad_id)
    return {"input_ids": ids, "attention_mask": mask, "loss_mask": mask.copy()}


def encode_dialogues(
    pairs: Sequence[tuple[str, str]],
    tokenizer,
    *,
    max_length: int,
    template: tuple[str, str] = CHATML,
    pad_id: int = 0,
) -> dict[str, np.ndarray]:
    """Tokenises ``(prompt, response)`` pairs for instruction tuning.

    Prompt and response are tokenised separately and concatenated, so the boundary of the
    loss mask is exact.

    Args:
      pairs: ``(prompt, response)`` texts.
      tokenizer: a ``tokenizers.Tokenizer`` that knows the template's special tokens.
      max_length: the fixed sequence length; longer dialogues lose their end.
      template: format strings for the prompt part (with ``{prompt}``) and the response
        part (with ``{response}``).
      pad_id: the padding id.

    Returns:
      ``input_ids``, ``attention_mask`` and ``loss_mask`` (1 on response tokens only),
      int32 ``(n, max_length)``.
    """
    prompts = tokenizer.encode_batch([template[0].format(prompt=p) for p, _ in pairs])
    responses = tokenizer.encode_batch([template[1].format(response=r) for _, r in pairs])
    sequences = [p.ids + r.ids for p, r in zip(prompts, responses)]
    ids, mask = pad_to_length(sequences, max_length, pad_id=pad_id)
    response_only = [[0] * len(p.ids) + [1] * len(r.ids) for p, r in zip(prompts, responses)]
    loss_mask, _ = pad_to_length(response_only, max_length, pad_id=0)
    return {"input_ids": ids, "attention_mask": mask, "loss_mask": loss_mask}
