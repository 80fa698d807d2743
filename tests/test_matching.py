"""mrqm_jax.ops.matching: both backends against scipy's optimum on hypothesis-drawn costs (ties, all-equal,
masks, M == N, N < M), the non-finite policy, jit/vmap/grad, and trace-time errors.

Shapes are fixed ([12, 10], [10, 10], [8, 10], batch [3, 12, 10]) so every jitted solver compiles once.
"""

import functools

import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

from mrqm_jax.ops import matching

N, M = 12, 10
BATCH = 3
BACKENDS = ('jax', 'scipy')


@pytest.fixture(scope='module')
def match_fns():
  """backend -> jitted hungarian_match (one compile per shape)."""
  return {b: jax.jit(functools.partial(matching.hungarian_match, backend=b)) for b in BACKENDS}


@pytest.fixture(scope='module')
def batched_fns():
  return {b: jax.jit(functools.partial(matching.batched_hungarian_match, backend=b)) for b in BACKENDS}


def _optimal_total(cost: np.ndarray, col_valid: np.ndarray) -> float:
  """Reference optimum over valid columns, float64 scipy (rectangular: min(N, valid) pairs)."""
  sub = np.float64(cost)[:, col_valid]
  rows, cols = scipy.optimize.linear_sum_assignment(sub)
  return float(sub[rows, cols].sum())


def _check_valid_injection(row_idx, matched, col_valid, num_rows):
  """Rows in range and distinct; every valid column matched (N of them if more are valid), no invalid one."""
  row_idx, matched = np.asarray(row_idx), np.asarray(matched)
  assert row_idx.dtype == np.int32 and matched.dtype == bool
  assert np.all((row_idx >= 0) & (row_idx < num_rows)), row_idx
  assert not np.any(matched & ~col_valid), 'invalid column matched'
  assert int(matched.sum()) == min(num_rows, int(col_valid.sum()))
  assert len(set(row_idx[matched].tolist())) == int(matched.sum()), f'row used twice: {row_idx[matched]}'


def _total(cost, row_idx, matched):
  row_idx, matched = np.asarray(row_idx), np.asarray(matched)
  return float(np.float64(cost)[row_idx[matched], np.flatnonzero(matched)].sum())


# Integer costs in a narrow range produce many ties (several optimal assignments); floats test precision.
_tie_costs = hnp.arrays(np.float32, (N, M), elements=st.integers(0, 3).map(float))
_float_costs = hnp.arrays(np.float32, (N, M), elements=st.floats(-10, 10, width=32))
_masks = st.one_of(st.just(np.ones(M, bool)), st.just(np.zeros(M, bool)), hnp.arrays(bool, (M,)))


@hypothesis.settings(max_examples=120, deadline=None)
@hypothesis.given(cost=st.one_of(_tie_costs, _float_costs), col_valid=_masks)
def test_optimal_and_valid_against_scipy(match_fns, cost, col_valid):
  expected = _optimal_total(cost, col_valid)
  for backend, fn in match_fns.items():
    row_idx, matched = fn(cost, col_valid)
    _check_valid_injection(row_idx, matched, col_valid, N)
    assert _total(cost, row_idx, matched) == pytest.approx(expected, abs=1e-3), backend


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(cost=hnp.arrays(np.float32, (M, M), elements=st.integers(-5, 5).map(float)),
                  all_valid=st.booleans(), data=st.data())
def test_square_cost(match_fns, cost, all_valid, data):
  """M == N: with all columns valid the result is a permutation."""
  col_valid = np.ones(M, bool) if all_valid else data.draw(hnp.arrays(bool, (M,)))
  expected = _optimal_total(cost, col_valid)
  for backend, fn in match_fns.items():
    row_idx, matched = fn(cost, col_valid)
    _check_valid_injection(row_idx, matched, col_valid, M)
    assert _total(cost, row_idx, matched) == pytest.approx(expected, abs=1e-4), backend
    if all_valid:
      assert sorted(np.asarray(row_idx).tolist()) == list(range(M))


