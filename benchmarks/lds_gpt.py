"""Linear datamodeling score (LDS) of every method on a small character-level GPT, in one run.

Text: the documentation topics that ship with Python (``pydoc_data.topics``, about 465k
characters; topics in sorted order joined by newlines), one token per character (103
characters). Training sequences: the first ``--train`` non-overlapping 64-character windows;
query sequences: ``--queries`` windows from the last 10% of the text, never trained on.

Model (``TinyGPT``): token and position embeddings, ``--layers`` pre-norm blocks (d_model 128,
4 heads, causal scaled-dot-product attention with separate nn.Linear q, k, v and output
projections; GELU MLP 128-512-128), a final LayerNorm and a linear head. Training (``train``):
Adam lr 3e-3, batch 32, ``--epochs`` epochs over the given sequences, seeded; the loss is
influencekit's CausalLMObjective (next-character cross-entropy summed over each sequence)
with weight decay 1e-4.

Ground truth (cached in ``OUT/lds-gpt-truth``, resumable): ``--subsets`` random halves of the
training sequences, each trained from scratch with its own seed; the measurement is each query
sequence's summed loss. Methods score the seed-0 model trained on all sequences with the
Gauss-Newton curvature (the model is not at a minimum of its loss) and damping ``--damping``;
ensembles average ``--members`` models trained on all sequences with seeds 0, 1, ...

    .bench-venv/bin/python benchmarks/lds_gpt.py --out outputs/bench
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import lds_common  # noqa: E402

import influencekit as ik  # noqa: E402
from influencekit.randomness import seeded  # noqa: E402
from influencekit.validation import loss_measurement, retrain_on_subsets  # noqa: E402

LENGTH = 64
RECIPE = "v1"  # bump when the data, model or training changes: the truth's key holds it


def corpus() -> tuple[Tensor, int]:
    """The encoded text ``(N,)`` int64 and the vocabulary size."""
    import pydoc_data.topics

    text = "\n".join(pydoc_data.topics.topics[key] for key in sorted(pydoc_data.topics.topics))
    alphabet = sorted(set(text))
    index = {c: i for i, c in enumerate(alphabet)}
    return torch.tensor([index[c] for c in text], dtype=torch.long), len(alphabet)


def sequences(train: int, queries: int) -> tuple[Tensor, Tensor, int]:
    ids, vocabulary = corpus()
    windows = ids[: len(ids) // LENGTH * LENGTH].reshape(-1, LENGTH)
    held_out = windows[int(0.9 * len(windows)):]
    step = max(1, len(held_out) // queries)
    return windows[:train], held_out[::step][:queries], vocabulary


class Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.q, self.k, self.v = (nn.Linear(width, width) for _ in range(3))
        self.o = nn.Linear(width, width)
        self.fc1, self.fc2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, h: Tensor) -> Tensor:
        b, T, d = h.shape
        x = self.norm1(h)

        def split(t: Tensor) -> Tensor:
            return t.reshape(b, T, self.heads, d // self.heads).transpose(1, 2)

        a = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)),
                                           is_causal=True)
        h = h + self.o(a.transpose(1, 2).reshape(b, T, d))
        return h + self.fc2(F.gelu(self.fc1(self.norm2(h))))


class TinyGPT(nn.Module):
    def __init__(self, vocabulary: int, layers: int = 2, width: int = 128, heads: int = 4
                 ) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocabulary, width)
        self.positions = nn.Embedding(LENGTH, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocabulary)

    def forward(self, ids: Tensor) -> Tensor:
        T = ids.shape[1]
        h = self.tokens(ids) + self.positions(torch.arange(T, device=ids.device))
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))


def objective() -> ik.CausalLMObjective:
    return ik.CausalLMObjective(weight_decay=1e-4)


def train(ids: Tensor, vocabulary: int, layers: int, epochs: int, seed: int) -> nn.Module:
    """The training recipe on the sequences ``ids`` (n, T)."""
    with seeded(seed):
        model = TinyGPT(vocabulary, layers)
    steps = math.ceil(epochs * len(ids) / 32)
    ik.training.train_steps(model, objective(), (ids, ids), steps=steps, lr=3e-3, batch_size=32,
                            seed=seed)
    return model.eval()


def ground_truth_store(train_on, queries: Tensor, args: argparse.Namespace,
                       progress: bool = False, share: tuple[int, int] = (0, 1)):
    """The subset-retraining ground truth in ``OUT/lds-gpt-truth`` (computed where missing with
    ``train_on(indices, seed)``); its key holds the recipe and the settings it depends on."""
    key = (f"lds_gpt {RECIPE}: train {args.train}, queries {args.queries}, layers "
           f"{args.layers}, epochs {args.epochs}")
    return retrain_on_subsets(train_on, loss_measurement(objective(), (queries, queries)),
                              n=args.train, subsets=args.subsets,
                              out=Path(args.out) / "lds-gpt-truth", key=key, progress=progress,
                              share=share)


def _influence(model: nn.Module, ids: Tensor, solver, damping: float) -> ik.Influence:
    return ik.Influence(model, objective(), (ids, ids), solver=solver, damping=damping,
                        curvature="gauss-newton", stationarity_tol=None, chunk_size=32)


def _kronfluence(model: nn.Module, ids: Tensor, queries: Tensor, damping: float) -> Tensor:
    """kronfluence EK-FAC as its documentation sets up a language model: summed token
    cross-entropy as the training loss (labels sampled from the model when ``sample``: the true
    Fisher), the query's summed loss as the measurement, nn.Linear modules."""
    import logging

    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from torch.utils.data import TensorDataset

    class LanguageModelTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            (tokens,) = batch
            logits = model(tokens)[:, :-1].reshape(-1, model.head.out_features)
            labels = tokens[:, 1:].reshape(-1)
            if sample:
                with torch.no_grad():
                    labels = torch.multinomial(torch.softmax(logits.detach(), -1), 1).flatten()
            return F.cross_entropy(logits, labels, reduction="sum")

        def compute_measurement(self, batch, model):
            (tokens,) = batch
            logits = model(tokens)[:, :-1].reshape(-1, model.head.out_features)
            return F.cross_entropy(logits, tokens[:, 1:].reshape(-1), reduction="sum")

    torch.manual_seed(0)
    task = LanguageModelTask()
    wrapped = prepare_model(copy.deepcopy(model), task)
    with tempfile.TemporaryDirectory() as folder:
        analyzer = Analyzer(analysis_name="gpt", model=wrapped, task=task, cpu=True,
                            disable_tqdm=True, output_dir=folder, log_level=logging.WARNING)
        analyzer.fit_all_factors(factors_name="ekfac", dataset=TensorDataset(ids),
                                 per_device_batch_size=32,
                                 factor_args=FactorArguments(strategy="ekfac"),
                                 overwrite_output_dir=True)
        analyzer.compute_pairwise_scores(
            scores_name="ekfac", factors_name="ekfac", query_dataset=TensorDataset(queries),
            train_dataset=TensorDataset(ids), per_device_query_batch_size=len(queries),
            per_device_train_batch_size=32, score_args=ScoreArguments(damping_factor=damping),
            overwrite_output_dir=True)
        scores = analyzer.load_pairwise_scores(scores_name="ekfac")["all_modules"]
    # kronfluence's sum of token losses is our per-sequence loss, its damping is added to the
    # same mean-scale curvature; its sign is ours negated
    return -scores.detach().double()


