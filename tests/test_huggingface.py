"""Hugging Face models: dict batches in, ``.logits`` out, a GPT-2 built from a config.

No weights are downloaded: the model is ``GPT2LMHeadModel(GPT2Config(...))`` with random
initialisation, trained here for a few steps on generated token sequences.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.data import DataLoader

import influencekit as ik
from influencekit.huggingface import causal_lm_batch, model_output

transformers = pytest.importorskip("transformers")

PARAMS = ["transformer.h.0.attn.c_proj"]  # 16 × 16 + 16 = 272 tracked numbers
DAMPING = 0.05


def _sequences(n: int, length: int, seed: int) -> tuple[Tensor, Tensor]:
    """Token sequences with a learnable rule (each token is the previous one plus 1 or 2, mod
    20), right-padded at random lengths; returns input ids and the attention mask."""
    g = torch.Generator().manual_seed(seed)
    steps = torch.randint(1, 3, (n, length), generator=g)
    start = torch.randint(0, 20, (n, 1), generator=g)
    ids = (start + steps.cumsum(dim=1) - steps[:, :1]) % 20
    lengths = torch.randint(length - 3, length + 1, (n,), generator=g)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    return ids * mask, mask


@pytest.fixture(scope="module")
def gpt2() -> tuple[nn.Module, dict[str, Tensor], dict[str, Tensor]]:
    config = transformers.GPT2Config(vocab_size=20, n_positions=16, n_embd=16, n_layer=1,
                                     n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).double()
    ids, mask = _sequences(24, 8, seed=1)
    train = {"input_ids": ids, "attention_mask": mask}
    objective = ik.CausalLMObjective()
    ik.training.train_steps(model, objective, train, steps=150, lr=0.01, batch_size=24)
    ik.training.minimize(model, objective, train, params=PARAMS, tol=1e-9, max_iter=500)
    model.eval()
    test_ids, test_mask = _sequences(3, 8, seed=2)
    return model, train, {"input_ids": test_ids, "attention_mask": test_mask}


def _reference(model: nn.Module, train: dict[str, Tensor], test: dict[str, Tensor]) -> Tensor:
    """Dense I_up,loss over PARAMS from first principles: losses by hand from the model's
    .logits, the Hessian by double backward (not torch.func.hessian: in torch 2.13 it is
    wrong through layer_norm with a weight)."""
    names = [n for n, _ in model.named_parameters() if n.startswith(PARAMS[0])]
    named = dict(model.named_parameters())
    shapes = [named[n].shape for n in names]
    theta = torch.cat([named[n].detach().reshape(-1) for n in names]).requires_grad_(True)

    def losses(th: Tensor, batch: dict[str, Tensor]) -> Tensor:
        pieces = th.split([s.numel() for s in shapes])
        params = {n: p.view(s) for n, p, s in zip(names, pieces, shapes, strict=True)}
        logits = functional_call(model, params, (), batch).logits
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        tokens = nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:],
                                             reduction="none", ignore_index=-100)
        return tokens.sum(dim=1)

    risk = losses(theta, train).mean()
    (gradient,) = torch.autograd.grad(risk, theta, create_graph=True)
    hessian = torch.stack([torch.autograd.grad(gradient[k], theta, retain_graph=True)[0]
                           for k in range(theta.numel())])
    hessian = (hessian + hessian.T) / 2 + DAMPING * torch.eye(theta.numel(), dtype=theta.dtype)
    rows = [torch.autograd.grad(value, theta, retain_graph=True)[0]
            for value in losses(theta, train)]
    G_train = torch.stack(rows)
    G_test = torch.stack([torch.autograd.grad(value, theta, retain_graph=True)[0]
                          for value in losses(theta, test)])
    return -(G_test @ torch.linalg.solve(hessian, G_train.T)).detach()


def test_a_gpt2_from_a_config_takes_dict_batches_and_matches_a_dense_hessian(gpt2) -> None:
    model, train, test = gpt2
    reference = _reference(model, train, test)
    for solver in ("direct", ik.CG(tol=1e-12)):
        inf = ik.Influence(model, ik.CausalLMObjective(), train, solver=solver, params=PARAMS,
                           damping=DAMPING, stationarity_tol=None).fit()
        torch.testing.assert_close(inf.influence(test), reference, rtol=1e-7, atol=1e-10)
    per_token = inf.token_influence(test, [0, 3, 5])  # padded sequences among them
    torch.testing.assert_close(per_token.totals(), reference[:, [0, 3, 5]], rtol=1e-7,
                               atol=1e-10)
    padded = train["attention_mask"][[0, 3, 5]] == 0
    assert (per_token.tokens[:, padded] == 0).all()


def _padding_collate(items: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Pads a batch to its own longest sequence, as a tokenizer's collator does."""
    length = max(int(item["attention_mask"].sum()) for item in items)
    out: dict[str, list[Tensor]] = {"input_ids": [], "attention_mask": []}
    for item in items:
        keep = int(item["attention_mask"].sum())
        for key in out:
            padded = torch.zeros(length, dtype=torch.long)
            padded[:keep] = item[key][:keep]
            out[key].append(padded)
    return {key: torch.stack(values) for key, values in out.items()}


