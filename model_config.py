"""The model configuration: one object that MemTransformerLM is built from, stored in every checkpoint and in
config.json (`to_dict`), so eval.py, the analyses and finetune.py rebuild the very model that trained.

The architecture's fields, plus `router`: {name, settings}, the router's registered name and its own settings
(router_registry.py), e.g. {'name': 'xmoe', 'settings': {'dim': 16, 'temperature': 0.07}}. `from_dict` also
reads the flat form written before the registry (`gate_name` and every router's settings as its flag, e.g.
`xmoe_dim`), so old checkpoints load unchanged; a flat setting given beside `router` overrides it (eval.py's
--thor_inference).
"""
import dataclasses

import moe   # noqa: F401  (registers the routers, and a user's $ROUTER_FILES)
import router_registry


@dataclasses.dataclass
class RouterConfig:
    name: str = 'smoe'
    settings: object = None       # an instance of the router's registered settings class (None: its defaults)

    def __post_init__(self):
        self.name = router_registry.canonical_name(self.name)
        if not isinstance(self.settings, router_registry.spec_of(self.name).settings):
            self.settings = router_registry.make_settings(self.name, self.settings)

    def to_dict(self):
        return {'name': self.name, 'settings': dataclasses.asdict(self.settings)}


@dataclasses.dataclass
class ModelConfig:
    """Transformer-XL with optional MoE feed-forward blocks (mem_transformer.py says what each field does)."""
    n_token: int
    n_layer: int
    n_head: int
    d_model: int
    d_head: int
    d_inner: int
    dropout: float
    dropatt: float
    tie_weight: bool = True
    d_embed: int = None
    div_val: int = 1
    tie_projs: list = None
    pre_lnorm: bool = False
    tgt_len: int = None
    ext_len: int = 0
    mem_len: int = 0
    cutoffs: list = ()
    same_length: bool = False
    clamp_len: int = -1
    moe: bool = False
    moe_num_expert: int = 16
    moe_top_k: int = 2
    moe_index: object = None          # None (every layer), '0,1,3' or [0, 1, 3]
    moe_backend: str = 'auto'
    moe_engine: str = 'auto'
    init: str = 'normal'
    init_range: float = 0.1
    init_std: float = 0.02
    proj_init_std: float = 0.01
    moe_variant: str = 'plain'
    hypermoe_emb_dim: int = 128
    hypermoe_hidden: int = 128
    hypermoe_layer_emb_dim: int = 10
    hypermoe_adapter_dim: int = 64
    router: RouterConfig = dataclasses.field(default_factory=RouterConfig)

    def to_dict(self):
        """A plain dict (JSON, torch.load's weights_only) that from_dict reads back."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != 'router'}
        return dict(fields, router=self.router.to_dict())

    @classmethod
    def from_dict(cls, config):
        """From to_dict's form, or the flat form of checkpoints written before the registry (module docstring)."""
        config = dict(config)
        router = config.pop('router', None) or {}
        name = router.get('name') or config.get('gate_name') or RouterConfig.name
        config.pop('gate_name', None)
        spec = router_registry.spec_of(name)
        settings = dict(router.get('settings') or {})
        for field in spec.fields():                 # flat settings of this router (by flag name) override
            if spec.flag(field.name) in config:
                settings[field.name] = config.pop(spec.flag(field.name))
        for other in router_registry.specs():    # the flat form holds every router's settings: not ours
            for field in other.fields():
                config.pop(other.flag(field.name), None)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f'unknown model configuration field(s) {", ".join(unknown)}')
        return cls(**config, router=RouterConfig(name, settings))


def router_name(config):
    """The canonical router name of a model configuration dict, of either form."""
    name = config['router']['name'] if 'router' in config else config['gate_name']
    return router_registry.canonical_name(name)
