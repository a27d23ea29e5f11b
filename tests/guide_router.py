"""pytest plugin (`-p tests.guide_router`): registers the router of docs/adding_a_router.md as its registry lines
say, before any test module is imported, so that every test parametrised over moe.ROUTERS takes it.
tests/test_adding_a_router.py runs the suite with it."""
import os
import re

import custom_gate
import evaluation
import moe

GUIDE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'docs', 'adding_a_router.md')


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


def pytest_configure(config):
    name, gate_cls, column = guide_router()
    assert issubclass(gate_cls, custom_gate.BaseGate) and name not in moe.GATES
    moe.GATES[name] = gate_cls
    moe.ROUTERS = moe.ROUTERS + (name,)
    evaluation.METHOD_NAMES[name] = column