class _LogitsOnly(nn.Module):
    """The same network called the plain way: tuple inputs, a tensor out."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def test_variable_length_batches_and_the_plain_path_give_the_same_scores(gpt2) -> None:
    model, train, test = gpt2
    objective = ik.CausalLMObjective()
    settings = {"solver": "direct", "damping": DAMPING, "stationarity_tol": None}
    dict_scores = ik.Influence(model, objective, train, params=PARAMS, **settings).fit() \
        .influence(test)
    items = [{key: value[i] for key, value in train.items()} for i in range(24)]
    loader = DataLoader(items, batch_size=5, collate_fn=_padding_collate)
    loader_scores = ik.Influence(model, objective, loader, params=PARAMS, chunk_size=5,
                                 **settings).fit().influence(test)
    torch.testing.assert_close(loader_scores, dict_scores, rtol=1e-8, atol=1e-11)
    inputs, targets = causal_lm_batch(train)
    assert (targets[train["attention_mask"] == 0] == -100).all()
    plain = _LogitsOnly(model)
    test_inputs, test_targets = causal_lm_batch(test)
    plain_scores = ik.Influence(plain, objective, ((inputs["input_ids"],
                                                    inputs["attention_mask"]), targets),
                                params=["model." + PARAMS[0]], **settings).fit() \
        .influence(((test_inputs["input_ids"], test_inputs["attention_mask"]), test_targets))
    torch.testing.assert_close(plain_scores, dict_scores, rtol=1e-8, atol=1e-11)


def test_every_solver_runs_on_the_whole_gpt2(gpt2) -> None:
    model, train, test = gpt2
    exact = ik.Influence(model, ik.CausalLMObjective(), train, solver=ik.CG(tol=1e-10),
                         damping=DAMPING, curvature="gauss-newton",
                         stationarity_tol=None).fit().influence(test)
    for solver in ("ekfac", "kfac", ik.Arnoldi(rank=20)):
        scores = ik.Influence(model, ik.CausalLMObjective(), train, solver=solver,
                              damping=DAMPING, curvature="gauss-newton",
                              stationarity_tol=None).fit().influence(test)
        assert scores.shape == exact.shape and torch.isfinite(scores).all()
        r = torch.corrcoef(torch.stack([scores.flatten(), exact.flatten()]))[0, 1]
        assert r > 0.3, (solver, float(r))


def test_labels_in_the_batch_are_the_targets_and_other_outputs_are_refused() -> None:
    ids = torch.tensor([[1, 2, 3]])
    labels = torch.tensor([[-100, 2, 3]])
    inputs, targets = causal_lm_batch({"input_ids": ids, "labels": labels})
    assert set(inputs) == {"input_ids"} and torch.equal(targets, labels)
    assert model_output({"logits": ids}) is ids
    with pytest.raises(ik.InputTypeError, match="logits"):
        model_output(("not", "a tensor"))
    with pytest.raises(ik.InputTypeError, match="input_ids"):
        causal_lm_batch({"pixel_values": ids})


def test_only_tokenizer_keys_get_the_default_mapping() -> None:
    """A dict with another key (a classification dataset's "label") is the user's to map:
    guessing would train on the wrong targets."""
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ik.InputTypeError, match="batch_fn"):
        ik.Influence(nn.Linear(3, 2), ik.CrossEntropyObjective(),
                     {"input_ids": ids, "label": torch.tensor([1])})
    classification = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                      "labels": torch.tensor([1])}
    inputs, targets = causal_lm_batch(classification)  # HF's "labels" are the targets as given
    assert set(inputs) == {"input_ids", "attention_mask"} and targets.tolist() == [1]
