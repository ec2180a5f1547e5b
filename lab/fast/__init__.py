"""Fast paths for transformers' reference code (outputs match the reference), chosen per model.

`install()` puts lab's dispatchers into transformers once; by themselves they change nothing.
`apply(model, on)` decides for one model (lab.models.load does it from ModelSpec.fast); models never
given to apply() follow `enable(on)`'s default (on), for scripts that build models themselves.
"""

from lab.fast import attention, griffin, mamba, scan, state
from lab.fast.scan import linear_scan
from lab.fast.state import enabled

__all__ = ["apply", "enable", "enabled", "install", "linear_scan"]


def install() -> None:
    """Put the dispatchers in place (idempotent). Call it before accelerate hooks a model's modules."""
    scan.install()
    griffin.install()
    attention.install()
    mamba.install()


def apply(model, on: bool = True) -> None:
    """Run `model` on lab's fast paths (on) or on transformers' reference code (off); other models keep theirs."""
    install()
    state.set_model(model, on)


def enable(on: bool = True) -> None:
    """The default for models never given to apply()."""
    install()
    state.set_default(on)
