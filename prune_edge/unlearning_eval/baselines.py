"""Unlearning baselines, each following its paper's recipe, scaled to MNIST-size models.

Every method starts from the same trained base (except ``retrain``, which starts from scratch, and
``sisa``, whose "base" is its own sharded ensemble) and gets the same request: the training-set ids
to forget. Hyperparameters are stated in :data:`RECIPES` (they go into the report verbatim). The
papers tune on CIFAR-scale models with SGD; our base is trained with Adam (lr 1e-3, batch 64, see
:mod:`prune_edge.train`), so the fine-tuning style methods keep Adam and batch 64 and take the
papers' epoch budgets as a fraction of the base's training (a few epochs against 15).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..models.nets import PreactNet
from ..train import TrainConfig, fit, predict_logits

# One line per method: the paper, and the recipe used here (what the report prints).
RECIPES: dict[str, dict[str, Any]] = {
    "retrain": {
        "paper": "exact unlearning: retrain from scratch without the forget set (the gold standard)",
        "recipe": "the base's own recipe (Adam lr 1e-3, batch 64, 15 epochs, weight decay 1e-4 for the MLP), same seed, retained data only",
    },
    "finetune": {
        "paper": "FT: Warnecke et al., NDSS 2023 (arXiv 2108.11577); as a baseline in Jia et al., NeurIPS 2023",
        "recipe": "continue training on the retained data: Adam lr 1e-3, batch 64, 2 epochs",
        "epochs": 2, "lr": 1e-3,
    },
    "neggrad": {
        "paper": "NegGrad / gradient ascent: Golatkar et al., CVPR 2020 (arXiv 1911.04933); Thudi et al., EuroS&P 2022",
        "recipe": "gradient ascent on the forget data only: Adam lr 1e-4, batch 64, 5 epochs",
        "epochs": 5, "lr": 1e-4,
    },
    "neggrad+": {
        "paper": "NegGrad+: Kurmanji et al., 'Towards Unbounded Machine Unlearning', NeurIPS 2023 (arXiv 2302.09880)",
        "recipe": "minimise alpha CE(retain) - (1 - alpha) CE(forget), alpha = 0.99, one forget batch per retain batch: Adam lr 1e-3, batch 64, 2 epochs over the retained data",
        "epochs": 2, "lr": 1e-3, "alpha": 0.99,
    },
    "randlabel": {
        "paper": "Random labels: Golatkar et al., CVPR 2020; Graves et al., 'Amnesiac Machine Learning', AAAI 2021",
        "recipe": "fine-tune on the retained data plus the forget data relabelled uniformly among the wrong classes (new labels each epoch): Adam lr 1e-3, batch 64, 2 epochs",
        "epochs": 2, "lr": 1e-3,
    },
    "salun": {
        "paper": "SalUn: Fan et al., ICLR 2024 (arXiv 2310.12508)",
        "recipe": "weight saliency |grad of the forget loss|, mask = top 50% of weights; random-label fine-tuning (as randlabel) updating masked weights only: Adam lr 1e-3, batch 64, 2 epochs",
        "epochs": 2, "lr": 1e-3, "sparsity": 0.5,
    },
    "l1sparse": {
        "paper": "l1-sparse: Jia et al., 'Model Sparsity Can Simplify Machine Unlearning', NeurIPS 2023 (arXiv 2304.04934)",
        "recipe": "fine-tune on the retained data with gamma_t ||theta||_1, gamma decaying linearly from 5e-4 to 0: Adam lr 1e-3, batch 64, 3 epochs",
        "epochs": 3, "lr": 1e-3, "gamma": 5e-4,
    },
    "sisa": {
        "paper": "SISA: Bourtoule et al., 'Machine Unlearning', IEEE S&P 2021 (arXiv 1912.03817)",
        "recipe": "5 disjoint shards (1 slice each), one constituent per shard with the base's recipe; prediction = mean of the constituents' probabilities; unlearning retrains from scratch every shard that holds a forget point",
        "shards": 5,
    },
}
BASELINES = tuple(RECIPES)


@dataclass
class Unlearned:
    """A method's result: logits on any input, the wall seconds of the unlearning step, bytes to ship."""

    logits: Callable[[np.ndarray], np.ndarray]
    seconds: float
    ship_bytes: int
    extra: dict[str, Any]


