"""traced_cache: a jitted function exported once and reloaded by a later "run" (a fresh cached_jit) without
tracing; every change of what decides the program is a new entry; damaged entries and unexportable programs fall
back to tracing / plain jit."""

import collections
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mrqm_jax import parallel, train, traced_cache

Moments = collections.namedtuple('Moments', ['mean', 'count'])
TRACES = []


def new_step():
  """A new function object each call, as a new process has: JAX's in-process trace cache cannot answer."""

  def step(state, batch):
    TRACES.append(1)   # runs only while JAX traces
    x = batch['x']
    new = {'w': state['w'] + jnp.sum(x, axis=0),
           'm': Moments(state['m'].mean * 0.5 + x.mean(), state['m'].count + 1)}
    return new, {'loss': jnp.sum(x ** 2), 'n': jnp.asarray(x.shape[0])}

  return step


step = new_step()


def make(folder, key='k', donate=()):
  mesh = parallel.create_mesh()
  rep = parallel.replicated(mesh)
  return traced_cache.cached_jit(new_step(), name='toy', key=key, mesh=mesh, in_shardings=(rep, parallel.batch_sharded(mesh)),
                                 out_shardings=(rep, rep), donate_argnums=donate, folder=str(folder))


def inputs(n=4):
  state = {'w': jnp.arange(3.0), 'm': Moments(jnp.ones(()), jnp.zeros((), jnp.int32))}
  return state, {'x': jnp.asarray(np.random.default_rng(n).normal(size=(n, 3)), jnp.float32)}


def assert_same(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_second_run_reloads_without_tracing(tmp_path, caplog):
  expected = jax.jit(step)(*inputs())
  TRACES.clear()
  first = make(tmp_path)(*inputs())
  assert_same(first, expected)
  assert len(os.listdir(tmp_path)) == 1
  assert TRACES, 'the first run must trace'
  TRACES.clear()
  second = make(tmp_path)(*inputs())       # a new run: a fresh cached_jit over the same folder
  assert TRACES == [], 'the stored program was traced again'
  assert_same(second, expected)
  assert isinstance(second[0]['m'], Moments)   # the output tree comes back with its types
  assert not [r for r in caplog.records if r.levelname == 'WARNING'], caplog.text   # no fallback on the way


def test_donation_and_repeated_calls(tmp_path):
  run = make(tmp_path, donate=(0,))
  state, batch = inputs()
  expected_state, _ = jax.jit(step)(*inputs())
  state, _ = run(state, batch)
  assert_same(state, expected_state)
  state, metrics = run(state, batch)      # the same program again, fed its own (donated) output
  assert int(state['m'].count) == 2 and float(metrics['loss']) > 0


def test_every_change_is_a_new_entry(tmp_path):
  make(tmp_path, key='a')(*inputs())
  make(tmp_path, key='b')(*inputs())              # another config
  make(tmp_path, key='a')(*inputs(n=2))           # another batch shape
  assert len(os.listdir(tmp_path)) == 3
  make(tmp_path, key='a')(*inputs())
  assert len(os.listdir(tmp_path)) == 3


def test_source_digest_sees_code_changes(tmp_path):
  (tmp_path / 'pkg').mkdir()
  module = tmp_path / 'pkg' / 'a.py'
  module.write_text('x = 1\n')
  before = traced_cache.source_digest.__wrapped__(str(tmp_path / 'pkg'))
  module.write_text('x = 2\n')
  assert traced_cache.source_digest.__wrapped__(str(tmp_path / 'pkg')) != before


def test_damaged_entry_is_traced_again(tmp_path):
  make(tmp_path)(*inputs())
  (entry,) = os.listdir(tmp_path)
  (tmp_path / entry).write_bytes(b'not a pickle')
  TRACES.clear()
  assert_same(make(tmp_path)(*inputs()), jax.jit(step)(*inputs()))
  assert TRACES, 'the damaged entry was not replaced by a new trace'
  TRACES.clear()
  make(tmp_path)(*inputs())
  assert TRACES == []       # and the replacement is good


def test_host_callback_runs_as_plain_jit(tmp_path):
  mesh = parallel.create_mesh()
  rep = parallel.replicated(mesh)

  def with_callback(state, batch):
    doubled = jax.pure_callback(lambda x: np.asarray(x) * 2, jax.ShapeDtypeStruct((3,), jnp.float32), state['w'])
    return {'w': doubled}, {'loss': jnp.sum(batch['x'])}

  run = traced_cache.cached_jit(with_callback, name='cb', key='k', mesh=mesh, in_shardings=(rep, rep),
                                out_shardings=(rep, rep), folder=str(tmp_path))
  out, _ = run({'w': jnp.arange(3.0)}, {'x': jnp.ones(2)})
  np.testing.assert_array_equal(np.asarray(out['w']), [0.0, 2.0, 4.0])
  assert not os.listdir(tmp_path)


def test_no_key_or_no_folder_is_plain_jit(tmp_path):
  mesh = parallel.create_mesh()
  rep = parallel.replicated(mesh)
  assert isinstance(traced_cache.cached_jit(step, name='toy', key=None, mesh=mesh, in_shardings=(rep, rep),
                                            out_shardings=(rep, rep), folder=str(tmp_path)),
                    type(jax.jit(step)))
  assert traced_cache.cache_folder('gs://bucket/cache') is None and traced_cache.cache_folder('') is None
  assert traced_cache.cache_folder('/c') == os.path.join('/c', 'traced')


def test_step_key_ignores_paths_not_the_model():
  from configs import smoke  # pylint: disable=g-import-not-at-top
  a, b = smoke.get_config(), smoke.get_config()
  b.dataset.root, b.model.pretrained, b.compilation_cache_dir = '/elsewhere/data', '/w/r50.npz', '/tmp/c'
  assert train.step_trace_key(a, 10) == train.step_trace_key(b, 10)
  assert train.step_trace_key(a, 10) != train.step_trace_key(a, 11)      # the lr schedule's epochs
  c = smoke.get_config()
  c.model.hidden_dim = 64
  assert train.step_trace_key(a, 10) != train.step_trace_key(c, 10)
