"""Traced programs kept across runs: a jitted function exported once (jax.export), reloaded by later runs.

Why: JAX's persistent compilation cache keys an executable by its lowered program, so every run still traces the
Python model and lowers it before the cache can answer — for the train step, most of a cached run's start
(README, startup row). An exported program (StableHLO plus its calling convention) reloads in milliseconds;
calling it lowers only a thin wrapper, whose executable the compilation cache then serves.

The key of an entry is everything that decides the traced program without tracing it: the caller's `key` (the
config), the source of this package (every .py file under mrqm_jax/), the versions of jax / jaxlib / flax /
optax / numpy, JAX's flag values, the backend and devices, and the abstract arguments (tree structure, shapes,
dtypes, shardings). What it cannot see is a function replaced at run time (a test's monkeypatch of a model
part): such code must not pass a key (`cached_jit(..., key=None)` is plain `jax.jit`).

Entries live in `<jax_compilation_cache_dir>/traced/` (config.compilation_cache_dir; off when that is unset or a
URL), one file each, written atomically. An entry that cannot be read is logged and replaced. A program that
cannot be exported (a host callback: the SciPy matcher) runs as plain `jax.jit`, with one log line. The files are
as trusted as the compilation cache's own executables beside them (they hold a pickled tree structure).
"""

import functools
import hashlib
import importlib.metadata
import json
import os
import pickle
from typing import Any, Callable, Sequence

from absl import logging
import jax

FORMAT = 1
SUBDIR = 'traced'
_VERSIONED = ('jax', 'jaxlib', 'flax', 'optax', 'numpy')


@functools.cache
def source_digest(root: str | None = None) -> str:
  """sha256 over the path and bytes of every .py file under `root` (default: this package; any change of its
  code is a new key)."""
  root = root or os.path.dirname(os.path.abspath(__file__))
  digest = hashlib.sha256()
  for folder, dirs, files in os.walk(root):
    dirs.sort()
    for name in sorted(f for f in files if f.endswith('.py')):
      path = os.path.join(folder, name)
      digest.update(os.path.relpath(path, root).encode() + b'\0')
      with open(path, 'rb') as f:
        digest.update(f.read() + b'\0')
  return digest.hexdigest()


def _versions() -> dict[str, str]:
  out = {}
  for name in _VERSIONED:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = '?'
  return out


def _abstract(x: Any) -> str:
  sharding = getattr(x, 'sharding', None)
  return f'{jax.typeof(x)}|{sharding}'


def entry_key(name: str, key: str, args: Sequence[Any]) -> str:
  """The entry's file stem: `name-<sha256 of everything that decides the traced program>`."""
  parts = {
      'format': FORMAT, 'name': name, 'key': key, 'source': source_digest(),
      'versions': _versions(), 'flags': repr(sorted((k, repr(v)) for k, v in jax.config.values.items())),
      'backend': jax.default_backend(), 'devices': [str(d.device_kind) for d in jax.devices()],
      'processes': jax.process_count(),
      'tree': str(jax.tree.structure(tuple(args))),
      'leaves': [_abstract(x) for x in jax.tree.leaves(tuple(args))],
  }
  digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
  return f'{name}-{digest[:40]}'


def cache_folder(base: str | None = None) -> str | None:
  """`<base>/traced` (base: jax_compilation_cache_dir), or None when the compilation cache is off or remote."""
  base = jax.config.jax_compilation_cache_dir if base is None else base
  if not base or '://' in str(base):
    return None
  return os.path.join(str(base), SUBDIR)


def cached_jit(fun: Callable, *, name: str, key: str | None, mesh: jax.sharding.Mesh,
               in_shardings: Sequence[jax.sharding.Sharding], out_shardings: Any,
               donate_argnums: Sequence[int] = (), compiler_options: dict | None = None,
               folder: str | None = None) -> Callable:
  """`jax.jit(fun, ...)` whose trace is kept across runs (module doc). -> a callable of the same arguments.

  in_shardings: one Sharding per positional argument (applied to each of its leaves). key: the caller's
  description of what `fun` closes over (e.g. the config as JSON); None = plain jit, nothing kept.
  folder: where entries live (default `cache_folder()`).
  """
  jitted = jax.jit(fun, in_shardings=tuple(in_shardings), out_shardings=out_shardings,
                   donate_argnums=tuple(donate_argnums), compiler_options=compiler_options)
  folder = (folder or cache_folder()) if key is not None else None
  if folder is None:
    return jitted
  programs: dict[Any, Callable] = {}   # per argument signature (as jit keeps one executable per signature)

  def call(*args):
    leaves, tree = jax.tree.flatten(tuple(args))
    signature = (tree, tuple((jax.typeof(x), getattr(x, 'sharding', None)) for x in leaves))
    program = programs.get(signature)
    if program is None:
      program = programs[signature] = _load_or_export(jitted, folder, entry_key(name, key, args), args, mesh,
                                                      in_shardings, donate_argnums, compiler_options)
    return program(*args)

  return call


