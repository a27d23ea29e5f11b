"""The router registry: every routing method declares itself once, where its class is defined.

    @register_router('xmoe', display_name='X-MoE', settings=XMoESettings, paper=..., reference=...)
    class XMoEGate(BaseGate): ...

A registration gives the name `--gate_name` takes (and aliases: the original code's class names), the column
name of tables and results.json, the paper and reference code (docs/routing.md's methods table), the
settings (a frozen dataclass whose fields are the gate's own constructor arguments, each made with
`setting`: default, help text, valid range or choices), and which gate arguments come from the MoE block's
context (`context`: layer index, vocabulary size), the same context for every gate. From it come train.py's
and finetune.py's router flags (`--<flag_prefix><field>`), `moe.GATES` and `moe.ROUTERS`, the method names
and the tests' router list; nothing else lists routers.

A router of one's own is one file holding its class and this decorator; `ROUTER_FILES=path.py[:other.py]`
makes train.py, eval.py, finetune.py and the tests load it (docs/adding_a_router.md). This module imports
nothing of the project, so a gate module can import it.
"""
import dataclasses
import importlib.util
import os
import sys

ROUTER_FILES_ENV = 'ROUTER_FILES'
CONTEXT_KEYS = ('layer_index', 'n_token')    # what the MoE block hands every gate (see moe.build_gate)

PAPER_ROUTERS = ('smoe', 'smoe_dropout', 'hyper_router')   # the methods of Do et al. 2023, first in every list
GATES = {}      # every name --gate_name takes (canonical names and aliases) -> gate class
SPECS = {}      # canonical name -> RouterSpec, in registration order


@dataclasses.dataclass(frozen=True)
class NoSettings:
    """The settings of a router that has none of its own."""


def setting(default, help, valid=None, choices=None, flag_default=dataclasses.MISSING, from_max_step=None):
    """A field of a router's settings. valid: (what a valid value is, predicate), e.g. ('at least 1', lambda v:
    v >= 1); choices: the values allowed; flag_default, from_max_step: a flag left at flag_default takes the
    value from_max_step(the run's --max_step) (DTS-Gate's -1: half of the run)."""
    return dataclasses.field(default=default, metadata={'help': help, 'valid': valid, 'choices': choices,
                                                        'flag_default': flag_default, 'from_max_step': from_max_step})


@dataclasses.dataclass(frozen=True)
class RouterSpec:
    """What a router's registration declares (see the module docstring)."""
    name: str
    gate_class: type
    display_name: str
    paper: str                      # markdown link to the paper
    reference: str                  # markdown link to the reference code
    settings: type = NoSettings
    aliases: tuple = ()
    context: tuple = ()             # ((gate argument, context key), ...), keys from CONTEXT_KEYS
    flag_prefix: str = ''
    dynamic_k: bool = False         # its recipe grows k during training (--dynamic_moe)

    def flag(self, field_name):
        """The command-line flag (without --) of one of the settings."""
        return f'{self.flag_prefix}{field_name}'

    def fields(self):
        return dataclasses.fields(self.settings)

    def loss_weights(self):
        """The auxiliary losses the method trains with by default, as docs/routing.md's methods table says them."""
        weights = self.gate_class.default_aux_losses
        return ', '.join(f'{name} {weight:g}' for name, weight in weights.items()) or 'none'


def register_router(name, display_name, paper, reference, settings=NoSettings, aliases=(), context=None,
                    flag_prefix=None, dynamic_k=False):
    """Class decorator registering a gate class as router `name` (see the module docstring). flag_prefix: of its
    settings' flags (default '<name>_'); context: {gate argument: context key}; dynamic_k: its recipe grows k
    during training (the k it trains at otherwise: the class's default top_k)."""
    def register(gate_class):
        taken = [n for n in (name, *aliases) if n in GATES and GATES[n] is not gate_class]
        if taken:
            raise ValueError(f'router name(s) {", ".join(taken)} of {gate_class.__name__} already registered')
        bad = sorted(set((context or {}).values()) - set(CONTEXT_KEYS))
        if bad:
            raise ValueError(f'router {name}: unknown context key(s) {bad}; the block gives {CONTEXT_KEYS}')
        if not (dataclasses.is_dataclass(settings) and settings.__dataclass_params__.frozen):
            raise TypeError(f'router {name}: settings must be a frozen dataclass')
        SPECS[name] = RouterSpec(name, gate_class, display_name, paper, reference, settings, tuple(aliases),
                                 tuple((context or {}).items()), f'{name}_' if flag_prefix is None else flag_prefix,
                                 dynamic_k)
        for n in (name, *aliases):
            GATES[n] = gate_class
        return gate_class
    return register


def router_names():
    """Every router once, by its canonical name: the paper's three first (its tables' order), then the others in
    registration order."""
    return tuple(sorted(SPECS, key=lambda name: name not in PAPER_ROUTERS))


def specs():
    """Every router's RouterSpec, in router_names' order."""
    return tuple(SPECS[name] for name in router_names())


def canonical_name(name):
    """The registered router `name` is (a canonical name or an alias); ValueError for an unknown one."""
    if name in SPECS:
        return name
    for spec in SPECS.values():
        if name in spec.aliases:
            return spec.name
    raise ValueError(f'unknown router {name!r}; choose one of {", ".join(GATES)} (a router of your own: its file in '
                     f'{ROUTER_FILES_ENV}=path.py, docs/adding_a_router.md)')


def spec_of(name):
    return SPECS[canonical_name(name)]


def make_settings(name, values=None):
    """The settings of router `name` from {field: value} (missing fields keep their defaults)."""
    settings_cls = spec_of(name).settings
    known = {f.name for f in dataclasses.fields(settings_cls)}
    unknown = sorted(set(values or {}) - known)
    if unknown:
        raise ValueError(f'router {name!r} has no setting(s) {", ".join(unknown)}; its settings: '
                         f'{", ".join(sorted(known)) or "none"}')
    return settings_cls(**(values or {}))


def setting_problems(name, settings):
    """'--flag must be ...; got v' for each setting of router `name` outside its valid range or choices."""
    spec, problems = spec_of(name), []
    for field in spec.fields():
        value, meta = getattr(settings, field.name), field.metadata
        if meta.get('choices') is not None and value not in meta['choices']:
            problems.append(f'--{spec.flag(field.name)} must be one of {", ".join(map(str, meta["choices"]))}; '
                            f'got {value!r}')
        elif meta.get('valid') is not None and not meta['valid'][1](value):
            problems.append(f'--{spec.flag(field.name)} must be {meta["valid"][0]}; got {value}')
    check = getattr(settings, 'problems', None)       # cross-field checks a settings class may add
    return problems + (list(check()) if check else [])


def router_files():
    """The router files named in $ROUTER_FILES (os.pathsep-separated), as absolute paths."""
    text = os.environ.get(ROUTER_FILES_ENV, '')
    return [os.path.abspath(p) for p in text.split(os.pathsep) if p.strip()]


def load_router_files(paths=None):
    """Import each router file (default: $ROUTER_FILES) once, so that its decorator registers its router."""
    for path in router_files() if paths is None else paths:
        module_name = 'user_router_' + os.path.splitext(os.path.basename(path))[0]
        if module_name in sys.modules:
            continue
        if not os.path.isfile(path):
            raise ValueError(f'{ROUTER_FILES_ENV} names {path}, which is not a file')
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module
        module_spec.loader.exec_module(module)