def _trak(models: list[nn.Module], ids: Tensor, queries: Tensor, proj_dim: int = 512,
          regularization: float = 0.0) -> Tensor:
    """dattri's TRAK over the given models: the summed token loss as the output function,
    exp(−mean token loss) as the probability of the "correct" output; dattri's defaults are
    ``proj_dim`` 512 and ``regularization`` 0 (added to the projected kernel ΦᵀΦ)."""
    from dattri.algorithm.trak import TRAKAttributor
    from dattri.task import AttributionTask
    from torch.utils.data import DataLoader, TensorDataset

    model = models[0]

    def sequence_loss(params, batch):
        (tokens,) = batch
        logits = torch.func.functional_call(model, params, (tokens.unsqueeze(0),))[0, :-1]
        return F.cross_entropy(logits, tokens[1:], reduction="sum")

    def probability(params, batch):
        (tokens,) = batch
        logits = torch.func.functional_call(model, params, (tokens.unsqueeze(0),))[0, :-1]
        return torch.exp(-F.cross_entropy(logits, tokens[1:]))

    states = [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in models]
    task = AttributionTask(loss_func=sequence_loss, model=model, checkpoints=states)
    attributor = TRAKAttributor(task=task, correct_probability_func=probability, device="cpu",
                                regularization=regularization,
                                projector_kwargs={"device": "cpu", "proj_dim": proj_dim})
    with torch.no_grad():
        attributor.cache(DataLoader(TensorDataset(ids), batch_size=32, shuffle=False))
        scores = attributor.attribute(DataLoader(TensorDataset(queries), batch_size=32,
                                                 shuffle=False))
    # features are gradients of the loss on both sides: a positive score = helpful; negated
    return -scores.detach().T.double()


