"""One-to-one (Hungarian) matching of predictions (rows) to ground-truth columns, exact, two solvers.

  hungarian_match(cost [N, M], col_valid [M] bool, backend) -> (row_idx [M] int32, matched [M] bool)
  batched_hungarian_match(cost [B, N, M], col_valid [B, M], backend) -> ([B, M], [B, M])
  hungarian_match_many([(cost [..., N_k, M_k], col_valid [..., M_k]), ...], backend) -> [(row_idx, matched), ...]

Every valid column gets a distinct row and the total cost over valid columns is minimal. Invalid (padding)
columns get matched=False and row_idx 0. N < M is allowed statically (the config pads M = max_boxes = 1000 gts
against N = 900 queries): if more columns are valid than there are rows, exactly N of them are matched, the set
of minimal total cost (scipy's rectangular semantics), and the rest get matched=False. All entry points are
jittable and vmappable and none is differentiable: the cost goes through `lax.stop_gradient`, so calling them
inside a loss under `jax.grad` is fine. `hungarian_match_many` solves every problem of a training step (each
decoder layer and the encoder proposals, each image) together: with the SciPy solver that is ONE host callback
per step, whose problems run concurrently in a module-level thread pool (`linear_sum_assignment` releases the
GIL while it solves).

backend='jax': on-device shortest-augmenting-path solver (the O(M^2 N) Hungarian algorithm with row/column
  potentials, as in Jonker-Volgenant): columns are inserted one at a time; each insertion is a Dijkstra-like
  search over the rows with reduced costs, run as a `lax.while_loop` of at most N + 1 steps, followed by
  flipping the found augmenting path. No host round trip. Searches are short when columns prefer different
  rows; the O(M^2 N) worst case comes when all columns rank the rows alike (e.g. collapsed predictions early in
  training). When N < M, M - N dummy rows whose cost exceeds any real assignment difference stand for
  "unmatched".
backend='scipy': `scipy.optimize.linear_sum_assignment` on the host through one `jax.pure_callback` (costs are
  built and sanitized on the device, copied to the host once, solved there on the valid columns only).
backend='auto' (the config default) resolves by `jax.default_backend()` (`resolve_backend`):
  cpu -> 'scipy'. Measured (benchmarks/matching.py, numbers in README): SciPy is faster at every shape and cost
    kind there, most on contested costs (the early-training case), and the callback's copy stays in memory.
  gpu -> 'scipy'. Reasoned, not measured (no GPU was available to this project): each iteration of a
    `lax.while_loop` on XLA:GPU launches its body's kernels and copies the loop predicate to the host, so the
    device solver's many thousands of tiny sequential steps (fori over M columns x search steps) cost far more
    than one device->host copy of the stacked costs (7 sets x B x 900 x 1000 float32 = 50 MB at visdrone
    batch 2, a few ms over PCIe) plus the host solve measured here.
  tpu -> 'jax'. Reasoned, not measured: TPU while loops run on the chip without a host round trip per
    iteration, host callbacks on TPU go through the slower host-transfer path and, in multi-host runs, would
    gather every image's costs to one host; the device solver keeps the step self-contained. If a TPU run
    shows matching dominating (dense images, collapsed early predictions), set matcher.backend='scipy'.
  Anything else -> 'scipy'.

Non-finite costs (policy, same for both solvers, implemented by `sanitize_cost`): NaN and +inf mean "avoid
this pair", -inf means "prefer this pair". With lo/hi the extreme finite costs over valid columns and
m the number of valid columns, NaN/+inf become  hi + (m + 1) (hi - lo) + 1  and -inf becomes
lo - (m + 1) (hi - lo) - 1: large enough that an assignment using fewer +inf pairs (more -inf pairs) is always
preferred, yet finite, so the solver can neither loop forever nor produce NaN. Finite costs beyond
+-`COST_LIMIT` are clipped (the potentials must stay far from float32 overflow). Callers that must know
whether this happened check the `all_finite` flag returned by `sanitize_cost`.

Precision: the device solver works in the cost's float dtype (float32 unless x64 is enabled); its optimum is
exact up to float32 rounding of the potentials, i.e. ~1e-7 x the cost magnitude per column. When replacement
or dummy-row values are in play, finite costs are resolved only at the (larger) scale of those values.
The device solver also caps every search at N + 1 steps, so even corrupted input cannot hang it; the output
is always a valid injection and `matched` is only True for columns that really received a row.
"""

import concurrent.futures
import os
import threading
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize

BACKENDS = ('auto', 'jax', 'scipy')
# jax.default_backend() -> the solver 'auto' picks there (reasons in the module docstring); others get 'scipy'.
AUTO_BACKEND = {'cpu': 'scipy', 'gpu': 'scipy', 'cuda': 'scipy', 'rocm': 'scipy', 'tpu': 'jax'}

# Finite costs are clipped to +-COST_LIMIT: potentials accumulate sums of up to ~2M costs, and float32 overflows
# at 3.4e38.
COST_LIMIT = 1e30


def resolve_backend(backend: str, platform: str | None = None) -> str:
  """'auto' -> the solver for `platform` (default: jax.default_backend()); 'jax' / 'scipy' unchanged."""
  if backend not in BACKENDS:
    raise ValueError(f'matching: backend must be one of {BACKENDS}, got {backend!r}')
  if backend != 'auto':
    return backend
  return AUTO_BACKEND.get(platform or jax.default_backend(), 'scipy')


def _dominating_values(cost: jnp.ndarray, include: jnp.ndarray, num_valid: jnp.ndarray):
  """(lo - margin, hi + margin) over cost[include] with margin = (num_valid + 1) (hi - lo) + 1, clipped to
  +-COST_LIMIT: a pair costing hi + margin is worse than any exchange among the included values, so an optimum
  uses as few of them as possible (and as many lo - margin ones)."""
  any_included = jnp.any(include)
  lo = jnp.where(any_included, jnp.min(jnp.where(include, cost, jnp.inf)), 0.0)
  hi = jnp.where(any_included, jnp.max(jnp.where(include, cost, -jnp.inf)), 0.0)
  lo = jnp.clip(lo, -COST_LIMIT, COST_LIMIT)
  hi = jnp.clip(hi, -COST_LIMIT, COST_LIMIT)
  margin = (num_valid.astype(cost.dtype) + 1.0) * (hi - lo) + 1.0
  return jnp.maximum(lo - margin, -COST_LIMIT), jnp.minimum(hi + margin, COST_LIMIT)


