"""Synthetic sequence tasks, generated on the fly from a seed: state tracking and associative recall.

Every task samples ``(inputs, targets)``, both (batch, length) int64 NumPy
arrays: ``inputs`` are token ids in [0, vocab_size), ``targets`` are class ids
in [0, num_classes) at the supervised positions and ``IGNORE`` (-100, the
cross-entropy's ignore index) elsewhere. Nothing is downloaded or cached.

State-tracking tasks (parity, mod_arith, s3, s4, a5, s5) are word problems of
a finite group: token t is a group element, and the target at every position
is the product of the elements so far. Training supervises every prefix;
the score is the accuracy of the state after the whole sequence ("last").

Recall (mqar) supervises the answers to queries only; the score is the
accuracy over all queries ("queries").
"""

from __future__ import annotations

import dataclasses
import itertools
import re

import numpy as np

IGNORE = -100


def _check_length(length, name: str = "length", minimum: int = 1) -> int:
    if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {length!r}")
    return int(length)


class Task:
    """A sequence task: ``sample(rng, batch, length)`` -> (inputs, targets), (batch, length) int64 each.

    Attributes: ``name``; ``vocab_size`` (input tokens); ``num_classes``
    (targets; chance accuracy is 1 / num_classes); ``metric``: "last" (the
    final position) or "queries" (every supervised position);
    ``min_length`` (shortest valid sequence).
    """

    name: str
    vocab_size: int
    num_classes: int
    metric: str
    min_length: int = 1

    @property
    def chance(self) -> float:
        """Accuracy of uniform guessing among the classes."""
        return 1.0 / self.num_classes

    def sample(self, rng: np.random.Generator, batch: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def _check(self, rng, batch, length) -> tuple[int, int]:
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"rng must be a numpy.random.Generator; got {type(rng).__name__}")
        batch = _check_length(batch, "batch")
        length = _check_length(length, "length", self.min_length)
        return batch, length

    def describe(self) -> str:
        return self.__doc__.splitlines()[0]


class GroupWordProblem(Task):
    """Prefix products in a finite group: input g_1..g_T, target at t is g_1 g_2 ... g_t.

    ``table[a, b]`` is the index of the product "a then b"; index 0 is the
    identity. Tokens are drawn uniformly from ``tokens`` (default: every
    element), so the target at t is (nearly) uniform over the group.
    """

    metric = "last"

    def __init__(self, name: str, table: np.ndarray, tokens: np.ndarray | None = None, doc: str = ""):
        table = np.asarray(table, dtype=np.int64)
        n = table.shape[0]
        if table.shape != (n, n) or not np.all(table[0] == np.arange(n)) or not np.all(table[:, 0] == np.arange(n)):
            raise ValueError(f"table must be an (n, n) group table with the identity at index 0; got shape {table.shape}")
        self.name = name
        self.table = table
        self.tokens = np.arange(n) if tokens is None else np.asarray(tokens, dtype=np.int64)
        self.vocab_size = n
        self.num_classes = n
        self._doc = doc

    def describe(self) -> str:
        return self._doc or f"word problem of a group of order {self.num_classes}"

    def prefix_products(self, inputs: np.ndarray) -> np.ndarray:
        """The running products (batch, length) of a batch of words (batch, length)."""
        inputs = np.asarray(inputs, dtype=np.int64)
        out = np.empty_like(inputs)
        state = np.zeros(inputs.shape[0], dtype=np.int64)
        for t in range(inputs.shape[1]):
            state = self.table[state, inputs[:, t]]
            out[:, t] = state
        return out

    def sample(self, rng, batch, length):
        batch, length = self._check(rng, batch, length)
        inputs = self.tokens[rng.integers(0, len(self.tokens), size=(batch, length))]
        return inputs, self.prefix_products(inputs)


class CyclicSum(GroupWordProblem):
    """Running sum mod p (Z_p's word problem): input digits in [0, p), target the sum so far mod p."""

    def __init__(self, name: str, p: int, doc: str = ""):
        p = _check_length(p, "p", 2)
        table = (np.arange(p)[:, None] + np.arange(p)[None, :]) % p
        super().__init__(name, table, doc=doc)
        self.p = p

    def prefix_products(self, inputs):
        return np.cumsum(np.asarray(inputs, dtype=np.int64), axis=1) % self.p


def permutation_group(n: int, even_only: bool = False) -> tuple[list[tuple[int, ...]], np.ndarray]:
    """The permutations of n points (only the even ones for A_n) and their product table.

    Returns (elements, table): elements[0] is the identity, the rest in
    lexicographic order; table[a, b] is the index of "apply a, then b",
    i.e. the permutation i -> b[a[i]].
    """
    perms = [p for p in itertools.permutations(range(n)) if not even_only or _is_even(p)]
    index = {p: i for i, p in enumerate(perms)}
    table = np.array([[index[tuple(b[a[i]] for i in range(n))] for b in perms] for a in perms], dtype=np.int64)
    return perms, table