FEW_ROWS = 8  # < M: more padded columns than rows, as max_boxes > num_queries in the config


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(cost=hnp.arrays(np.float32, (FEW_ROWS, M),
                                  elements=st.sampled_from([0.0, 1.0, 2.0, 1e3, 1e3 + 1, 1e3 + 2, 1e3 + 3, 1e3 + 4])),
                  col_valid=_masks)
def test_fewer_rows_than_columns(match_fns, cost, col_valid):
  """N < M: up to N valid columns all matched; beyond that, the N columns of minimal total cost (scipy's
  rectangular optimum)."""
  expected = _optimal_total(cost, col_valid)
  for backend, fn in match_fns.items():
    row_idx, matched = fn(cost, col_valid)
    _check_valid_injection(row_idx, matched, col_valid, FEW_ROWS)
    assert _total(cost, row_idx, matched) == pytest.approx(expected, abs=1e-4), backend


def test_all_equal_costs_and_no_valid_column(match_fns):
  for backend, fn in match_fns.items():
    row_idx, matched = fn(np.full((N, M), 0.7, np.float32), np.ones(M, bool))
    _check_valid_injection(row_idx, matched, np.ones(M, bool), N)
    row_idx, matched = fn(np.random.default_rng(0).normal(size=(N, M)).astype(np.float32), np.zeros(M, bool))
    _check_valid_injection(row_idx, matched, np.zeros(M, bool), N)


def test_closed_form_diagonal(match_fns):
  """Cost 0 on a known permutation, 1 elsewhere: the unique optimum is that permutation."""
  perm = np.random.default_rng(3).permutation(N)[:M]
  cost = np.ones((N, M), np.float32)
  cost[perm, np.arange(M)] = 0.0
  for fn in match_fns.values():
    row_idx, matched = fn(cost, np.ones(M, bool))
    np.testing.assert_array_equal(np.asarray(row_idx), perm)
    assert np.all(np.asarray(matched))


# --- non-finite policy ---------------------------------------------------------------------------------------

_FORBIDDEN_WEIGHT = 1e6  # reference objective: lexicographic (number of +inf/NaN pairs, -inf pairs, finite sum)


def _lexicographic_objective(cost, rows, cols):
  picked = np.float64(cost[rows, cols])
  n_avoid = np.sum(np.isnan(picked) | (picked == np.inf))
  n_prefer = np.sum(picked == -np.inf)
  finite = picked[np.isfinite(picked)].sum()
  return n_avoid * _FORBIDDEN_WEIGHT - n_prefer * _FORBIDDEN_WEIGHT + finite


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(
    cost=hnp.arrays(np.float32, (N, M),
                    elements=st.sampled_from([0.0, 1.0, 2.0, 5.0, -3.0, np.inf, np.nan, -np.inf])),
    col_valid=_masks)
def test_non_finite_policy_is_lexicographic_optimum(match_fns, cost, col_valid):
  """+inf/NaN pairs are used only when unavoidable, -inf pairs whenever possible, then minimal finite cost."""
  ref_cost = np.nan_to_num(np.float64(cost), nan=_FORBIDDEN_WEIGHT, posinf=_FORBIDDEN_WEIGHT,
                           neginf=-_FORBIDDEN_WEIGHT)
  cols = np.flatnonzero(col_valid)
  ref_rows, ref_cols = scipy.optimize.linear_sum_assignment(ref_cost[:, cols])
  expected = _lexicographic_objective(cost, ref_rows, cols[ref_cols])
  for backend, fn in match_fns.items():
    row_idx, matched = fn(cost, col_valid)
    _check_valid_injection(row_idx, matched, col_valid, N)
    got = _lexicographic_objective(cost, np.asarray(row_idx)[cols], cols)
    assert got == pytest.approx(expected, abs=1e-6), backend