def sanitize_cost(cost: jnp.ndarray, col_valid: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Applies the non-finite policy of this module's docstring.

  Args:
    cost: [N, M] any real dtype.
    col_valid: [M] bool.

  Returns:
    clean: [N, M] float32 (float64 for float64 input under x64), finite, invalid columns set to 0.
    all_finite: [] bool, True iff every entry in a valid column of `cost` was finite.
  """
  cost = cost.astype(jnp.promote_types(cost.dtype, jnp.float32))
  valid = jnp.broadcast_to(col_valid[None, :], cost.shape)
  finite = jnp.isfinite(cost) & valid
  prefer, avoid = _dominating_values(cost, finite, jnp.sum(col_valid))
  clean = jnp.where(jnp.isnan(cost) | (cost == jnp.inf), avoid, cost)
  clean = jnp.where(clean == -jnp.inf, prefer, clean)
  clean = jnp.where(valid, jnp.clip(clean, -COST_LIMIT, COST_LIMIT), 0.0)
  return clean, jnp.all(finite | ~valid)


def _check_inputs(cost, col_valid, backend: str) -> None:
  """Trace-time shape/argument checks with messages that name the offending value."""
  if backend not in BACKENDS:
    raise ValueError(f'hungarian_match: backend must be one of {BACKENDS}, got {backend!r}')
  if cost.ndim != 2:
    raise ValueError(f'hungarian_match: cost must be [N, M], got shape {cost.shape} '
                     '(use batched_hungarian_match for [B, N, M])')
  if col_valid.shape != cost.shape[1:]:
    raise ValueError(f'hungarian_match: col_valid must have shape ({cost.shape[1]},) to match cost {cost.shape}, '
                     f'got {col_valid.shape}')


def _solve_on_device(cost: jnp.ndarray, col_valid: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Shortest-augmenting-path Hungarian solver. cost [N, M] finite float with N >= M, col_valid [M] bool.

  Columns are inserted one by one; each insertion is Dijkstra over the rows with reduced costs
  cost - col_pot - row_pot >= 0 (0 on matched pairs), then a flip of the shortest augmenting path found.
  Arrays over rows have N + 1 entries: index N is a virtual row that holds the column being inserted, so neither
  the search nor the flip needs a special case for its start. A column's potential is stored with the row it
  owns (`owner_pot`), so updates are elementwise and move with the owner when a path is flipped.
  Potentials are updated lazily, once per search (as in Jonker-Volgenant): a row settled at distance d_j when
  the search ends at distance d shifts by d - d_j, which keeps each search step to a few [N + 1] vector ops.
  """
  num_rows, num_cols = cost.shape
  virtual = num_rows
  dtype = cost.dtype
  inf = jnp.array(jnp.inf, dtype)
  # [M, N + 1]: a column's costs to all rows are contiguous; the virtual row is never a candidate.
  col_cost = jnp.concatenate([cost.T, jnp.full((num_cols, 1), inf)], axis=1)
  max_steps = num_rows + 1  # Each search step settles a new row, so N + 1 steps always suffice.
  row_ids = jnp.arange(num_rows + 1, dtype=jnp.int32)

  def insert_column(col, state):
    owner, owner_pot, row_pot = state  # [N+1] each: owning column (-1 = free), its potential, row potential
    active = col_valid[col]
    owner = owner.at[virtual].set(col)
    owner_pot = owner_pot.at[virtual].set(0)

    # dist[j]: shortest reduced-cost distance from the new column to row j found so far (final once j is
    # settled); prev_row[j]: the settled row whose owner reached j, i.e. the augmenting path backwards.
    def search_continues(s):
      _, _, _, row, steps = s
      return active & (owner[row] >= 0) & (steps < max_steps)

    def search_step(s):
      dist, prev_row, settled, row, steps = s
      settled = settled | (row_ids == row)
      # Reduced costs under the potentials as they would be now: unsettled rows are unshifted, and the owner of
      # `row` is shifted by dist[row] (everything settled before it moved by the same amount since).
      via = col_cost[owner[row]] - owner_pot[row] - row_pot + dist[row]
      closer = ~settled & (via < dist)
      dist = jnp.where(closer, via, dist)
      prev_row = jnp.where(closer, row, prev_row)
      next_row = jnp.argmin(jnp.where(settled, inf, dist)).astype(jnp.int32)
      return dist, prev_row, settled, next_row, steps + 1

    search = (jnp.full((num_rows + 1,), inf).at[virtual].set(0), jnp.full((num_rows + 1,), virtual, jnp.int32),
              jnp.zeros((num_rows + 1,), bool), jnp.int32(virtual), jnp.int32(0))
    dist, prev_row, settled, free_row, _ = jax.lax.while_loop(search_continues, search_step, search)
    found = active & (owner[free_row] < 0)
    shift = jnp.where(settled & found, dist[free_row] - dist, 0)
    owner_pot = owner_pot + shift
    row_pot = row_pot - shift

    # Flip the augmenting path: every row on it takes the owner (and potential) of the row before it.
    def flip_continues(s):
      _, _, row, steps = s
      return found & (row != virtual) & (steps < max_steps)

    def flip_step(s):
      owner, owner_pot, row, steps = s
      before = prev_row[row]
      return owner.at[row].set(owner[before]), owner_pot.at[row].set(owner_pot[before]), before, steps + 1

    owner, owner_pot, _, _ = jax.lax.while_loop(flip_continues, flip_step,
                                                (owner, owner_pot, free_row, jnp.int32(0)))
    return owner, owner_pot, row_pot

  init = (jnp.full((num_rows + 1,), -1, jnp.int32), jnp.zeros((num_rows + 1,), dtype),
          jnp.zeros((num_rows + 1,), dtype))
  owner, _, _ = jax.lax.fori_loop(0, num_cols, insert_column, init)
  row_owner = owner[:num_rows]
  target = jnp.where(row_owner >= 0, row_owner, num_cols)  # out of range -> dropped
  row_idx = jnp.zeros((num_cols,), jnp.int32).at[target].set(jnp.arange(num_rows, dtype=jnp.int32), mode='drop')
  matched = jnp.zeros((num_cols,), bool).at[target].set(True, mode='drop') & col_valid
  return row_idx, matched


# One pool for the process, created on first use: a callback must not start threads per call, and a process
# pool cannot run inside a callback (the cost matrices would be pickled and the workers forked from a process
# that holds XLA's threads). linear_sum_assignment releases the GIL while it solves, so threads run in parallel.
_POOL = None
_POOL_LOCK = threading.Lock()


def _pool() -> concurrent.futures.ThreadPoolExecutor:
  global _POOL
  with _POOL_LOCK:
    if _POOL is None:
      _POOL = concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1,
                                                    thread_name_prefix='hungarian')
    return _POOL


