"""A weighted, seeded, resumable stream over several datasets (paper §3.1: the alignment stage
mixes text and image-caption tokens 50/50; instruction tuning optionally adds image-caption data).

``MixtureStream(sources, weights, *, seed)`` is an endless iterator of items
``{"tokens", "loss_mask", ..., "source": name, "index": i}``. Each source is read in a seeded
permutation, reshuffled every epoch (permutation of epoch e of source k = f(seed, k, e), so it is
recomputed on resume, never stored). Which source comes next:

- ``balance="tokens"`` (default): the source whose share of emitted tokens lags its weight the
  most (smallest emitted_tokens / weight; ties to the first source). Deterministic and exact: after
  any prefix, each source's token share is within one item of its weight. This is the 50/50
  token mixture of the alignment stage.
- ``balance="samples"``: an independent draw with probabilities = weights (seeded).

Data parallelism: with ``rank``/``world_size``, every rank walks the same global sequence (cheap:
item sizes come from ``.sizes``, items are read only when kept) and keeps steps rank, rank + W, ...;
the union over ranks is the single-process stream and token shares hold globally.

``state_dict()`` is a small JSON-able dict (step, per-source epoch / position / counts, the PCG64
state); a new stream given ``load_state_dict(state)`` continues exactly where the old one was.

Public API::

    MixtureStream(sources: dict[str, dataset], weights: dict[str, float], *, seed: int,
                  balance="tokens", shuffle=True, rank=0, world_size=1)
        iter / next -> item dict;  .state_dict();  .load_state_dict(state);  .token_shares()
"""

from __future__ import annotations

import copy
from typing import Any, Mapping

import numpy as np

BALANCES = ("tokens", "samples")


class MixtureStream:
    """Endless weighted interleaving of map-style datasets with ``len``, ``[i]`` and ``.sizes``."""

    def __init__(
        self, sources: Mapping[str, Any], weights: Mapping[str, float], *, seed: int,
        balance: str = "tokens", shuffle: bool = True, rank: int = 0, world_size: int = 1,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
        self.rank, self.world_size = int(rank), int(world_size)
        if set(sources) != set(weights):
            raise ValueError(f"sources {sorted(sources)} and weights {sorted(weights)} name different sets")
        if not sources:
            raise ValueError("a mixture needs at least one source")
        if balance not in BALANCES:
            raise ValueError(f"balance must be one of {BALANCES}, got {balance!r}")
        self.names = list(sources)
        self.sources = dict(sources)
        w = np.array([float(weights[n]) for n in self.names])
        if not np.all(np.isfinite(w)) or np.any(w <= 0):
            raise ValueError(f"weights must be finite and > 0, got {dict(weights)}")
        for n in self.names:
            if len(self.sources[n]) == 0:
                raise ValueError(f"source {n!r} is empty")
        self.weights = w / w.sum()
        self.seed = int(seed)
        self.balance = balance
        self.shuffle = shuffle
        self._rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, 0x6D6978])))
        self._step = 0
        self._epoch = [0] * len(self.names)
        self._pos = [0] * len(self.names)
        self._items = [0] * len(self.names)
        self._tokens = [0] * len(self.names)
        self._perm: list[np.ndarray | None] = [None] * len(self.names)

    # ---- order -----------------------------------------------------------------------------
    def _permutation(self, k: int) -> np.ndarray:
        if self._perm[k] is None:
            n = len(self.sources[self.names[k]])
            if self.shuffle:
                rng = np.random.default_rng([self.seed, k, self._epoch[k]])
                self._perm[k] = rng.permutation(n)
            else:
                self._perm[k] = np.arange(n)
        return self._perm[k]  # type: ignore[return-value]

    def _choose(self) -> int:
        if self.balance == "samples":
            return int(self._rng.choice(len(self.names), p=self.weights))
        lag = np.asarray(self._tokens, dtype=np.float64) / self.weights
        return int(np.argmin(lag))

    def __iter__(self) -> "MixtureStream":
        return self

    def _size(self, k: int, i: int) -> int:
        sizes = getattr(self.sources[self.names[k]], "sizes", None)
        if sizes is not None:
            return int(sizes[i])
        return int(np.asarray(self.sources[self.names[k]][i]["tokens"]).size)

    def _next_key(self) -> tuple[int, int]:
        """Advance the global (all ranks) sequence by one step without reading the item."""
        k = self._choose()
        perm = self._permutation(k)
        i = int(perm[self._pos[k]])
        self._pos[k] += 1
        if self._pos[k] == perm.size:  # epoch done: next permutation on demand
            self._pos[k] = 0
            self._epoch[k] += 1
            self._perm[k] = None
        self._items[k] += 1
        self._tokens[k] += self._size(k, i)
        self._step += 1
        return k, i

    def __next__(self) -> dict[str, Any]:
        # every rank walks the same global sequence and keeps steps rank, rank + W, ...
        while True:
            step = self._step
            k, i = self._next_key()
            if step % self.world_size == self.rank:
                break
        name = self.names[k]
        item = dict(self.sources[name][i])
        item["source"] = name
        item["index"] = i
        return item

    # ---- resume ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed, "balance": self.balance, "step": self._step, "world_size": self.world_size,
            "sources": {n: {"epoch": self._epoch[k], "pos": self._pos[k], "items": self._items[k],
                            "tokens": self._tokens[k]} for k, n in enumerate(self.names)},
            "rng": copy.deepcopy(self._rng.bit_generator.state),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if int(state["seed"]) != self.seed or state["balance"] != self.balance:
            raise ValueError(
                f"mixture state is for seed={state['seed']} balance={state['balance']}, this stream has "
                f"seed={self.seed} balance={self.balance}")
        if int(state.get("world_size", 1)) != self.world_size:
            raise ValueError(f"mixture state is for world_size={state.get('world_size')}, this stream has "
                             f"{self.world_size}")
        if set(state["sources"]) != set(self.names):
            raise ValueError(f"mixture state names sources {sorted(state['sources'])}, expected {sorted(self.names)}")
        self._step = int(state["step"])
        for k, n in enumerate(self.names):
            s = state["sources"][n]
            self._epoch[k], self._pos[k] = int(s["epoch"]), int(s["pos"])
            self._items[k], self._tokens[k] = int(s["items"]), int(s["tokens"])
            self._perm[k] = None
            if self._pos[k] >= len(self.sources[n]):
                raise ValueError(f"mixture state position {self._pos[k]} is past source {n!r} ({len(self.sources[n])} items)")
        self._rng.bit_generator.state = copy.deepcopy(dict(state["rng"]))

    def token_shares(self) -> dict[str, float]:
        """Fraction of tokens per source so far (over all ranks' global sequence)."""
        total = max(1, sum(self._tokens))
        return {n: self._tokens[k] / total for k, n in enumerate(self.names)}
