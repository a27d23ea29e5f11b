"""One methods table (methods.py) for the flags that select each method: README's methods table, the
script-settings test's METHOD_FLAGS and script/demo_routers.sh are read from it or checked against it, and the
methods table of docs/routing.md against the routers' registrations (name, paper, default loss weights)."""
import os
import re

import pytest

import evaluation
import methods
import router_registry
import seeds
import train_args
from tests.test_scripts import METHOD_FLAGS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCALE_ARGS = ('moe_top_k_min', 'dts_anneal_steps')    # set by the scripts' scale, not by the method's flags


def table_rows(path):
    """The rows of the first markdown table of `path` under a header starting '| method |', as lists of cells."""
    with open(os.path.join(REPO, path)) as f:
        lines = f.read().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith('| method |'))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith('|'):
            break
        rows.append([cell.strip() for cell in line.strip('|').split('|')])
    return rows


def first_code(cell):
    return re.search(r'`([^`]*)`', cell).group(1)


def test_readmes_methods_table_gives_each_methods_flags_from_the_methods_table():
    by_column = {method.column: method for method in methods.methods().values()}
    rows = table_rows('README.md')
    for row in rows:
        column = row[0].strip('*').split(' / ')[0]
        assert first_code(row[-1]) == by_column[column].selection(), row[0]
    named = {row[0].strip('*').split(' / ')[0] for row in rows}
    assert {spec.display_name for spec in router_registry.specs()} <= named


def test_the_script_settings_tables_method_flags_are_the_methods_tables():
    by_column = {method.column: method for method in methods.methods().values()}
    for column, expected in METHOD_FLAGS.items():
        method = by_column[column.replace('Dense+Dropout', 'Dense')]     # one selection, the dropout the script's
        resolved = vars(train_args.parse_args(list(method.flags) + (['--dynamic_moe'] if method.dynamic_k else [])))
        wanted = {name: value for name, value in expected.items() if name not in SCALE_ARGS}
        assert {name: resolved[name] for name in wanted} == wanted, column


def test_demo_routers_takes_its_flags_from_the_methods_table():
    with open(os.path.join(REPO, 'script', 'demo_routers.sh')) as f:
        text = f.read()
    assert not re.search(r'--gate_name \w', text) and '"$PYTHON" methods.py' in text     # no flags of its own


def test_routings_methods_table_names_each_routers_paper_and_default_loss_weights():
    rows = {row[0]: row for row in table_rows('docs/routing.md')}
    for spec in router_registry.specs():
        _, names, paper, _reference, losses, _ = rows[spec.display_name]
        assert first_code(names) == spec.name and all(f'`{alias}`' in names for alias in spec.aliases
                                                      if alias != spec.gate_class.__name__)
        assert paper.startswith(spec.paper) and losses.startswith(spec.loss_weights())


def test_an_unregistered_router_is_an_error_not_smoe():
    with pytest.raises(ValueError, match="unknown router 'nosuch'.*ROUTER_FILES"):
        evaluation.method_name({'moe': True, 'gate_name': 'nosuch', 'dropout': 0.1})


@pytest.mark.parametrize('original,own', [
    (['--gate_name', 'CustomNaiveGate', '--freeze_gate'], ['--gate_name', 'smoe_dropout']),
    (['--gate_name', 'CustomNaiveGate'], ['--gate_name', 'smoe']),
    (['--gate_name', 'HyperRouterGate'], ['--gate_name', 'hyper_router']),
])
def test_the_original_codes_names_give_the_routers_own_configuration(original, own):
    """The two spellings of one method are one configuration in config.json, so `eval.py --table` groups them."""
    def configuration(flags):
        args = train_args.parse_args(['--moe', '--dynamic_moe', *flags])
        return seeds.configuration({'args': vars(args), 'model_config': train_args.model_config(args, 37)})
    assert configuration(original) == configuration(own)
