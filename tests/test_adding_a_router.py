"""docs/adding_a_router.md, followed: its router class and registry lines, read from the page, are registered and
every cross-router test runs over the new router. The page cannot drift from the code: a change of the gate
contract or of the registry breaks this test, and a new test parametrised over moe.ROUTERS must be named on
the page and run here."""
import glob
import json
import os
import re

import pytest
import torch

import custom_gate
import evaluation
import moe
import tests.test_device as device_tests
import tests.test_moe as moe_tests
import tests.test_train as train_tests

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUIDE = os.path.join(REPO, 'docs', 'adding_a_router.md')


def guide_block(marker):
    """The code block that follows the HTML comment `<!-- marker: ... -->` on the page."""
    with open(GUIDE) as f:
        text = f.read()
    match = re.search(rf'<!-- {marker}:[^>]*-->\s*```python\n(.*?)```', text, re.S)
    assert match, f'docs/adding_a_router.md has no code block after <!-- {marker}: ... -->'
    return match.group(1)


def guide_router():
    """(gate name, class, column name) of the page: the class defined in custom_gate.py's namespace, the names
    from its registry lines."""
    namespace = dict(vars(custom_gate))
    exec(guide_block('router class'), namespace)
    registry = guide_block('registry')
    name, class_name = re.search(r"GATES = \{\.\.\., '(\w+)': (\w+)\}", registry).groups()
    assert re.search(rf"ROUTERS = \(\.\.\., '{name}'\)", registry)
    column = re.search(rf"METHOD_NAMES = \{{\.\.\., '{name}': '([^']+)'\}}", registry).group(1)
    return name, namespace[class_name], column


@pytest.fixture
def new_router(monkeypatch):
    """The page's router registered as its registry lines say; returns its gate name."""
    name, gate_cls, column = guide_router()
    assert issubclass(gate_cls, custom_gate.BaseGate) and name not in moe.GATES
    monkeypatch.setitem(moe.GATES, name, gate_cls)
    monkeypatch.setattr(moe, 'ROUTERS', moe.ROUTERS + (name,))
    monkeypatch.setitem(evaluation.METHOD_NAMES, name, column)
    return name


def run_resume_test(name, tmp_path, synthetic_dir, monkeypatch, **_):
    monkeypatch.setitem(train_tests.RESUMED_CONFIGS, name, ['--gate_name', name])
    train_tests.test_resuming_gives_the_same_run_as_never_stopping(name, tmp_path, synthetic_dir)
    [run_dir] = glob.glob(str(tmp_path / 'a' / 'runs-synthetic' / '*'))
    with open(os.path.join(run_dir, 'results.json')) as f:
        assert {entry['method'] for entry in json.load(f)} == {evaluation.METHOD_NAMES[name]}


def run_brute_force_test(name):
    for k in (1, 2, moe_tests.E):
        for engine, dtype in (('loop', torch.float64), ('loop', torch.float32), ('grouped', torch.float32)):
            moe_tests.test_sparse_moe_matches_brute_force_forward_and_backward(name, k, engine, dtype,
                                                                                torch.device('cpu'))


def run_device_contract_test(name, **_):
    device_tests.test_every_gate_keeps_the_contract_on_the_device_with_fp32_routing_under_autocast(
        name, torch.device('cpu'))


# every test parametrised over moe.ROUTERS, called with the new router
CROSS_ROUTER_TESTS = {
    'test_moe.py::test_gate_contract': lambda name, **_: moe_tests.test_gate_contract(name),
    'test_moe.py::test_sparse_moe_matches_brute_force_forward_and_backward':
        lambda name, **_: run_brute_force_test(name),
    'test_moe.py::test_which_router_parameters_train':
        lambda name, tokens, **_: moe_tests.test_which_router_parameters_train(name, tokens),
    'test_device.py::test_every_gate_keeps_the_contract_on_the_device_with_fp32_routing_under_autocast':
        run_device_contract_test,
    'test_train.py::test_resuming_gives_the_same_run_as_never_stopping': run_resume_test,
}


def cross_router_tests_of_the_suite():
    """'file::test' of every test that takes its routers from moe.ROUTERS (parametrised over it directly, or,
    as test_train.py's resume test, over a table built from it)."""
    found = set()
    for path in sorted(glob.glob(os.path.join(REPO, 'tests', 'test_*.py'))):
        with open(path) as f:
            text = f.read()
        tables = set(re.findall(r'^(\w+) = \{[^\n]*\n\s+\*\*\{[^\n]*for name in ROUTERS\}', text, re.M))
        for match in re.finditer(r"@pytest\.mark\.parametrize\('\w+', (\w+)\)\n(?:@[^\n]*\n)*def (\w+)", text):
            if match.group(1) == 'ROUTERS' and 'from moe import' in text or match.group(1) in tables:
                found.add(f'{os.path.basename(path)}::{match.group(2)}')
    return found


def test_every_cross_router_test_is_named_in_the_guide_and_run_over_its_router():
    with open(GUIDE) as f:
        page = f.read()
    found = cross_router_tests_of_the_suite()
    assert found == set(CROSS_ROUTER_TESTS)
    assert [test for test in found if f'tests/{test}' not in page] == []


@pytest.mark.parametrize('test', sorted(CROSS_ROUTER_TESTS))
def test_the_guides_router_passes(test, new_router, tokens, tmp_path, synthetic_dir, monkeypatch):
    CROSS_ROUTER_TESTS[test](new_router, tokens=tokens, tmp_path=tmp_path, synthetic_dir=synthetic_dir,
                             monkeypatch=monkeypatch)