class HostStats:
  """What the SciPy callback did in this process: callbacks, problems solved, seconds spent (for benchmarks)."""

  def __init__(self):
    self._lock = threading.Lock()
    self.reset()

  def reset(self) -> None:
    with self._lock:
      self.calls, self.problems, self.seconds = 0, 0, 0.0

  def add(self, problems: int, seconds: float) -> None:
    with self._lock:
      self.calls += 1
      self.problems += problems
      self.seconds += seconds


HOST_STATS = HostStats()


def _solve_one(cost: np.ndarray, col_valid: np.ndarray, row_idx: np.ndarray, matched: np.ndarray) -> None:
  """One [N, M] problem on its valid columns; writes into the [M] output rows (disjoint across problems)."""
  cols = np.flatnonzero(col_valid)
  if cols.size == 0:
    return
  rows, picked = scipy.optimize.linear_sum_assignment(cost[:, cols])
  row_idx[cols[picked]] = rows
  matched[cols[picked]] = True


def _scipy_on_host(*operands: np.ndarray, threads: bool = True) -> tuple[np.ndarray, ...]:
  """operands = (cost_0 [..., N_0, M_0], col_valid_0 [..., M_0], cost_1, col_valid_1, ...), NumPy ->
  (row_idx_0 [..., M_0] int32, matched_0 [..., M_0] bool, row_idx_1, ...). Every 2-D problem of every
  operand is one task of the thread pool (threads=False: solved in this thread, for measurements)."""
  start = time.perf_counter()
  outputs, tasks = [], []
  for cost, col_valid in zip(operands[::2], operands[1::2]):
    cost, col_valid = np.asarray(cost), np.asarray(col_valid)
    lead, num_cols = cost.shape[:-2], cost.shape[-1]
    flat_cost = cost.reshape((-1,) + cost.shape[-2:])
    flat_valid = np.broadcast_to(col_valid, lead + (num_cols,)).reshape(-1, num_cols)
    row_idx = np.zeros(flat_valid.shape, np.int32)
    matched = np.zeros(flat_valid.shape, bool)
    tasks += [(flat_cost[b], flat_valid[b], row_idx[b], matched[b]) for b in range(flat_cost.shape[0])]
    outputs += [row_idx.reshape(lead + (num_cols,)), matched.reshape(lead + (num_cols,))]
  if threads and len(tasks) > 1:
    # list() waits for every task and re-raises the first error.
    list(_pool().map(lambda task: _solve_one(*task), tasks))
  else:
    for task in tasks:
      _solve_one(*task)
  HOST_STATS.add(len(tasks), time.perf_counter() - start)
  return tuple(outputs)


def _solve_with_scipy(problems: Sequence[tuple[jnp.ndarray, jnp.ndarray]]) -> list[tuple[jnp.ndarray, jnp.ndarray]]:
  """One host callback for all problems: [(cost [..., N, M], col_valid [..., M])] -> [(row_idx, matched)]."""
  operands, out_shapes = [], []
  for cost, col_valid in problems:
    out_shape = cost.shape[:-2] + cost.shape[-1:]
    operands += [cost, jnp.broadcast_to(col_valid, out_shape)]
    out_shapes += [jax.ShapeDtypeStruct(out_shape, jnp.int32), jax.ShapeDtypeStruct(out_shape, jnp.bool_)]
  # broadcast_all: under vmap the host function receives the whole batch at once (extra leading axes).
  flat = jax.pure_callback(_scipy_on_host, tuple(out_shapes), *operands, vmap_method='broadcast_all')
  return [(flat[2 * k], flat[2 * k + 1]) for k in range(len(problems))]


