"""benchmarks/tpu_aot_memory.py without libtpu: the one-chip topology arguments, the config resolved as on a TPU,
and the command line's refusal of a bad --topology. The TPU compile itself needs libtpu (README, benchmarks)."""

import importlib.util
import subprocess
import sys

import pytest

from configs import visdrone
from mrqm_jax.ops import matching
from tests.conftest import REPO

_SPEC = importlib.util.spec_from_file_location('tpu_aot_memory', REPO / 'benchmarks' / 'tpu_aot_memory.py')
tam = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(tam)


@pytest.mark.parametrize('name,chip_config', [('v5e:1x1', 'default'), ('v6e:1x1', 'default'),
                                              ('v5p:1x1x1', 'default'), ('v4:1x1x1', 'megacore')])
def test_topology_kwargs_one_chip(name, chip_config):
  kwargs = tam.topology_kwargs(name)
  assert kwargs['topology_name'] == name
  assert kwargs['chip_config_name'] == chip_config
  assert kwargs['chips_per_host_bounds'] == (1, 1, 1)
  assert kwargs['num_slices'] == 1


@pytest.mark.parametrize('name', ['v5e:2x2', 'v5p:1x1x2', 'v5e:1x1x1', 'v4:1x1', 'v7:1x1', 'v5e', 'tpu', ''])
def test_topology_kwargs_rejects(name):
  with pytest.raises(ValueError, match='--topology'):
    tam.topology_kwargs(name)


def test_tpu_config_resolves_auto_choices_for_tpu():
  config = visdrone.get_config()
  assert config.matcher.backend == 'auto' and config.model.conv_impl == 'auto'
  assert config.encoder.sampling_layout == 'auto'
  out = tam.tpu_config(config)
  assert out.matcher.backend == matching.resolve_backend('auto', 'tpu') == 'jax'
  assert out.model.conv_impl == 'lax'
  assert out.encoder.sampling_layout == 'packed'   # lane-dense gathers on TPU
  assert out.iah.a_s > 0
  assert config.matcher.backend == 'auto'   # the input config is not changed
  config.unlock()
  config.model.conv_impl = 'matmul'
  config.matcher.backend = 'scipy'
  config.encoder.sampling_layout = 'flat'
  out = tam.tpu_config(config)
  assert (out.model.conv_impl, out.matcher.backend) == ('matmul', 'scipy')   # explicit choices are kept
  assert out.encoder.sampling_layout == 'flat'


def test_cli_bad_topology_exits_2_with_one_line():
  proc = subprocess.run([sys.executable, str(REPO / 'benchmarks' / 'tpu_aot_memory.py'),
                         f'--config={REPO / "configs" / "smoke.py"}', '--topology=v5e:4x4'],
                        capture_output=True, text=True, cwd=REPO, timeout=300)
  assert proc.returncode == 2
  lines = [l for l in proc.stderr.splitlines() if l.startswith('tpu_aot_memory.py:')]
  assert len(lines) == 1 and 'one chip' in lines[0], proc.stderr
  assert 'Traceback' not in proc.stderr