class _NextTokenLogits(nn.Module):
    """The GPT's logits for positions 0..T−2, shape (B, T−1, V): the predictions of tokens
    1..T−1, so that a peer's ``loss(model(x), y)`` with ``y = ids[:, 1:]`` is the causal LM."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: Tensor) -> Tensor:
        return self.model(ids)[:, :-1]


def _summed_token_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-sequence summed next-token cross-entropy, mean over the batch: the mean-scale loss
    whose Hessian influencekit's CausalLMObjective uses (its damping is on this scale)."""
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten(), reduction="sum") / len(
        logits)


def _pydvl(model: nn.Module, ids: Tensor, queries: Tensor, damping: float, kind: str) -> Tensor:
    """pyDVL 0.10 as benchmarks/peers/pydvl_methods.py sets it up for the MLP: the exact
    Hessian of the batch loss over one full batch (= the mean training loss), ``regularization``
    = damping on that scale, Arnoldi rank 50 (its Krylov dimension by default, 101); or
    EkfacInfluence (update_diagonal=True), which pyDVL documents for cross-entropy models
    built of nn.Linear layers: the other parameters (embeddings, LayerNorms) are frozen, as
    pyDVL's error message asks, so its scores cover the nn.Linear modules like kronfluence's.
    Both run under PyTorch's math attention kernel, without which pyDVL's second derivatives
    fail (the CPU flash kernel has no double backward). Ours = −pyDVL."""
    from pydvl.influence import InfluenceMode
    from pydvl.influence.torch import ArnoldiInfluence, EkfacInfluence
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.data import DataLoader, TensorDataset

    wrapped = _NextTokenLogits(copy.deepcopy(model))
    loader = DataLoader(TensorDataset(ids, ids[:, 1:]), batch_size=len(ids), shuffle=False)
    if kind == "arnoldi":
        method = ArnoldiInfluence(wrapped, _summed_token_loss, regularization=damping, rank=50)
    else:
        for module in wrapped.modules():
            if not isinstance(module, nn.Linear):
                for parameter in module.parameters(recurse=False):
                    parameter.requires_grad_(False)
        method = EkfacInfluence(wrapped, update_diagonal=True, hessian_regularization=damping)
    with sdpa_kernel(SDPBackend.MATH):
        method = method.fit(loader)
        values = method.influences(queries, queries[:, 1:], ids, ids[:, 1:],
                                   mode=InfluenceMode.Up)
    return -values.detach().double()


def _dattri(model: nn.Module, ids: Tensor, queries: Tensor, damping: float, kind: str
            ) -> Tensor:
    """dattri 0.3.0's influence functions as benchmarks/peers/dattri_methods.py sets them up
    for the MLP: the task's loss is the batch mean of the per-sequence summed token loss, one
    training batch of all sequences (so the Hessian is the mean training loss's),
    ``regularization`` = damping; CG with its default 10 iterations, Arnoldi with 50 kept
    eigenpairs from 100 iterations; under PyTorch's math attention kernel, as with pyDVL.
    Ours = −dattriᵀ."""
    from dattri.algorithm.influence_function import IFAttributorArnoldi, IFAttributorCG
    from dattri.task import AttributionTask
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.data import DataLoader, TensorDataset

    def loss_func(params, batch):
        (tokens,) = batch
        tokens = tokens if tokens.dim() == 2 else tokens.unsqueeze(0)
        logits = torch.func.functional_call(model, params, (tokens,))[:, :-1]
        return _summed_token_loss(logits, tokens[:, 1:])

    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    task = AttributionTask(loss_func=loss_func, model=model, checkpoints=state)
    if kind == "cg":
        attributor = IFAttributorCG(task, device="cpu", regularization=damping)
    else:
        attributor = IFAttributorArnoldi(task, device="cpu", proj_dim=50, max_iter=100,
                                         regularization=damping)
    train = DataLoader(TensorDataset(ids), batch_size=len(ids), shuffle=False)
    with sdpa_kernel(SDPBackend.MATH):
        attributor.cache(train)
        with torch.no_grad():
            scores = attributor.attribute(train, DataLoader(TensorDataset(queries),
                                                            batch_size=len(queries)))
    return -scores.detach().T.double()