def _is_even(p: tuple[int, ...]) -> bool:
    inversions = sum(1 for i in range(len(p)) for j in range(i + 1, len(p)) if p[i] > p[j])
    return inversions % 2 == 0


class MQAR(Task):
    """Multi-query associative recall: key-value pairs, then queries of those keys; answer each value.

    A sequence of length T holds P = T // 4 pairs ``k_1 v_1 ... k_P v_P`` (P
    distinct keys) followed by T - 2P queries, each a key drawn from the pairs;
    the target at a query is its value. Token ids: keys [0, num_keys), values
    num_keys + [0, num_values); classes are value indices. Longer sequences hold
    more pairs, so evaluating at 2x-4x the training length tests both length
    generalisation and the capacity of the state.
    """

    metric = "queries"
    min_length = 4

    def __init__(self, name: str = "mqar", num_keys: int = 256, num_values: int = 64):
        self.name = name
        self.num_keys = _check_length(num_keys, "num_keys", 2)
        self.num_values = _check_length(num_values, "num_values", 2)
        self.vocab_size = num_keys + num_values
        self.num_classes = num_values

    def max_length(self) -> int:
        """The longest sequence with distinct keys: 4 * num_keys + 3."""
        return 4 * self.num_keys + 3

    def sample(self, rng, batch, length):
        batch, length = self._check(rng, batch, length)
        if length > self.max_length():
            raise ValueError(
                f"length must be at most 4 * num_keys + 3 = {self.max_length()} for task {self.name!r} "
                f"(every pair needs a distinct key); got {length}"
            )
        P = length // 4
        Q = length - 2 * P
        # P distinct keys per row: the first P of a random permutation
        keys = np.argsort(rng.random((batch, self.num_keys)), axis=1)[:, :P]
        values = rng.integers(0, self.num_values, size=(batch, P))
        which = rng.integers(0, P, size=(batch, Q))
        rows = np.arange(batch)[:, None]
        inputs = np.empty((batch, length), dtype=np.int64)
        inputs[:, 0 : 2 * P : 2] = keys
        inputs[:, 1 : 2 * P : 2] = self.num_keys + values
        inputs[:, 2 * P :] = keys[rows, which]
        targets = np.full((batch, length), IGNORE, dtype=np.int64)
        targets[:, 2 * P :] = values[rows, which]
        return inputs, targets


def _group(name: str, n: int, even_only: bool, doc: str) -> GroupWordProblem:
    _, table = permutation_group(n, even_only)
    return GroupWordProblem(name, table, doc=doc)


# name -> factory; groups are built on first use (S5's table is 120 x 120)
TASKS = {
    "parity": lambda: CyclicSum("parity", 2, "parity of the bits so far (Z_2)"),
    "mod_arith": lambda: CyclicSum("mod_arith", 3, "sum of digits in [0, 3) so far, mod 3 (Z_3)"),
    "s3": lambda: _group("s3", 3, False, "composition of permutations of 3 points (S_3, order 6)"),
    "s4": lambda: _group("s4", 4, False, "composition of permutations of 4 points (S_4, order 24)"),
    "a5": lambda: _group("a5", 5, True, "composition of even permutations of 5 points (A_5, order 60)"),
    "s5": lambda: _group("s5", 5, False, "composition of permutations of 5 points (S_5, order 120)"),
    "mqar": lambda: MQAR(),
}
_MOD = re.compile(r"^mod_arith(\d+)$")


def task_names() -> list[str]:
    """The task names :func:`get_task` accepts (``mod_arith<p>`` takes any modulus p >= 2)."""
    return list(TASKS)


def get_task(name: str) -> Task:
    """The task called ``name``: one of :func:`task_names`, or ``mod_arith<p>`` (e.g. mod_arith5)."""
    if not isinstance(name, str):
        raise TypeError(f"task name must be a str; got {type(name).__name__}")
    if name in TASKS:
        return TASKS[name]()
    m = _MOD.match(name)
    if m and int(m.group(1)) >= 2:
        p = int(m.group(1))
        return CyclicSum(name, p, f"sum of digits in [0, {p}) so far, mod {p} (Z_{p})")
    raise ValueError(f"unknown task {name!r}; expected one of {task_names()} or mod_arith<p> with p >= 2")


@dataclasses.dataclass(frozen=True)
class Scores:
    """Accuracies of one evaluation: ``score`` (the task's metric) and ``token`` (every supervised position)."""

    score: float
    token: float
    count: int


def score(task: Task, predictions: np.ndarray, targets: np.ndarray) -> Scores:
    """Accuracy of ``predictions`` (batch, length) class ids against ``targets`` under the task's metric."""
    predictions, targets = np.asarray(predictions), np.asarray(targets)
    if predictions.shape != targets.shape:
        raise ValueError(f"predictions must have the shape of targets {targets.shape}; got {predictions.shape}")
    supervised = targets != IGNORE
    token = float((predictions == targets)[supervised].mean())
    if task.metric == "last":
        last = predictions[:, -1] == targets[:, -1]
        return Scores(float(last.mean()), token, int(last.size))
    return Scores(token, token, int(supervised.sum()))