def test_sanitize_cost_flag_and_values():
  cost = jnp.array([[1.0, jnp.nan, 7.0], [jnp.inf, 2.0, -jnp.inf], [3.0, 4.0, jnp.nan]])
  clean, all_finite = matching.sanitize_cost(cost, jnp.array([True, True, False]))
  clean = np.asarray(clean)
  assert not bool(all_finite)
  assert np.all(np.isfinite(clean))
  # Finite valid range [1, 4], 2 valid columns: avoid value = 4 + 3 * 3 + 1 = 14; invalid column zeroed.
  np.testing.assert_allclose(clean, [[1, 14, 0], [14, 2, 0], [3, 4, 0]])
  _, all_finite = matching.sanitize_cost(cost, jnp.array([True, False, False]))
  assert not bool(all_finite)
  _, all_finite = matching.sanitize_cost(cost[:, :1].at[1, 0].set(0.0), jnp.array([True]))
  assert bool(all_finite)


@pytest.mark.parametrize('fill', [np.nan, np.inf, -np.inf, 3e35, -3e35])
def test_degenerate_fill_terminates_with_valid_injection(match_fns, fill):
  cost = np.full((N, M), fill, np.float32)
  cost[::3, ::2] = 1.0
  col_valid = np.ones(M, bool)
  for fn in match_fns.values():
    row_idx, matched = fn(cost, col_valid)
    _check_valid_injection(row_idx, matched, col_valid, N)


# --- transformations and errors ------------------------------------------------------------------------------


def test_batched_and_vmap_with_shared_mask(batched_fns):
  rng = np.random.default_rng(5)
  cost = rng.integers(0, 4, (BATCH, N, M)).astype(np.float32)
  col_valid = rng.random((BATCH, M)) < 0.6
  for backend, fn in batched_fns.items():
    row_idx, matched = fn(cost, col_valid)
    assert row_idx.shape == matched.shape == (BATCH, M)
    for b in range(BATCH):
      _check_valid_injection(row_idx[b], matched[b], col_valid[b], N)
      assert _total(cost[b], row_idx[b], matched[b]) == _optimal_total(cost[b], col_valid[b])
  # One mask for the whole batch (unbatched operand under vmap).
  shared = col_valid[0]
  for backend in BACKENDS:
    fn = jax.jit(jax.vmap(functools.partial(matching.hungarian_match, backend=backend), in_axes=(0, None)))
    row_idx, matched = fn(cost, shared)
    for b in range(BATCH):
      _check_valid_injection(row_idx[b], matched[b], shared, N)
      assert _total(cost[b], row_idx[b], matched[b]) == _optimal_total(cost[b], shared)


def test_usable_inside_grad():
  """The matcher sits inside a loss: grad flows through the gathered cost, not through the solver."""
  rng = np.random.default_rng(6)
  scale = jnp.asarray(rng.random((N, M)), jnp.float32)
  col_valid = jnp.asarray(rng.random(M) < 0.7)
  for backend in BACKENDS:

    def loss(x):
      cost = x * scale
      row_idx, matched = matching.hungarian_match(cost, col_valid, backend)
      return jnp.sum(jnp.where(matched, cost[row_idx, jnp.arange(M)], 0.0))

    grad = jax.jit(jax.grad(loss))(jnp.float32(2.0))
    row_idx, matched = matching.hungarian_match(2.0 * scale, col_valid, backend)
    expected = np.sum(np.where(matched, np.asarray(scale)[np.asarray(row_idx), np.arange(M)], 0.0))
    assert float(grad) == pytest.approx(expected, rel=1e-5)


def test_trace_time_errors():
  with pytest.raises(ValueError, match='col_valid must have shape'):
    matching.hungarian_match(jnp.zeros((4, 3)), jnp.ones(4, bool))
  with pytest.raises(ValueError, match='backend'):
    matching.hungarian_match(jnp.zeros((4, 3)), jnp.ones(3, bool), backend='lapjv')
  with pytest.raises(ValueError, match=r'\[N, M\]'):
    matching.hungarian_match(jnp.zeros((2, 4, 3)), jnp.ones(3, bool))
  with pytest.raises(ValueError, match='col_valid must have shape'):
    jax.jit(matching.batched_hungarian_match)(jnp.zeros((2, 3, 4)), jnp.ones((2, 3), bool))
  with pytest.raises(ValueError, match=r'\[B, N, M\]'):
    matching.batched_hungarian_match(jnp.zeros((4, 3)))