def _gradient_dot(model: nn.Module, ids: Tensor, test: tuple, damping: float) -> Tensor:
    """No curvature: −g_testᵀ g_train / damping (context row)."""
    inf = _influence(model, ids, "cg", damping).fit()
    return -(inf.test_gradients(test) @ inf.train_gradients().T).double() / damping


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="outputs/bench")
    parser.add_argument("--train", type=int, default=500)
    parser.add_argument("--queries", type=int, default=32)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--subsets", type=int, default=32)
    parser.add_argument("--members", type=int, default=5)
    parser.add_argument("--damping", type=float, default=0.1)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--skip", nargs="*", default=[],
                        help="skip methods whose name contains one of these words; the rows "
                             "run are merged into the existing JSON")
    parser.add_argument("--only", nargs="*", default=[],
                        help="run only methods whose name contains one of these words (merged "
                             "like --skip)")
    args = parser.parse_args()
    ids, queries, vocabulary = sequences(args.train, args.queries)

    def train_on(indices: Tensor, seed: int) -> nn.Module:
        return train(ids[indices], vocabulary, args.layers, args.epochs, seed % 2**31)

    def truth(share: tuple[int, int]):
        return ground_truth_store(train_on, queries, args, progress=share == (0, 1),
                                  share=share)

    if args.worker is not None:
        torch.set_num_threads(1)
        truth((args.worker, args.workers))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    lds_common.run_workers(args.workers)
    ground_truth = truth((0, 1))
    truth_seconds = time.perf_counter() - started
    torch.set_num_threads(2)
    begun = time.perf_counter()
    models = [train(ids, vocabulary, args.layers, args.epochs, seed)
              for seed in range(args.members)]
    train_seconds = (time.perf_counter() - begun) / args.members
    model = models[0]
    damping = args.damping
    table = lds_common.Table(ground_truth)
    test = (queries, queries)

    def ours(solver) -> Tensor:
        return _influence(model, ids, solver, damping).fit().influence(test).double()

    methods = {
        "influencekit EK-FAC": lambda: ours(ik.EKFAC(samples=args.samples)),
        "influencekit K-FAC": lambda: ours(ik.KFAC(samples=args.samples)),
        "influencekit CG + EK-FAC, 3 iterations": lambda: ours(ik.CG(
            preconditioner=ik.EKFAC(samples=args.samples), max_iter=3, tol=1e-12,
            verify=False)),
        "influencekit Arnoldi, rank 50": lambda: ours(ik.Arnoldi(rank=50)),
        "influencekit gradient dot product": lambda: _gradient_dot(model, ids, test, damping),
        f"influencekit EK-FAC ensemble of {args.members}": lambda: ik.Ensemble([
            _influence(m, ids, ik.EKFAC(samples=args.samples), damping).fit()
            for m in models]).influence(test),
        "kronfluence EK-FAC": lambda: _kronfluence(model, ids, queries, damping),
        "dattri TRAK, 1 model": lambda: _trak(models[:1], ids, queries),
        f"dattri TRAK, {args.members} models": lambda: _trak(models, ids, queries),
        f"dattri TRAK, {args.members} models, proj_dim 2048, regularization 1e4": lambda:
            _trak(models, ids, queries, proj_dim=2048, regularization=1e4),
        "pyDVL Arnoldi, rank 50": lambda: _pydvl(model, ids, queries, damping, "arnoldi"),
        "pyDVL EK-FAC": lambda: _pydvl(model, ids, queries, damping, "ekfac"),
        "dattri Arnoldi, 50 eigenpairs": lambda: _dattri(model, ids, queries, damping,
                                                         "arnoldi"),
        "dattri CG, 10 iterations": lambda: _dattri(model, ids, queries, damping, "cg"),
    }
    for name, work in methods.items():
        if not any(word in name for word in args.skip) and (
                not args.only or any(word in name for word in args.only)):
            table.record(name, work)
    path = out / "lds_gpt.json"
    payload = {"benchmark": "lds_gpt", "settings": vars(args) | {
                   "vocabulary": vocabulary, "length": LENGTH, "recipe": RECIPE,
                   "parameters": sum(p.numel() for p in model.parameters()),
                   "seconds_per_training_on_all_sequences": train_seconds},
               "ground_truth": {"subsets": args.subsets, "fraction": 0.5,
                                "folder": str(ground_truth.folder),
                                "seconds_this_run": truth_seconds},
               "versions": lds_common.versions()}
    lds_common.write_result(path, payload, table.rows, merge=bool(args.skip or args.only))
    merged = " (rows merged into the earlier run)" if args.skip or args.only else ""
    print(f"wrote {path}{merged}")


if __name__ == "__main__":
    main()