def _batches(n: int, batch: int, gen: torch.Generator) -> list[torch.Tensor]:
    order = torch.randperm(n, generator=gen)
    return [order[i : i + batch] for i in range(0, n, batch)]


def _param_bytes(net: nn.Module) -> int:
    return int(sum(p.numel() * p.element_size() for p in net.parameters()))


def _wrong_labels(y: np.ndarray, n_classes: int, gen: torch.Generator) -> torch.Tensor:
    """Uniform among the classes other than the true one."""
    shift = torch.randint(1, n_classes, (len(y),), generator=gen)
    return (torch.from_numpy(y) + shift) % n_classes


def _ce_epochs(net: PreactNet, xs: torch.Tensor, ys_fn: Callable[[], torch.Tensor], epochs: int, lr: float, seed: int,
               mask: dict[str, torch.Tensor] | None = None, l1: float = 0.0) -> None:
    """Plain fine-tuning loop; ``ys_fn`` gives the labels per epoch (random labels change each epoch);
    ``mask`` zeroes the gradients of unmasked weights (SalUn); ``l1`` adds a linearly decaying L1 term."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    net.train()
    for e in range(epochs):
        ys = ys_fn()
        gamma = l1 * (1 - e / max(epochs, 1))
        for idx in _batches(len(xs), 64, gen):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(net(xs[idx]), ys[idx])
            if gamma:
                loss = loss + gamma * sum(p.abs().sum() for p in net.parameters())
            loss.backward()
            if mask is not None:
                for name, p in net.named_parameters():
                    p.grad.mul_(mask[name])
            opt.step()
    net.eval()


def unlearn(
    method: str,
    base: PreactNet,
    x: np.ndarray,
    y: np.ndarray,
    forget_ids: np.ndarray,
    n_classes: int,
    config: TrainConfig,
    seed: int,
) -> Unlearned:
    """Run one baseline on the request; the returned seconds cover the unlearning step only."""
    torch.manual_seed(seed)
    keep = np.ones(len(x), bool)
    keep[forget_ids] = False
    xr, yr, xf, yf = x[keep], y[keep], x[forget_ids], y[forget_ids]
    r = RECIPES[method]
    if method == "retrain":
        net, stats = fit(xr, yr, n_classes, config, device="cpu", progress=False, desc="retrain")
        return Unlearned(lambda q: predict_logits(net, q), stats["training_seconds"], _param_bytes(net), {})
    if method == "sisa":
        return _sisa(x, y, forget_ids, n_classes, config, r["shards"], seed)
    net = copy.deepcopy(base).train()
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(seed + 1)
    txr, tyr = torch.from_numpy(xr), torch.from_numpy(yr)
    txf = torch.from_numpy(xf)
    if method == "finetune":
        _ce_epochs(net, txr, lambda: tyr, r["epochs"], r["lr"], seed)
    elif method == "l1sparse":
        _ce_epochs(net, txr, lambda: tyr, r["epochs"], r["lr"], seed, l1=r["gamma"])
    elif method == "neggrad":
        opt = torch.optim.Adam(net.parameters(), lr=r["lr"])
        tyf = torch.from_numpy(yf)
        for _ in range(r["epochs"]):
            for idx in _batches(len(txf), 64, gen):
                opt.zero_grad(set_to_none=True)
                (-nn.functional.cross_entropy(net(txf[idx]), tyf[idx])).backward()
                opt.step()
    elif method == "neggrad+":
        opt = torch.optim.Adam(net.parameters(), lr=r["lr"])
        tyf = torch.from_numpy(yf)
        a = r["alpha"]
        for _ in range(r["epochs"]):
            fb = _batches(len(txf), 64, gen)
            for i, idx in enumerate(_batches(len(txr), 64, gen)):
                j = fb[i % len(fb)]
                opt.zero_grad(set_to_none=True)
                loss = a * nn.functional.cross_entropy(net(txr[idx]), tyr[idx]) - (1 - a) * nn.functional.cross_entropy(net(txf[j]), tyf[j])
                loss.backward()
                opt.step()
    elif method in ("randlabel", "salun"):
        xs = torch.cat([txr, txf])
        mask = _saliency_mask(net, txf, torch.from_numpy(yf), r["sparsity"]) if method == "salun" else None
        _ce_epochs(net, xs, lambda: torch.cat([tyr, _wrong_labels(yf, n_classes, gen)]), r["epochs"], r["lr"], seed, mask=mask)
    else:
        raise ValueError(f"unknown baseline {method!r}: expected one of {BASELINES}")
    net.eval()
    seconds = time.perf_counter() - t0
    return Unlearned(lambda q: predict_logits(net, q), seconds, _param_bytes(net), {})


def _saliency_mask(net: PreactNet, xf: torch.Tensor, yf: torch.Tensor, sparsity: float) -> dict[str, torch.Tensor]:
    """SalUn's mask: 1 on the weights whose forget-loss gradient magnitude is in the top (1 - sparsity)
    over the whole network (one global threshold, as in the paper)."""
    net.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(net(xf), yf).backward()
    grads = {n: p.grad.detach().abs() for n, p in net.named_parameters()}
    flat = torch.cat([g.flatten() for g in grads.values()])
    thr = torch.quantile(flat, sparsity) if flat.numel() <= 16_000_000 else flat.kthvalue(int(sparsity * flat.numel())).values
    net.zero_grad(set_to_none=True)
    return {n: (g >= thr).float() for n, g in grads.items()}


class SisaEnsemble:
    """S constituents trained on disjoint shards; the ensemble's output is the log of their mean
    probabilities (so argmax = the averaged prediction and cross-entropy = the ensemble's loss)."""

    def __init__(self, nets: list[PreactNet]):
        self.nets = nets

    def logits(self, x: np.ndarray) -> np.ndarray:
        probs = np.mean([torch.softmax(torch.from_numpy(predict_logits(n, x)), 1).numpy() for n in self.nets], axis=0)
        return np.log(np.maximum(probs, 1e-30))


def sisa_shards(n: int, shards: int, seed: int) -> np.ndarray:
    """Shard of each training point: a fixed random assignment (deterministic by seed)."""
    return np.random.default_rng(seed).permutation(n) % shards


def _sisa(x, y, forget_ids, n_classes, config: TrainConfig, shards: int, seed: int) -> Unlearned:
    shard = sisa_shards(len(x), shards, seed)
    forget = np.zeros(len(x), bool)
    forget[forget_ids] = True
    nets, seconds, retrained = [], 0.0, 0
    for s in range(shards):
        rows = shard == s
        touched = bool((rows & forget).any())
        # An untouched shard keeps its original constituent: train it (not timed: it existed before the request).
        use = rows & ~forget if touched else rows
        sub_config = TrainConfig(**{**config.__dict__, "seed": config.seed * 100 + s})
        net, stats = fit(x[use], y[use], n_classes, sub_config, device="cpu", progress=False, desc=f"sisa shard {s}")
        if touched:
            seconds += stats["training_seconds"]
            retrained += 1
        nets.append(net)
    ens = SisaEnsemble(nets)
    return Unlearned(ens.logits, seconds, sum(_param_bytes(n) for n in nets) // shards * retrained,
                     {"shards": shards, "shards_retrained": retrained})