# --- all problems of a step in one call (hungarian_match_many) -------------------------------------------------


def count_callbacks(jaxpr) -> int:
  """pure_callback equations in a (closed) jaxpr, sub-jaxprs (jit, while, cond, custom_vjp) included."""
  jaxpr = getattr(jaxpr, 'jaxpr', jaxpr)
  count = 0
  for eqn in jaxpr.eqns:
    count += eqn.primitive.name == 'pure_callback'
    for param in eqn.params.values():
      for sub in (param if isinstance(param, (tuple, list)) else (param,)):
        if isinstance(sub, (jax.extend.core.Jaxpr, jax.extend.core.ClosedJaxpr)):
          count += count_callbacks(sub)
  return count


def _random_problems(seed: int):
  """Three groups with different shapes, the step's layout ([layers, batch, N, M], [batch, N, M]) and a single
  problem: integer costs with ties, NaN/+inf/-inf entries, random invalid columns (some all-invalid), N > M,
  N < M (more valid columns than rows) and N == M."""
  rng = np.random.default_rng(seed)
  shapes = [(3, 2, N, M), (2, FEW_ROWS, M), (M, M)]
  problems = []
  for shape in shapes:
    cost = rng.integers(0, 4, shape).astype(np.float32)
    special = rng.random(shape)
    cost[special < 0.05] = np.nan
    cost[(special >= 0.05) & (special < 0.08)] = np.inf
    cost[(special >= 0.08) & (special < 0.10)] = -np.inf
    col_valid = rng.random(shape[:-2] + shape[-1:]) < 0.7
    col_valid.reshape(-1, shape[-1])[0] = False          # one problem without any valid column
    problems.append((cost, col_valid))
  return problems


def _flat(cost, col_valid):
  return zip(cost.reshape((-1,) + cost.shape[-2:]), col_valid.reshape(-1, cost.shape[-1]))


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_many_in_one_callback_equals_per_problem_scipy_and_device(seed):
  problems = _random_problems(seed)
  fn = jax.jit(lambda ps: matching.hungarian_match_many(ps, 'scipy'))
  assert count_callbacks(jax.make_jaxpr(fn)(problems)) == 1
  assert count_callbacks(jax.make_jaxpr(lambda ps: matching.hungarian_match_many(ps, 'jax'))(problems)) == 0
  many = fn(problems)
  device = jax.jit(lambda ps: matching.hungarian_match_many(ps, 'jax'))(problems)
  single = {b: jax.jit(functools.partial(matching.hungarian_match, backend=b)) for b in ('scipy', 'jax')}
  for (cost, col_valid), (row_idx, matched), (dev_rows, dev_matched) in zip(problems, many, device):
    assert row_idx.shape == matched.shape == col_valid.shape
    flat_out = zip(np.asarray(row_idx).reshape(-1, cost.shape[-1]), np.asarray(matched).reshape(-1, cost.shape[-1]),
                   np.asarray(dev_rows).reshape(-1, cost.shape[-1]),
                   np.asarray(dev_matched).reshape(-1, cost.shape[-1]))
    for (c, v), (rows, ok, d_rows, d_ok) in zip(_flat(cost, col_valid), flat_out):
      # The batched callback solves exactly what the per-problem callback solves: identical answers.
      s_rows, s_ok = single['scipy'](c, v)
      np.testing.assert_array_equal(rows, np.asarray(s_rows))
      np.testing.assert_array_equal(ok, np.asarray(s_ok))
      # Against an independent optimum (the non-finite policy as a lexicographic objective) for both solvers:
      # with ties several assignments are optimal, so the objectives, not the rows, must agree.
      ref_cost = np.nan_to_num(np.float64(c), nan=_FORBIDDEN_WEIGHT, posinf=_FORBIDDEN_WEIGHT,
                               neginf=-_FORBIDDEN_WEIGHT)
      cols = np.flatnonzero(v)
      ref_rows, ref_cols = scipy.optimize.linear_sum_assignment(ref_cost[:, cols])
      expected = _lexicographic_objective(c, ref_rows, cols[ref_cols])
      for got_rows, got_ok in ((rows, ok), (d_rows, d_ok), tuple(map(np.asarray, single['jax'](c, v)))):
        _check_valid_injection(got_rows, got_ok, v, c.shape[0])
        picked = np.flatnonzero(got_ok)
        assert _lexicographic_objective(c, got_rows[picked], picked) == pytest.approx(expected, abs=1e-6)