def _flat_call(exported: jax.export.Exported, out_tree, mesh, args, donate_argnums: Sequence[int],
               compiler_options) -> Callable:
  """The exported program compiled for `args` (the compilation cache answers when it can) -> a callable that
  takes and returns the original trees. Raises whatever lowering or compiling raises (before any buffer is
  donated)."""
  donated, start = [], 0
  for i, arg in enumerate(args):
    n = len(jax.tree.leaves(arg))
    if i in donate_argnums:
      donated.extend(range(start, start + n))
    start += n
  run = jax.jit(lambda *flat: tuple(exported.call(*flat)), in_shardings=exported.in_shardings_jax(mesh),
                out_shardings=exported.out_shardings_jax(mesh), donate_argnums=tuple(donated),
                compiler_options=compiler_options)
  compiled = run.lower(*jax.tree.leaves(tuple(args))).compile()

  def call(*call_args):
    return jax.tree.unflatten(out_tree, compiled(*jax.tree.leaves(tuple(call_args))))

  return call


def _load_or_export(jitted, folder: str, entry: str, args, mesh, in_shardings, donate_argnums,
                    compiler_options) -> Callable:
  path = os.path.join(folder, entry + '.exported')
  if os.path.exists(path):
    try:
      with open(path, 'rb') as f:
        stored = pickle.load(f)
      if stored.get('format') != FORMAT:
        raise ValueError(f'format {stored.get("format")!r}, expected {FORMAT}')
      exported = jax.export.deserialize(bytearray(stored['exported']))
      program = _flat_call(exported, stored['out_tree'], mesh, args, donate_argnums, compiler_options)
      logging.info('traced_cache: %s reloaded from %s', entry.split('-')[0], path)
      return program
    except Exception as e:  # pylint: disable=broad-except  # a damaged entry only costs the trace
      logging.warning('traced_cache: cannot use %s (%s: %s); tracing again', path, type(e).__name__,
                      str(e).splitlines()[0] if str(e) else '')
  leaves, tree = jax.tree.flatten(tuple(args))
  out_trees = []   # the output's tree structure, seen once while export traces

  def flat_fun(*flat):
    out_leaves, out_tree = jax.tree.flatten(jitted(*jax.tree.unflatten(tree, flat)))
    out_trees.append(out_tree)
    return out_leaves

  # The declared shardings, one per argument, on each of its leaves (not the leaves' current placement).
  shardings = [sharding for arg, sharding in zip(args, in_shardings) for _ in jax.tree.leaves(arg)]
  try:
    exported = jax.export.export(jax.jit(flat_fun, in_shardings=tuple(shardings)))(*leaves)
    blob, out_tree = exported.serialize(), out_trees[0]
  except Exception as e:  # pylint: disable=broad-except  # e.g. a host callback: export has no such calls
    logging.info('traced_cache: %s not kept (%s: %s); plain jit', entry.split('-')[0], type(e).__name__,
                 str(e).splitlines()[0] if str(e) else '')
    return jitted
  try:
    os.makedirs(folder, exist_ok=True)
    tmp = f'{path}.tmp{os.getpid()}'
    with open(tmp, 'wb') as f:
      pickle.dump({'format': FORMAT, 'exported': bytes(blob), 'out_tree': out_tree}, f)
    os.replace(tmp, path)
  except OSError as e:
    logging.warning('traced_cache: cannot write %s (%s)', path, e)
  try:
    return _flat_call(exported, out_tree, mesh, args, donate_argnums, compiler_options)
  except Exception as e:  # pylint: disable=broad-except  # the plain jit is always there
    logging.warning('traced_cache: %s exported but not callable (%s: %s); plain jit', entry.split('-')[0],
                    type(e).__name__, str(e).splitlines()[0] if str(e) else '')
    return jitted
