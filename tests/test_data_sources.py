"""Data beyond tensors: dict batches with a batch_fn (model(**inputs)), variable-length
sequences padded by the user's collate function, streams of unknown length, vectorised take."""

from __future__ import annotations

from collections.abc import Iterator
from typing import ClassVar
from unittest import mock

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

import influencekit as ik
from influencekit.data import ExampleSet

from conftest import relative_error

VOCABULARY, CLASSES = 12, 3


class BagOfTokens(nn.Module):
    """A Hugging-Face-style classifier: ``model(input_ids=..., attention_mask=...)``, masked
    mean of token embeddings, then a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCABULARY, 5)
        self.head = nn.Linear(5, CLASSES)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        mask = attention_mask.unsqueeze(-1).to(self.embed.weight.dtype)
        pooled = (self.embed(input_ids) * mask).sum(dim=1) / mask.sum(dim=1)
        return self.head(torch.tanh(pooled))


def _sentences(n: int = 26) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    items = []
    for i in range(n):
        length = 2 + i % 5  # lengths 2 … 6: padding differs from batch to batch
        tokens = torch.randint(1, VOCABULARY, (length,), generator=g)
        items.append({"input_ids": tokens, "label": int(tokens.sum()) % CLASSES})
    return items


def pad(items: list[dict]) -> dict[str, Tensor]:
    """The user's collate: pad to the longest sequence of the batch, with an attention mask."""
    width = max(len(item["input_ids"]) for item in items)
    ids = torch.zeros(len(items), width, dtype=torch.long)
    mask = torch.zeros(len(items), width, dtype=torch.long)
    for row, item in enumerate(items):
        ids[row, : len(item["input_ids"])] = item["input_ids"]
        mask[row, : len(item["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask,
            "labels": torch.tensor([item["label"] for item in items])}


def split(batch: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}, \
        batch["labels"]


class Sentences(Dataset):
    def __init__(self, items: list[dict]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


class SentenceStream(IterableDataset):
    """The same sentences as a stream: no length, no random access."""

    def __init__(self, items: list[dict]) -> None:
        self.items = items

    def __iter__(self) -> Iterator[dict]:
        return iter(self.items)


def _model() -> tuple[nn.Module, ik.Objective]:
    torch.manual_seed(0)
    model = BagOfTokens().double()
    objective = ik.CrossEntropyObjective(weight_decay=0.05)
    loader = DataLoader(Sentences(_sentences()), batch_size=26, collate_fn=pad)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(150):
        for batch in loader:
            inputs, labels = split(batch)
            optimizer.zero_grad()
            loss = objective.train_loss(model(**inputs), labels).mean()
            (loss + 0.025 * sum(p.pow(2).sum() for p in model.parameters())).backward()
            optimizer.step()
    return model, objective


def _reference(model: nn.Module, objective: ik.Objective, damping: float) -> Tensor:
    """I_up,loss from a dense Hessian, every example evaluated alone, unpadded."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(th: Tensor, item: dict, test: bool = False) -> Tensor:
        params = {n: t.view(s) for n, t, s in zip(names, th.split(sizes), shapes, strict=True)}
        ids = item["input_ids"][None]
        out = torch.func.functional_call(model, params, (), {
            "input_ids": ids, "attention_mask": torch.ones_like(ids)})
        value = objective.train_loss(out, torch.tensor([item["label"]])).sum()
        return value if test else value + 0.5 * 0.05 * th.pow(2).sum()

    items = _sentences()
    H = torch.func.hessian(lambda th: sum(loss(th, item) for item in items) / len(items))(theta)
    H = H + damping * torch.eye(len(theta), dtype=theta.dtype)
    train = torch.stack([torch.func.grad(loss)(theta, item) for item in items])
    test = torch.stack([torch.func.grad(lambda th, item=item: loss(th, item, True))(theta)
                        for item in items[:4]])
    return -test @ torch.linalg.solve(H, train.T)


@pytest.fixture(scope="module")
def bag() -> tuple[nn.Module, ik.Objective, Tensor]:
    model, objective = _model()
    return model, objective, _reference(model, objective, damping=0.01)


@pytest.mark.parametrize("form", ["dataset", "stream"])
@pytest.mark.parametrize("scoring", ["layers", "gradients"])
def test_dict_batches_of_padded_sequences_give_the_dense_influence(
        bag: tuple, form: str, scoring: str) -> None:
    model, objective, expected = bag
    items = _sentences()
    data = Sentences(items) if form == "dataset" else SentenceStream(items)
    train = DataLoader(data, batch_size=5, collate_fn=pad)  # 5 does not divide 26
    test = DataLoader(Sentences(items[:4]), batch_size=3, collate_fn=pad)
    inf = ik.Influence(model, objective, train, batch_fn=split, solver=ik.CG(tol=1e-12),
                       damping=0.01, chunk_size=4, scoring=scoring).fit()
    assert len(inf.train_data) == 26 and inf.train_data.streamed == (form == "stream")
    assert relative_error(inf.influence(test), expected) < 1e-9
    assert relative_error(inf.self_influence(), torch.diagonal(
        _self_reference(model, objective))) < 1e-9


def _self_reference(model: nn.Module, objective: ik.Objective) -> Tensor:
    """Train-on-train influence (regulariser on the training side only), dense."""
    inf = ik.Influence(model, objective, DataLoader(Sentences(_sentences()), batch_size=26,
                                                    collate_fn=pad), batch_fn=split,
                       solver="direct", damping=0.01).fit()
    test = DataLoader(Sentences(_sentences()), batch_size=26, collate_fn=pad)
    return inf.influence(test)


def test_a_stream_supports_deflation_on_a_subset_and_random_access(bag: tuple) -> None:
    model, objective, _ = bag
    stream = DataLoader(SentenceStream(_sentences()), batch_size=6, collate_fn=pad)
    mapped = DataLoader(Sentences(_sentences()), batch_size=6, collate_fn=pad)
    solver = ik.CG(tol=1e-12, preconditioner=ik.Deflated(base="ekfac", rank=3, iterations=9,
                                                         subset=10))
    scores = [ik.Influence(model, objective, data, batch_fn=split, solver=solver,
                           damping=0.01).fit().influence(mapped) for data in (stream, mapped)]
    assert relative_error(scores[0], scores[1]) < 1e-10
    examples = ExampleSet(stream, batch_fn=split)
    X, y = examples.take([7, 2, 19])
    assert y.tolist() == [_sentences()[i]["label"] for i in (7, 2, 19)]
    assert X["attention_mask"].sum(dim=1).tolist() == [len(_sentences()[i]["input_ids"])
                                                        for i in (7, 2, 19)]


def test_take_is_vectorised_for_tensor_datasets_and_batched_datasets() -> None:
    examples = ExampleSet(TensorDataset(torch.arange(20.0)[:, None], torch.arange(20)))
    with mock.patch.object(TensorDataset, "__getitem__", side_effect=AssertionError("loop")):
        X, y = examples.take([3, 11, 5])
    assert X[:, 0].tolist() == [3.0, 11.0, 5.0] and y.tolist() == [3, 11, 5]

    class Batched(Dataset):
        calls: ClassVar[list[list[int]]] = []

        def __len__(self) -> int:
            return 20

        def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
            if index != 0:  # item 0 is read once to check the item format
                raise AssertionError("read one at a time")
            return torch.zeros(1), torch.tensor(0)

        def __getitems__(self, indices: list[int]) -> list[tuple[Tensor, Tensor]]:
            Batched.calls.append(indices)
            return [(torch.tensor([float(i)]), torch.tensor(i)) for i in indices]

    X, y = ExampleSet(Batched()).take([4, 9])
    assert Batched.calls == [[4, 9]] and y.tolist() == [4, 9]


def test_dict_items_without_a_batch_fn_are_refused_with_advice() -> None:
    with pytest.raises(ik.InputTypeError, match="batch_fn"):
        ExampleSet(Sentences(_sentences()))
