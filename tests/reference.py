"""An independent NumPy model of the replay semantics, for the property tests.

Written from the specification (the storage core's module docstring and the design brief),
not from flax_replay's code: plain Python lists and loops, priorities in float64, nothing
vectorised, nothing imported from flax_replay. Steps are opaque Python values (the tests use
unique integer ids), so the model says *which* step is stored or sampled where; the tests turn
ids into arrays.

The rules modelled:

* Rows and time. A buffer has R rows; every add appends the same number A of steps to each
  row. W ("written") counts the steps appended per row. A row keeps its last T steps; the
  step at absolute time t (counted from the row's first step) is stored at slot t % T.
* Items. An item (row, s) is the L steps s, ..., s + L - 1 of one row, where the start s is a
  multiple of the period P. It is valid while all its steps are written and still stored:
  s >= W - T and s + L <= W. Uniform sampling draws a valid item uniformly.
* can_sample: W >= the minimum length (or the rows are full: a minimum above a capacity that
  was rounded down to the period grid is then met by a full buffer), a valid item exists,
  and (prioritised) the total priority is positive.
* Priorities. One leaf per (row, slot): leaf = row * (T // P) + (s % T) // P. A valid item's
  leaf holds priority ** alpha, every other leaf 0. An item that becomes valid gets the
  largest raw priority recorded so far (1.0 initially); an item that stops being valid drops
  to 0. set_priorities skips entries with an out-of-range index, a negative or non-finite
  priority, a leaf holding no valid item, or (when stale updates are ignored) a version that
  is not the start of the slot's current item; among the remaining entries the last one for
  a leaf wins, and every one of them counts towards the maximum priority.
* Episodes (trajectory buffers given an episode-end signal `end(step) -> bool`, True on the
  last step of an episode). "within_episode": an item must also have no end among its steps
  s, ..., s + L - 2. "padded": an item may start on the grid or at an episode start (s = 0, or
  step s - 1 ended an episode), so slots are per step (leaf = row * T + s % T); its steps
  after the first end are padding (None here, zeros in the buffer). Validity is otherwise as
  above (all L steps written and stored); an item that is not valid has leaf 0.
* The trajectory queue: per-row FIFO of capacity T; an add that does not fit is refused
  (nothing changes); a sample returns the L oldest unread steps of every row and consumes them.
* Layouts: trajectory batches are [R, A] rows; flat/n-step batches [R?, A?] become [R or 1,
  A or 1] rows and their items have L = n + 1 (first = step 0, second = step n); item batches
  [N?, A?] are flattened row-major into the single row, L = 1.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import numpy as np


# ------------------------------------------------------------------------ storage and items
class TrajectoryModel:
    """R rows of steps with capacity T each; items of L steps on the period-P grid.

    `priority_exponent=None` models a uniform buffer; otherwise the model keeps one float64
    leaf per (row, slot) and the largest raw priority recorded.
    """

    def __init__(self, rows: int, capacity: int, sequence_length: int, period: int,
                 min_length: int, priority_exponent: Optional[float] = None,
                 ignore_stale_priorities: bool = True, counter_modulus: Optional[int] = None,
                 end: Optional[Any] = None, mode: str = "within_episode"):
        assert capacity % period == 0, "the time axis must be a multiple of the period"
        assert mode in ("within_episode", "padded")
        self.end, self.mode = end, mode
        # Storage slots: one per period, or one per step when padded windows may start at
        # any episode start.
        self.slot_period = 1 if end is not None and mode == "padded" else period
        self.rows, self.capacity = rows, capacity
        self.sequence_length, self.period, self.min_length = sequence_length, period, min_length
        self.alpha = priority_exponent
        self.ignore_stale = ignore_stale_priorities
        # Prioritised buffers count W modulo M (a multiple of T): see `counter`, `version`.
        self.counter_modulus = counter_modulus
        self.history: list[list[Any]] = [[] for _ in range(rows)]  # every step ever added
        if self.prioritised:
            self.leaves = np.zeros(rows * (capacity // self.slot_period), np.float64)
            self.max_priority = 1.0

    @property
    def prioritised(self) -> bool:
        return self.alpha is not None

    # -- what is stored
    @property
    def written(self) -> int:
        return len(self.history[0])

    @property
    def counter(self) -> int:
        """The stored step counter: W while W < M + T, else the value in [T, M + T) congruent
        to W modulo M (the specification of a counter that never overflows)."""
        w, m, t = self.written, self.counter_modulus, self.capacity
        if m is None or w < m + t:
            return w
        return (w - t) % m + t

    def version(self, s: int) -> int:
        """A sample's version of the item starting at absolute time s: s shifted like W."""
        return s - (self.written - self.counter)

    @property
    def current_index(self) -> int:
        return self.written % self.capacity

    @property
    def is_full(self) -> bool:
        return self.written >= self.capacity

    def storage(self, empty: Any = None) -> list[list[Any]]:
        """`[R][T]`: the step held by each storage slot (`empty` where nothing was written)."""
        out = [[empty] * self.capacity for _ in range(self.rows)]
        for r, steps in enumerate(self.history):
            for t in range(max(0, self.written - self.capacity), self.written):
                out[r][t % self.capacity] = steps[t]
        return out

    def find(self, step: Any) -> tuple[int, int]:
        """(row, absolute time) of a step (the tests' steps are unique)."""
        for r, steps in enumerate(self.history):
            if step in steps:
                return r, steps.index(step)
        raise KeyError(step)

    # -- items
    def is_valid(self, row: int, s: int) -> bool:
        w, t, l, p = self.written, self.capacity, self.sequence_length, self.period
        stored = 0 <= row < self.rows and s >= max(w - t, 0) and s + l <= w
        if not stored:
            return False
        if self.end is None:
            return s % p == 0
        steps = self.history[row]
        if self.mode == "padded":
            return s % p == 0 or s == 0 or bool(self.end(steps[s - 1]))
        return s % p == 0 and not any(self.end(x) for x in steps[s:s + l - 1])

    def valid_items(self) -> list[tuple[int, int]]:
        return [(r, s) for r in range(self.rows)
                for s in range(0, self.written, self.slot_period) if self.is_valid(r, s)]

    def steps(self, row: int, s: int) -> list[Any]:
        """The L steps of item (row, s); padded mode: None after the first episode end."""
        out = self.history[row][s:s + self.sequence_length]
        if self.end is not None and self.mode == "padded":
            for k, x in enumerate(out):
                if self.end(x):
                    return out[:k + 1] + [None] * (len(out) - k - 1)
        return out

    def can_sample(self) -> bool:
        long_enough = self.written >= self.min_length or self.is_full
        ok = long_enough and len(self.valid_items()) > 0
        if self.prioritised:
            ok = ok and self.leaves.sum() > 0
        return ok

    # -- add
    def add(self, rows: Sequence[Sequence[Any]]) -> None:
        """Appends `rows[r]` (A steps, the same A for every row) to row r."""
        assert len(rows) == self.rows and len({len(x) for x in rows}) == 1
        assert 1 <= len(rows[0]) <= self.capacity
        before = set(self.valid_items())
        for steps, new in zip(self.history, rows):
            steps.extend(new)
        if self.prioritised:
            after = set(self.valid_items())
            # Broken items first: a new item may take the slot of one that just left.
            for r, s in sorted(before - after):
                self.leaves[self.leaf(r, s)] = 0.0
            for r, s in sorted(after - before):
                self.leaves[self.leaf(r, s)] = self.max_priority ** self.alpha

    # -- priorities
    def leaf(self, row: int, s: int) -> int:
        q = self.slot_period
        return row * (self.capacity // q) + (s % self.capacity) // q

    def item_at_leaf(self, leaf: int) -> Optional[tuple[int, int]]:
        """The valid item whose slot is `leaf`, or None."""
        for r, s in self.valid_items():
            if self.leaf(r, s) == leaf:
                return r, s
        return None

    def set_priorities(self, indices: Sequence[int], priorities: Sequence[float],
                       versions: Optional[Sequence[int]] = None) -> None:
        if versions is None:
            versions = [None] * len(indices)
        accepted = []
        for i, p, v in zip(indices, priorities, versions):
            i, p = int(i), float(p)
            if not 0 <= i < len(self.leaves) or not math.isfinite(p) or p < 0:
                continue  # refused input (ValueError eagerly, ignored under jit)
            item = self.item_at_leaf(i)
            if item is None:
                continue  # no valid item there: stays 0
            if v is not None and self.ignore_stale and not self._same_version(int(v), item[1]):
                continue  # the slot was rewritten since the sample
            accepted.append((i, p))
        for i, p in accepted:  # in order, so the last duplicate wins
            self.leaves[i] = p ** self.alpha
        self.max_priority = max([self.max_priority] + [p for _, p in accepted])

    def _same_version(self, v: int, s: int) -> bool:
        """Versions name start times modulo M when the counter is reduced (exactly otherwise)."""
        if self.counter_modulus is None:
            return v == s
        return (v - s) % self.counter_modulus == 0

    def probabilities(self) -> np.ndarray:
        return self.leaves / self.leaves.sum()

    def min_positive_leaf(self) -> float:
        positive = self.leaves[self.leaves > 0]
        return float(positive.min()) if positive.size else math.inf


# ---------------------------------------------------------------------------------- queue
class QueueModel:
    """Per-row FIFO of capacity T; `sample` returns and consumes the L oldest unread steps."""

    def __init__(self, rows: int, capacity: int, add_length: int, sample_length: int):
        self.rows, self.capacity = rows, capacity
        self.add_length, self.sample_length = add_length, sample_length
        self.accepted: list[list[Any]] = [[] for _ in range(rows)]  # every step ever accepted
        self.read = 0  # steps consumed per row

    @property
    def size(self) -> int:
        return len(self.accepted[0]) - self.read

    @property
    def write_index(self) -> int:
        return len(self.accepted[0]) % self.capacity

    @property
    def read_index(self) -> int:
        return self.read % self.capacity

    @property
    def is_full(self) -> bool:
        return self.size == self.capacity

    def storage(self, empty: Any = None) -> list[list[Any]]:
        """`[R][T]`: accepted step k of a row sits at slot k % T (the latest such k)."""
        out = [[empty] * self.capacity for _ in range(self.rows)]
        for r, steps in enumerate(self.accepted):
            for k, step in enumerate(steps):
                out[r][k % self.capacity] = step
        return out

    def can_add(self, length: Optional[int] = None) -> bool:
        length = self.add_length if length is None else length
        return self.size + length <= self.capacity

    def add(self, rows: Sequence[Sequence[Any]]) -> bool:
        """Appends `rows[r]` to row r if every row has room; returns whether it was accepted."""
        if not self.can_add(len(rows[0])):
            return False
        for steps, new in zip(self.accepted, rows):
            steps.extend(new)
        return True

    def can_sample(self) -> bool:
        return self.size >= self.sample_length

    def sample(self) -> Optional[list[list[Any]]]:
        """`[R][L]` oldest unread steps (consumed), or None if there are not enough."""
        if not self.can_sample():
            return None
        out = [steps[self.read:self.read + self.sample_length] for steps in self.accepted]
        self.read += self.sample_length
        return out


# -------------------------------------------------------------------------------- layouts
def trajectory_capacity(max_length_time_axis: int, period: int) -> int:
    """The time axis is rounded down to a multiple of the period."""
    return max_length_time_axis - max_length_time_axis % period


def flat_geometry(max_length: int, min_length: int, add_batch_size: Optional[int],
                  n_step: int = 1) -> dict:
    """Flat and n-step buffers: `max_length` transitions over R rows, L = n + 1 steps, and (as
    in Flashbax) `min_length // R + 1` steps per row before sampling (at least L)."""
    rows = 1 if add_batch_size is None else add_batch_size
    return dict(rows=rows, capacity=max_length // rows, sequence_length=n_step + 1, period=1,
                min_length=max(min_length // rows + 1, n_step + 1))


def item_geometry(max_length: int, min_length: int) -> dict:
    """Item buffers: one row of `max_length` single-step items."""
    return dict(rows=1, capacity=max_length, sequence_length=1, period=1,
                min_length=max(min_length, 1))


def transition_rows(batch: np.ndarray, add_batches: bool, add_sequences: bool) -> list:
    """A flat / n-step user batch `[R?, A?]` of steps as `[R or 1][A or 1]` rows."""
    batch = np.asarray(batch, dtype=object)
    if not add_batches:
        batch = batch[None]
    if not add_sequences:
        batch = batch[:, None]
    return batch.tolist()


def item_rows(batch: np.ndarray) -> list:
    """An item user batch `[N?, A?]`, flattened row-major into the single row."""
    return [np.asarray(batch, dtype=object).reshape(-1).tolist()]


def n_step_return(rewards: Sequence[float], ends: Sequence[bool], gamma: float,
                  n: int) -> tuple[float, float]:
    """(sum_k gamma^k r_k up to and including the first episode end, gamma^n or 0 if an
    episode ended within the n steps); `rewards[k]`, `ends[k]` belong to step k -> k + 1."""
    ret, scale = 0.0, 1.0
    for k in range(n):
        ret += scale * float(rewards[k])
        scale *= gamma
        if ends[k]:
            return ret, 0.0
    return ret, scale


# ------------------------------------------------------------------------- frame stacking
class FrameStackModel:
    """A flat / n-step buffer with `frame_stack`: R rows of capacity T, transitions (row, t)
    from step t to step t + n, and for a stacked key the k steps t - k + 1, ..., t (oldest
    first) as that key's `first`, the k steps up to t + n as its `second`.

    Rules (from the issue, written independently of the implementation): every step of the
    transition and every frame of the deepest stack (K frames) must still be stored, so
    (row, t) is sampleable iff t - K + 1 >= max(W - T, 0) and t + n <= W - 1. can_sample:
    W >= min_length (or the rows are full) and a sampleable transition exists. With episode
    ends (`ends[step]` true: the episode ended after that step), a frame of an earlier episode
    than the stack's last step is replaced by `None` (a zero frame).
    """

    def __init__(self, rows: int, capacity: int, n_step: int, max_depth: int,
                 min_length: int):
        self.rows, self.capacity, self.n, self.k = rows, capacity, n_step, max_depth
        self.min_length = min_length
        self.history: list[list[Any]] = [[] for _ in range(rows)]

    @property
    def written(self) -> int:
        return len(self.history[0])

    def add(self, rows: Sequence[Sequence[Any]]) -> None:
        assert len(rows) == self.rows and len({len(x) for x in rows}) == 1
        for steps, new in zip(self.history, rows):
            steps.extend(new)

    def stored(self) -> list[list[Any]]:
        """`[R][T]` step at each slot (None where nothing was written): one frame per step."""
        out: list[list[Any]] = [[None] * self.capacity for _ in range(self.rows)]
        for r, steps in enumerate(self.history):
            for t in range(max(0, self.written - self.capacity), self.written):
                out[r][t % self.capacity] = steps[t]
        return out

    def sampleable(self, pair_ends: Optional[dict] = None) -> list[tuple[int, int]]:
        """With `pair_ends` (a flat buffer given episode ends): a pair whose first step ends
        an episode is not sampleable; an end among the earlier frames does not matter."""
        w, cap = self.written, self.capacity
        return [(r, t) for r in range(self.rows) for t in range(w)
                if t - self.k + 1 >= max(w - cap, 0) and t + self.n <= w - 1
                and not (pair_ends is not None and pair_ends[self.history[r][t]])]

    def can_sample(self, pair_ends: Optional[dict] = None) -> bool:
        long_enough = self.written >= self.min_length or self.written >= self.capacity
        return long_enough and bool(self.sampleable(pair_ends))

    def stack(self, row: int, t: int, depth: int, ends: Optional[dict] = None) -> list[Any]:
        """The `depth` steps up to t (oldest first); None for frames of an earlier episode."""
        steps = self.history[row]
        out = []
        for j in range(t - depth + 1, t + 1):
            earlier = ends is not None and any(ends[steps[i]] for i in range(j, t))
            out.append(None if earlier else steps[j])
        return out