def _solve_with_dummy_rows(cost: jnp.ndarray, col_valid: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Device solver for N < M: cost [N, M] finite -> (row_idx [M], matched [M]).

  Adds M - N dummy rows of one cost that dominates every real pair (see `_dominating_values`), so the optimum
  uses as few dummies as possible (none while valid columns <= N) and, given that, has minimal real cost.
  Columns left on dummy rows are reported unmatched.
  """
  num_rows, num_cols = cost.shape
  _, dummy = _dominating_values(cost, jnp.broadcast_to(col_valid[None, :], cost.shape), jnp.sum(col_valid))
  padded = jnp.concatenate([cost, jnp.full((num_cols - num_rows, num_cols), dummy, cost.dtype)], axis=0)
  row_idx, matched = _solve_on_device(padded, col_valid)
  matched = matched & (row_idx < num_rows)
  return jnp.where(matched, row_idx, 0), matched


def _device_match(clean: jnp.ndarray, col_valid: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Device solver for one sanitized problem [N, M], [M]."""
  if clean.shape[0] < clean.shape[1]:
    return _solve_with_dummy_rows(clean, col_valid)
  return _solve_on_device(clean, col_valid)


def _check_problem(index: int, cost, col_valid) -> None:
  if cost.ndim < 2:
    raise ValueError(f'hungarian_match_many: problem {index}: cost must be [..., N, M], got shape {cost.shape}')
  if col_valid.shape != cost.shape[:-2] + cost.shape[-1:]:
    raise ValueError(f'hungarian_match_many: problem {index}: col_valid must have shape '
                     f'{cost.shape[:-2] + cost.shape[-1:]} to match cost {cost.shape}, got {col_valid.shape}')


def hungarian_match_many(problems: Sequence[tuple[jnp.ndarray, jnp.ndarray | None]],
                         backend: str = 'auto') -> list[tuple[jnp.ndarray, jnp.ndarray]]:
  """`hungarian_match` of every 2-D problem in a list of batches, solved together.

  Args:
    problems: [(cost [..., N_k, M_k] real, col_valid [..., M_k] bool or None = all valid)]; any leading axes
      (e.g. [layers, batch]); shapes may differ between list entries.
    backend: 'auto' | 'jax' | 'scipy' (static). 'scipy' makes exactly one host callback for the whole list.

  Returns:
    [(row_idx [..., M_k] int32, matched [..., M_k] bool)], one pair per list entry (see `hungarian_match`).
  """
  backend = resolve_backend(backend)
  cleaned = []
  for index, (cost, col_valid) in enumerate(problems):
    cost = jnp.asarray(cost)
    lead_cols = cost.shape[:-2] + cost.shape[-1:]
    col_valid = jnp.ones(lead_cols, bool) if col_valid is None else jnp.asarray(col_valid, bool)
    _check_problem(index, cost, col_valid)
    # Guard on the device before either solver: host callback errors can pass silently on TPU.
    clean = jnp.vectorize(lambda c, v: sanitize_cost(c, v)[0], signature='(n,m),(m)->(n,m)')(
        jax.lax.stop_gradient(cost), col_valid)
    cleaned.append((clean, col_valid))
  if backend == 'scipy':
    return _solve_with_scipy(cleaned)
  return [jnp.vectorize(_device_match, signature='(n,m),(m)->(m),(m)')(clean, col_valid)
          for clean, col_valid in cleaned]


def hungarian_match(cost: jnp.ndarray, col_valid: jnp.ndarray | None = None,
                    backend: str = 'auto') -> tuple[jnp.ndarray, jnp.ndarray]:
  """Minimum-cost assignment of a distinct row to every valid column (to N of them if more are valid).

  Args:
    cost: [N, M] real (e.g. N queries x M padded ground truths). Non-finite entries: see module doc.
    col_valid: [M] bool, False for padding columns; None means all valid.
    backend: 'auto' (by platform), 'jax' (on-device solver) or 'scipy' (host callback); a static string.

  Returns:
    row_idx: [M] int32, the row assigned to each column (0 where not matched).
    matched: [M] bool, equal to col_valid unless more than N columns are valid.
  """
  cost = jnp.asarray(cost)
  col_valid = jnp.ones(cost.shape[-1:], bool) if col_valid is None else jnp.asarray(col_valid, bool)
  _check_inputs(cost, col_valid, backend)
  return hungarian_match_many([(cost, col_valid)], backend)[0]


def batched_hungarian_match(cost: jnp.ndarray, col_valid: jnp.ndarray | None = None,
                            backend: str = 'auto') -> tuple[jnp.ndarray, jnp.ndarray]:
  """`hungarian_match` over a batch: cost [B, N, M], col_valid [B, M] -> (row_idx [B, M], matched [B, M])."""
  cost = jnp.asarray(cost)
  if cost.ndim != 3:
    raise ValueError(f'batched_hungarian_match: cost must be [B, N, M], got shape {cost.shape}')
  if col_valid is None:
    col_valid = jnp.ones((cost.shape[0], cost.shape[2]), bool)
  col_valid = jnp.asarray(col_valid, bool)
  if col_valid.shape != (cost.shape[0], cost.shape[2]):
    raise ValueError(f'batched_hungarian_match: col_valid must have shape {(cost.shape[0], cost.shape[2])} '
                     f'to match cost {cost.shape}, got {col_valid.shape}')
  return hungarian_match_many([(cost, col_valid)], backend)[0]
