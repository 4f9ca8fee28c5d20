"""The Deconver network and its NDC (nonnegative deconvolution) layer.

``NDC`` has two interchangeable implementations, selected by ``impl="lean"`` (default, the
memory-lean custom autograd node :class:`NDCUpdate`) or ``impl="reference"`` (the official
formulation); see docs/nn.md.
"""
from deconver.nn.deconver import DeconvMixer, Deconver, DeconverBlock
from deconver.nn.ndc import NDC
from deconver.nn.ndc_update import NDCUpdate
from deconver.nn.presets import PRESETS

__all__ = ["NDC", "NDCUpdate", "DeconvMixer", "DeconverBlock", "Deconver", "PRESETS"]
