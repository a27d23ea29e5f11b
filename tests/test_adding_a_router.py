"""docs/adding_a_router.md, followed: its router file, read from the page and saved on its own, is named in
ROUTER_FILES and nothing else changes; the suite's tests parametrised over moe.ROUTERS then run with it, and
train.py, the method names and the flags take it. The page cannot drift from the code: a change of the gate
contract or of the registry breaks this test, and a new cross-router test must be named on the page."""
import json
import os
import re
import subprocess
import sys

from tests.conftest import TINY_MOE_ARGS
from tests.guide_router import GUIDE, guide_router_name, write_guide_router

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cross_router_tests_in_the_guide():
    """'tests/test_x.py::test_name' of the guide's table of cross-router tests."""
    with open(GUIDE) as f:
        return set(re.findall(r'^\| `(tests/test_\w+\.py::test_\w+)` \|', f.read(), re.M))


def with_router_file(path):
    return dict(os.environ, ROUTER_FILES=path, OMP_NUM_THREADS='1')


def test_every_cross_router_test_passes_with_the_guides_router_and_is_named_in_the_guide(tmp_path):
    name = guide_router_name()
    result = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-rA', '-p', 'no:cacheprovider', '-k', name,
                             'tests', '--ignore', 'tests/test_adding_a_router.py'],
                            cwd=REPO, capture_output=True, text=True, timeout=1200,
                            env=with_router_file(write_guide_router(str(tmp_path))))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    passed = {re.sub(r'\[.*', '', line.split()[1]) for line in result.stdout.splitlines()
              if line.startswith('PASSED ')}
    assert passed == cross_router_tests_in_the_guide()


def test_the_guides_router_trains_from_its_file_alone_with_its_setting_as_a_flag(tmp_path):
    """train.py with the router file in ROUTER_FILES: its flag exists and is checked, the run is labelled with the
    display name of its registration, and its setting is stored in the model configuration."""
    env, name = with_router_file(write_guide_router(str(tmp_path))), guide_router_name()
    common = [sys.executable, 'train.py', *TINY_MOE_ARGS[:-2], '--gate_name', name, '--data', str(tmp_path / 'data'),
              '--max_step', '2', '--eval-interval', '2', '--work_dir', str(tmp_path / 'run')]
    bad = subprocess.run([*common, f'--{name}_temperature', '0'], cwd=REPO, env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and f'error: --{name}_temperature must be positive; got 0.0' in bad.stderr
    run = subprocess.run([*common, f'--{name}_temperature', '2'], cwd=REPO, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    [run_dir] = [os.path.join(root) for root, _, files in os.walk(tmp_path / 'run-synthetic') if 'config.json' in files]
    with open(os.path.join(run_dir, 'config.json')) as f:
        assert json.load(f)['model_config']['router'] == {'name': name, 'settings': {'temperature': 2.0}}
    with open(os.path.join(run_dir, 'results.json')) as f:
        assert {entry['method'] for entry in json.load(f)} == {'Scaled linear'}
    assert os.path.isfile(os.path.join(run_dir, 'src', f'{name}.py'))         # the snapshot holds the router file
    unknown = subprocess.run([sys.executable, 'eval.py', '--run', run_dir], cwd=REPO, capture_output=True, text=True,
                             env=dict(os.environ, ROUTER_FILES=''))
    assert unknown.returncode != 0 and f"unknown router '{name}'" in unknown.stderr and 'ROUTER_FILES' in unknown.stderr
