"""The methods table: the train.py flags that select each method, in one place.

A method is a registered router with its recipe (the k its class trains at, k grown during training where its
registration says so), or one of the few that are more than a router: the dense baselines and HyperMoE (a
HyperExpert on top of a router). README's methods table and tests/test_scripts.py are checked against it
(tests/test_methods_table.py), and script/demo_routers.sh reads it:

    python methods.py                  # one line per method: key, column name, flags ('+dynamic_k' marks the
                                       # methods whose k grows during training; the caller gives the k range)
"""
import argparse
import inspect
from typing import NamedTuple

import moe  # noqa: F401  (registers the routers, and a user's $ROUTER_FILES)
import router_registry

DEFAULT_TOP_K = 2       # train.py's --moe-top-k


class Method(NamedTuple):
    key: str            # what script/demo_routers.sh's METHODS takes
    column: str         # its column name in tables and results.json (evaluation.method_name)
    flags: tuple        # the train.py flags that select it
    dynamic_k: bool     # its k grows during training (--dynamic_moe; the k range is the scale's)

    def selection(self):
        """The flags as README's methods table gives them."""
        return ' '.join(self.flags + (('--dynamic_moe',) if self.dynamic_k else ()))


def router_method(spec):
    """A registered router's method: --gate_name, and its class's own k where that is not train.py's default."""
    top_k = inspect.signature(spec.gate_class.__init__).parameters['top_k'].default
    k_flags = () if top_k == DEFAULT_TOP_K else ('--moe-top-k', str(top_k))
    return Method(spec.name, spec.display_name, ('--moe', '--gate_name', spec.name, *k_flags), spec.dynamic_k)


def methods():
    """{key: Method}: the dense baselines, every registered router, and HyperMoE on its published router (noisy
    top-k with its LM code's loss weights) and on SMoE's (script/demo.sh's, where it differs from SMoE by the
    HyperExpert alone) and HyperRouter's."""
    hypermoe = ('--moe_variant', 'hypermoe')
    table = [Method('dense', 'Dense', ('--d_inner', '8192'), False)]
    table += [router_method(spec) for spec in router_registry.specs()]
    table += [Method('hypermoe', 'HyperMoE', ('--moe', '--gate_name', 'noisy_topk', *hypermoe, '--importance_loss',
                                              '0.01', '--load_loss', '0.01'), False),
              Method('smoe_hypermoe', 'SMoE+HyperMoE', ('--moe', '--gate_name', 'smoe', *hypermoe), False),
              Method('hyper_router_hypermoe', 'HyperRouter+HyperMoE', ('--moe', '--gate_name', 'hyper_router',
                                                                       *hypermoe), True)]
    return {method.key: method for method in table}


def main(argv=None):
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    for method in methods().values():
        print('\t'.join([method.key, method.column, ' '.join(method.flags) + (' +dynamic_k' if method.dynamic_k
                                                                               else '')]))


if __name__ == '__main__':
    main()