def test_many_under_vmap_and_threads_agree():
  """vmap over the list's batch (broadcast_all: still one host call) and the pool vs one thread on the host."""
  (cost, col_valid), _, _ = _random_problems(3)
  fn = jax.jit(jax.vmap(lambda c, v: matching.hungarian_match_many([(c, v), (c[..., :FEW_ROWS, :], v)],
                                                                   'scipy')))
  assert count_callbacks(jax.make_jaxpr(fn)(cost, col_valid)) == 1
  out = fn(cost, col_valid)
  ref = [matching.hungarian_match_many([(cost[k], col_valid[k]), (cost[k, :, :FEW_ROWS, :], col_valid[k])],
                                       'scipy') for k in range(cost.shape[0])]
  for k in range(cost.shape[0]):
    for group in range(2):
      for part in range(2):
        np.testing.assert_array_equal(np.asarray(out[group][part][k]), np.asarray(ref[k][group][part]))
  clean = np.asarray(jax.vmap(lambda c, v: matching.sanitize_cost(c, v)[0])(cost[0], col_valid[0]))
  pooled = matching._scipy_on_host(clean, col_valid[0], threads=True)  # pylint: disable=protected-access
  serial = matching._scipy_on_host(clean, col_valid[0], threads=False)  # pylint: disable=protected-access
  for a, b in zip(pooled, serial):
    np.testing.assert_array_equal(a, b)
  assert matching._pool() is matching._pool()  # pylint: disable=protected-access  # one pool per process


def test_host_stats_count_one_call_per_list():
  problems = _random_problems(4)
  fn = jax.jit(lambda ps: matching.hungarian_match_many(ps, 'scipy'))
  jax.block_until_ready(fn(problems))
  matching.HOST_STATS.reset()
  jax.block_until_ready(fn(problems))
  assert matching.HOST_STATS.calls == 1
  assert matching.HOST_STATS.problems == 3 * 2 + 2 + 1
  assert matching.HOST_STATS.seconds > 0


def test_auto_backend_by_platform():
  assert matching.resolve_backend('auto', 'cpu') == 'scipy'
  assert matching.resolve_backend('auto', 'gpu') == 'scipy'
  assert matching.resolve_backend('auto', 'cuda') == 'scipy'
  assert matching.resolve_backend('auto', 'tpu') == 'jax'
  assert matching.resolve_backend('jax', 'cpu') == 'jax' and matching.resolve_backend('scipy', 'tpu') == 'scipy'
  assert matching.resolve_backend('auto') == matching.AUTO_BACKEND.get(jax.default_backend(), 'scipy')
  with pytest.raises(ValueError, match='backend'):
    matching.resolve_backend('lapjv')
  # The config accepts exactly the solver names this module knows.
  from mrqm_jax import config_validation  # pylint: disable=g-import-not-at-top
  check = config_validation.CHECKS['matcher.backend']
  assert all(check.ok(b) for b in matching.BACKENDS) and not check.ok('lapjv')


def test_many_trace_time_errors():
  with pytest.raises(ValueError, match='problem 1: col_valid must have shape'):
    matching.hungarian_match_many([(jnp.zeros((4, 3)), None), (jnp.zeros((2, 4, 3)), jnp.ones((2, 4), bool))])
  with pytest.raises(ValueError, match=r'problem 0: cost must be \[\.\.\., N, M\]'):
    matching.hungarian_match_many([(jnp.zeros((3,)), None)])
