"""benchmarks/tpu_aot_memory.py without libtpu: the one-chip topology arguments, the config resolved as on a TPU,
and the command line's refusal of a bad --topology. The TPU compile itself needs libtpu (README, benchmarks)."""

import importlib.util
import json
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


_TABLE_SPEC = importlib.util.spec_from_file_location('tpu_memory_table', REPO / 'benchmarks' / 'tpu_memory_table.py')
tmt = importlib.util.module_from_spec(_TABLE_SPEC)
_TABLE_SPEC.loader.exec_module(tmt)

_OK_OUTPUT = 'train step (TPU AOT): ...\ncompile (s)                       1234.5\ntemp_gib=11.250 peak_gib=12.500\n'


def test_table_rows_parse_and_default_priority():
  assert tmt.parse_rows('v5e:bfloat16:2, v4:float32:1') == (('v5e', 'bfloat16', 2), ('v4', 'float32', 1))
  for bad in ('v7:bfloat16:2', 'v5e:float16:2', 'v5e:bfloat16:0', 'v5e:bfloat16'):
    with pytest.raises(ValueError, match='--rows'):
      tmt.parse_rows(bad)
  assert tmt.DEFAULT_ROWS[:3] == (('v5e', 'bfloat16', 2), ('v5e', 'float32', 2), ('v5e', 'bfloat16', 1))
  assert len(set(tmt.DEFAULT_ROWS)) == len(tmt.CHIPS) * len(tmt.DTYPES) * len(tmt.BATCHES)


def test_table_record_from_output():
  ok = tmt.record_from_output('v5e', 'bfloat16', 2, (800, 1344), 'c.py', 0, _OK_OUTPUT, 1300.0, 9.5)
  assert (ok['status'], ok['temp_gib'], ok['peak_gib'], ok['compile_s'], ok['hbm_gib']) == ('ok', 11.25, 12.5,
                                                                                          1234.5, 16.0)
  assert ok['fits'] is True
  big = tmt.record_from_output('v5e', 'float32', 2, (800, 1344), 'c.py', 0, 'temp_gib=16.5 peak_gib=17.25', 1.0, 1.0)
  assert big['fits'] is False   # peak over the chip's 16 GiB
  refused = tmt.record_from_output('v5e', 'float32', 2, (800, 1344), 'c.py', 1,
                                   'x\nRESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. Used 20.1G\n', 1.0, 1.0)
  assert refused['status'] == 'over_hbm' and refused['fits'] is False and 'Used 20.1G' in refused['error']
  failed = tmt.record_from_output('v4', 'float32', 1, (800, 1344), 'c.py', -9, 'compiling\nKilled\n', 1.0, 1.0)
  assert failed['status'] == 'failed' and 'fits' not in failed
  table = tmt.format_table([ok, refused, failed]).splitlines()
  assert len(table) == 4 and 'yes' in table[1] and '>16' in table[2] and 'failed' in table[3]


def test_table_resumes_from_results(tmp_path, monkeypatch, capsys):
  results = tmp_path / 'rows.jsonl'
  done = tmt.record_from_output('v5e', 'bfloat16', 2, (800, 1344), 'configs/visdrone.py', 0, _OK_OUTPUT, 1.0, 1.0)
  results.write_text(json.dumps(done) + '\n{"chip": "v5e", "trunc')   # a killed run's half line is ignored
  compiled = []

  def fake_run_row(chip, dtype, batch, image_size, config, timeout):
    compiled.append((chip, dtype, batch))
    return tmt.record_from_output(chip, dtype, batch, image_size, config, 0, _OK_OUTPUT, 1.0, 1.0)

  monkeypatch.setattr(tmt, 'run_row', fake_run_row)
  assert tmt.main([f'--results={results}', '--rows=v5e:bfloat16:2,v5e:float32:2']) == 0
  assert compiled == [('v5e', 'float32', 2)]   # the finished row is not compiled again
  assert [r['dtype'] for r in tmt.load_results(str(results))] == ['bfloat16', 'float32']
  out = capsys.readouterr().out
  assert out.count('12.50') == 2 and 'HBM GiB' in out
  compiled.clear()
  assert tmt.main([f'--results={results}', '--rows=v5e:bfloat16:2,v5e:float32:2']) == 0
  assert not compiled
  killed = tmt.record_from_output('v5e', 'bfloat16', 1, (800, 1344), 'configs/visdrone.py', -15, 'Terminated', 1.0, 1.0)
  tmt.append_record(str(results), killed)
  assert tmt.main([f'--results={results}', '--rows=v5e:bfloat16:1']) == 0
  assert compiled == [('v5e', 'bfloat16', 1)]   # a failed row is compiled again; the table shows its new result
  assert 'failed' not in capsys.readouterr().out.split('HBM GiB')[1]
