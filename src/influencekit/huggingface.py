"""Hugging Face conventions: dict batches in, an output object with ``.logits`` out.

A ``transformers`` model is called as ``model(input_ids=..., attention_mask=...)`` and returns a
``ModelOutput`` whose ``.logits`` are the outputs influencekit differentiates. Nothing here
imports ``transformers``: the conventions are recognised by shape alone, so any model that
follows them works the same way.

- :func:`model_output`: the tensor of a model's return value (itself, or its ``.logits``).
- :func:`causal_lm_batch`: the default mapping of a dict batch to ``(inputs, targets)`` for causal
  language models, used whenever a batch is a dict with ``input_ids`` (and no keys but a
  tokenizer's and ``labels``) and no ``batch_fn`` is given.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .errors import InputTypeError

IGNORE_INDEX = -100  # transformers' and torch's cross-entropy default
# the keys a tokenizer and a language-model collator produce; a dict with any other key (a
# "label" of a classification dataset, an image) needs the user's batch_fn
LANGUAGE_MODEL_KEYS = frozenset({"input_ids", "attention_mask", "labels", "token_type_ids",
                                 "position_ids"})


def model_output(result: Any) -> Tensor:
    """The output tensor of a model call: ``result`` if it is a tensor, else its ``logits``
    (an attribute, as on a ``transformers`` ``ModelOutput``, or a mapping key)."""
    if isinstance(result, Tensor):
        return result
    logits = getattr(result, "logits", None)
    if logits is None and isinstance(result, Mapping):
        logits = result.get("logits")
    if isinstance(logits, Tensor):
        return logits
    raise InputTypeError(
        f"The model returned a {type(result).__name__}; influencekit needs one tensor of "
        "outputs per batch (logits, scores or predictions), or an object with a .logits tensor "
        "(as Hugging Face models return). Wrap the model so that it returns that tensor, e.g. "
        "for outputs[0]: class Logits(nn.Module): def __init__(self, m): super().__init__(); "
        "self.m = m; def forward(self, x): return self.m(x)[0]. Then pass Logits(model).")


def is_language_model_batch(batch: Any) -> bool:
    """Whether ``batch`` is a dict batch of a language model: it has ``input_ids`` and no key
    but those of :data:`LANGUAGE_MODEL_KEYS` (anything else is the user's to map)."""
    return (isinstance(batch, Mapping) and "input_ids" in batch
            and set(batch) <= LANGUAGE_MODEL_KEYS)


def causal_lm_batch(batch: Mapping[str, Any],
                    ignore_index: int = IGNORE_INDEX) -> tuple[dict[str, Any], Tensor]:
    """A Hugging Face style batch as ``(inputs, targets)`` for a causal language model.

    inputs: every entry except ``labels`` (the model is called as ``model(**inputs)``).
    targets: ``labels`` if the batch has them; else ``input_ids`` with the padded positions
    (``attention_mask == 0``) set to ``ignore_index``, which
    :class:`~influencekit.CausalLMObjective` skips. Shapes: ``(b, T)`` each.
    """
    if not is_language_model_batch(batch):
        raise InputTypeError(f"A language-model batch is a dict with 'input_ids' and only the "
                             f"keys {sorted(LANGUAGE_MODEL_KEYS)}; got "
                             f"{type(batch).__name__}"
                             + (f" with keys {sorted(batch)}" if isinstance(batch, Mapping)
                                else "") + ".")
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    if "labels" in batch:
        return inputs, torch.as_tensor(batch["labels"])
    targets = torch.as_tensor(batch["input_ids"]).clone()
    mask = batch.get("attention_mask")
    if mask is not None:
        targets[torch.as_tensor(mask) == 0] = ignore_index
    return inputs, targets
