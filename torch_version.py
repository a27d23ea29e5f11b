"""The oldest torch this code runs on, checked by moe_engine.py (which every model imports) before it uses it.

torch 2.4 brought what the MoE engine is built on (torch.library.custom_op with register_fake and
register_autograd; torch.get_autocast_dtype and torch.is_autocast_enabled taking a device type), and
torch 2.7 renamed dynamo's cache_size_limit to the recompile_limit that --compile raises. F.grouped_mm
(torch 2.8 on CUDA, later on CPU) is optional: where it is missing the MoE block runs its loop engine.
An older torch would fail later with an AttributeError deep in a traceback; this says it in one line.
"""
import re

MIN_TORCH = (2, 7)


def check_torch(version):
    """SystemExit with one `error: ...` line when `version` (torch.__version__) is below MIN_TORCH."""
    found = tuple(int(part) for part in re.match(r'(\d+)\.(\d+)', str(version)).groups())
    if found < MIN_TORCH:
        need = '.'.join(map(str, MIN_TORCH))
        raise SystemExit(f"error: this code needs torch >= {need} (found {version}): pip install 'torch>={need}'")

